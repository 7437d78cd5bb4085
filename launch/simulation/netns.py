"""A cluster of hosts on one machine: Linux network namespaces on a bridge of their own (root only).

Each host is a network namespace with one link, `eth0`, an address in
198.18.0.0/24 (RFC 2544's benchmarking range, 198.18.0.0/15) and no route
out of that subnet; the links meet on a bridge that lives in a namespace of
its own (the switch). The machine's own namespace gets nothing: every link is
created directly in its namespaces, so no packet can leave the simulated
cluster and nothing outside it can reach in. Processes started on a host
(`ip netns exec`) share the machine's file system, as a cluster shares a
disk.

  * `partition(host)` sets the host's switch port down (its cable cut at the
    switch: what it sends is dropped, nothing reaches it); `heal(host)` sets it
    up again. Connections stay open and TCP retransmits, as on a real network.
  * `kill_host(host)` kills every process in the host's namespace (a host
    death); the namespace, its address and its link stay for the restart.
  * `set_latency(ms, hosts)` delays every frame on those hosts' links by `ms`
    each way. This kernel has no `netem` qdisc (CONFIG_NET_SCH_NETEM unset:
    `tc qdisc add ... netem` says "Specified qdisc kind is unknown"), so the
    delay is `launch.simulation.link_delay`, a relay in the switch's namespace between
    the host's switch port and a second veth pair into the bridge.

Every name starts with `PREFIX`, the harness's pid and the cluster's count
(`plcsim-<pid>-0-h0`, `plcsim-<pid>-0-sw`): `close()` removes what this cluster made (processes,
namespaces and with them their links) on exit, Ctrl-C or error; processes are
started with a parent-death signal, so a harness killed with kill -9 takes
its processes with it at once, and `cleanup()` (`python -m launch.cluster_sim
--cleanup`, and every new cluster for clusters whose harness is dead) removes
the namespaces left by name.
"""

import ctypes
import dataclasses
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

PREFIX = 'plcsim-'
SUBNET = ipaddress.ip_network('198.18.0.0/24')  # Within RFC 2544's 198.18.0.0/15.
BRIDGE = 'br0'
HOST_LINK = 'eth0'
_PR_SET_PDEATHSIG = 1


class Unavailable(Exception):
  """Network namespaces cannot be made here; the message says why."""


def check_available() -> None:
  """`Unavailable` unless this process can make namespaces (root, Linux, iproute2)."""
  if not sys.platform.startswith('linux'):
    raise Unavailable(f'network namespaces are Linux\'s, and this is {sys.platform}')
  if os.geteuid() != 0:
    raise Unavailable('making network namespaces needs root (ip netns add)')
  if not shutil.which('ip'):
    raise Unavailable('iproute2\'s `ip` is not installed (apt-get install iproute2)')


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  result = subprocess.run(['ip', *args], capture_output=True, text=True, timeout=30)
  if check and result.returncode:
    raise RuntimeError(f'ip {" ".join(args)}: {result.stderr.strip()}')
  return result


def namespaces(prefix: str = PREFIX) -> List[str]:
  """The namespaces whose names start with `prefix`."""
  listed = _ip('netns', 'list', check=False).stdout.split('\n')
  return sorted(line.split()[0] for line in listed if line.startswith(prefix))


def pids_in(namespace: str) -> List[int]:
  return [int(pid) for pid in _ip('netns', 'pids', namespace, check=False).stdout.split()]


def _owner_alive(namespace: str) -> bool:
  """Whether the harness whose pid the name holds (`plcsim-<pid>-...`) still runs."""
  try:
    os.kill(int(namespace[len(PREFIX):].split('-')[0]), 0)
    return True
  except (ValueError, ProcessLookupError):
    return False
  except PermissionError:
    return True


def remove(names: Sequence[str]) -> List[str]:
  """Kills every process in these namespaces, then deletes them (their links go with them); what was removed."""
  for name in names:
    for pid in pids_in(name):
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  removed = []
  for name in names:
    deadline = time.time() + 10
    while pids_in(name) and time.time() < deadline:  # Killed processes leave the namespace when reaped.
      time.sleep(0.1)
    if _ip('netns', 'del', name, check=False).returncode == 0:
      removed.append(name)
  return removed


def cleanup(only_dead_owners: bool = False) -> List[str]:
  """Removes the namespaces (with their processes and links) of every cluster, or of those whose harness died."""
  return remove([name for name in namespaces() if not (only_dead_owners and _owner_alive(name))])


def _parent_death_signal() -> None:
  """In the child before exec: SIGKILL when the harness dies, however it dies."""
  ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclasses.dataclass
class Host:
  index: int
  namespace: str
  address: str
  port: str  # Its link's end on the switch.


class Cluster:
  """`num_hosts` hosts on one switch; a context manager that removes everything it made."""

  _made = itertools.count()  # Clusters made by this process: each its own names (a reaper may outlive one).

  def __init__(self, num_hosts: int):
    check_available()
    if not 1 <= num_hosts < SUBNET.num_addresses - 2:
      raise ValueError(f'{num_hosts} hosts: between 1 and {SUBNET.num_addresses - 3} fit in {SUBNET}.')
    cleanup(only_dead_owners=True)  # What harnesses killed before left.
    self.name = f'{PREFIX}{os.getpid()}-{next(Cluster._made)}'
    self.switch = f'{self.name}-sw'
    hosts = list(SUBNET.hosts())
    self.hosts = [Host(i, f'{self.name}-h{i}', str(hosts[i]), f'p{i}') for i in range(num_hosts)]
    self.processes: List[subprocess.Popen] = []
    self._delay: Optional[subprocess.Popen] = None
    self._latency: Dict[int, float] = {}
    self._reaper_pipe: Optional[int] = None
    try:
      self._start_reaper()
      self._build()
    except BaseException:
      self.close()
      raise

  def _start_reaper(self) -> None:
    """A process of its own session that removes this cluster when the harness is gone, however it went (kill -9
    included): it holds the read end of a pipe only the harness writes to."""
    read_end, self._reaper_pipe = os.pipe()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.Popen([sys.executable, '-m', 'launch.simulation.netns', self.name, str(read_end)], pass_fds=(read_end,),
                     start_new_session=True, cwd=root)
    os.close(read_end)

  def _build(self) -> None:
    _ip('netns', 'add', self.switch)
    _ip('-n', self.switch, 'link', 'add', BRIDGE, 'type', 'bridge')
    _ip('-n', self.switch, 'link', 'set', BRIDGE, 'up')
    for host in self.hosts:
      _ip('netns', 'add', host.namespace)
      _ip('link', 'add', HOST_LINK, 'netns', host.namespace, 'type', 'veth', 'peer', 'name', host.port, 'netns',
          self.switch)
      _ip('-n', self.switch, 'link', 'set', host.port, 'master', BRIDGE)
      _ip('-n', self.switch, 'link', 'set', host.port, 'up')
      _ip('-n', host.namespace, 'addr', 'add', f'{host.address}/{SUBNET.prefixlen}', 'dev', HOST_LINK)
      _ip('-n', host.namespace, 'link', 'set', HOST_LINK, 'up')
      _ip('-n', host.namespace, 'link', 'set', 'lo', 'up')

  def __enter__(self) -> 'Cluster':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Ends every process on the hosts, then removes the namespaces (with their links)."""
    for process in self.processes:
      if process.poll() is None:
        try:
          os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
          pass
    for process in self.processes:
      try:
        process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass
    remove([name for name in namespaces(self.name + '-')])
    if self._reaper_pipe is not None:
      os.close(self._reaper_pipe)  # The reaper finds nothing left, and exits.
      self._reaper_pipe = None

  def popen(self, host: Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """Starts `argv` on `host` (in its own session, so its process group is its descendants too), ended with the
    harness."""
    process = subprocess.Popen(['ip', 'netns', 'exec', host.namespace, *argv], start_new_session=True,
                               preexec_fn=_parent_death_signal, **kwargs)
    self.processes.append(process)
    return process

  def kill_host(self, host: Host) -> List[int]:
    """Kills every process of `host` at once (SIGKILL): a host death. The pids killed."""
    pids = pids_in(host.namespace)
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    return pids

  def partition(self, host: Host) -> None:
    """Cuts `host` off: its link's end on the switch down (its own end loses its carrier)."""
    _ip('-n', self.switch, 'link', 'set', host.port, 'down')

  def heal(self, host: Host) -> None:
    _ip('-n', self.switch, 'link', 'set', host.port, 'up')

  def set_latency(self, ms: float, hosts: Sequence[Host]) -> None:
    """Every frame to or from `hosts` delayed by `ms` (0: none, the link on the bridge again)."""
    from launch.simulation import link_delay  # pylint: disable=import-outside-toplevel
    if self._delay is not None:
      self._delay.terminate()
      self._delay.wait(timeout=10)
      self._delay = None
    for index in list(self._latency):
      host = self.hosts[index]
      _ip('-n', self.switch, 'link', 'del', f'd{index}')  # Its peer, the bridge's port, goes with it.
      _ip('-n', self.switch, 'link', 'set', host.port, 'master', BRIDGE)
      del self._latency[index]
    if ms <= 0:
      return
    for host in hosts:
      _ip('-n', self.switch, 'link', 'set', host.port, 'nomaster')
      _ip('-n', self.switch, 'link', 'add', f'd{host.index}', 'type', 'veth', 'peer', 'name', f'e{host.index}')
      _ip('-n', self.switch, 'link', 'set', f'e{host.index}', 'master', BRIDGE)
      for link in (f'd{host.index}', f'e{host.index}'):
        _ip('-n', self.switch, 'link', 'set', link, 'up')
      self._latency[host.index] = ms
    pairs = ','.join(f'{self.hosts[index].port}:d{index}' for index in self._latency)
    self._delay = subprocess.Popen(
        ['ip', 'netns', 'exec', self.switch, sys.executable, link_delay.__file__, pairs, str(ms)],
        stdout=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_parent_death_signal)
    self.processes.append(self._delay)
    link_delay.wait_ready(self._delay)

  @property
  def delay_process(self) -> Optional[subprocess.Popen]:
    return self._delay


def _reap(name: str, pipe_fd: int) -> None:
  """Waits for the harness's end of the pipe to close, then removes the cluster `name` if anything is left."""
  while os.read(pipe_fd, 1):
    pass
  remove(namespaces(name + '-'))


if __name__ == '__main__':  # python -m launch.simulation.netns CLUSTER_NAME PIPE_FD: the reaper (`Cluster` starts it).
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  _reap(sys.argv[1], int(sys.argv[2]))
