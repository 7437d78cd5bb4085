"""Who can reach a run: where its servers listen (`--bind_host`) and the addresses it publishes (`--publish_host`).

Reverb's and Courier's servers take a port and listen on `[::]:<port>`, every
interface (both build `"[::]:" + port` in C++; neither has a host option), and
neither authenticates a caller. A run's servers listen on `--bind_host` only
(default 127.0.0.1: this machine) through `bind_shim.c`, a tiny LD_PRELOAD
library that turns a bind() to the wildcard address into one to `--bind_host`
and leaves every other bind alone. It is the narrowest fix that works under
both launch types: the dynamic loader reads LD_PRELOAD when a process starts,
so local_mp's node processes get it from the launcher's environment, and under
local_mt, whose servers run in the launcher's own process, the launcher
re-executes itself under it (same pid, same arguments). It is built with the
system's C compiler at first use, into the user cache (a 0700 directory),
and a cached one is used only once verified: this user's own, not writable by
others, its hash the one recorded at its build; else it is rebuilt.
`--bind_host=0.0.0.0` (or `::`) is every interface, as the servers do by
themselves: no library. Where the library cannot be had the run refuses to
start (launch.train, exit 1) rather than listen on every interface; and as
the library could still fail to take in a node, the launcher reads each node
process's listening sockets (`exposed_listeners`) and stops a run with one
beyond `--bind_host`.
Not chosen: gRPC reads the listening address from neither an environment
variable nor anything these servers pass on; a network namespace (unshare)
would cut off attached evaluators and other hosts; a firewall rule needs root.

The nodes dial each other at `--bind_host` (`localhost` when it is every
interface); actor 0 publishes the learner's and the replay's addresses for
attached evaluators at `--publish_host` (default: `--bind_host`, or this
machine's name when that is every interface).
"""

import hashlib
import ipaddress
import os
import platform
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from typing import Dict, Iterable, List, Optional

from launchpad import address as lp_address
import portpicker
import psutil

from environments import datasets

BIND_ADDRESS_ENV = 'PLASTICITY_BIND_ADDRESS'  # Read by bind_shim.c at each bind.
_REEXECUTED_ENV = 'PLASTICITY_BIND_SHIM_REEXECUTED'  # Set before re-executing: never a second time.
SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bind_shim.c')
EXPOSED = ('without authentication: whoever reaches them can read the learner\'s parameters, call its node\'s '
           'methods and insert transitions into the replay')


class Unenforceable(Exception):
  """`--bind_host` cannot be enforced on this machine; the message says what is exposed instead."""


def is_every_interface(bind_host: str) -> bool:
  return ipaddress.ip_address(bind_host).is_unspecified


def is_loopback(ip: str) -> bool:
  """Whether a listening address (as psutil or /proc shows it, IPv4-mapped ones included) is this machine's only."""
  address = ipaddress.ip_address(ip.split('%')[0])
  return (getattr(address, 'ipv4_mapped', None) or address).is_loopback


def check(bind_host: str, publish_host: Optional[str]) -> None:
  """A ValueError naming the flag unless `bind_host` is an address of this machine (or every interface's)."""
  try:
    address = ipaddress.ip_address(bind_host)
  except ValueError:
    raise ValueError(f'--bind_host={bind_host} is not an IP address; accepted: 127.0.0.1 (this machine only, the '
                     f'default), 0.0.0.0 or :: (every interface), or one interface\'s address, e.g. 10.0.0.5.'
                     ) from None
  if not address.is_unspecified and not address.is_loopback:
    with socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET) as probe:
      try:
        probe.bind((bind_host, 0))
      except OSError as e:
        raise ValueError(f'--bind_host={bind_host} is not an address of this machine ({e.strerror}); give one of '
                         f'its interfaces\' addresses, 127.0.0.1, or 0.0.0.0 for every interface.') from None
  if publish_host and address.is_loopback:
    raise ValueError(f'--publish_host={publish_host} is for runs other hosts reach, but --bind_host={bind_host} '
                     f'listens on this machine only; give --bind_host too.')


def exposure(bind_host: str) -> str:
  """A warning for a run other hosts can reach, '' for one on loopback."""
  if is_loopback(bind_host):
    return ''
  where = 'every interface of this machine' if is_every_interface(bind_host) else bind_host
  return (f'--bind_host={bind_host}: the run\'s Reverb and Courier servers listen on {where}, {EXPOSED}. Keep '
          f'multi-host runs on a private network (docs/distributed.md: "Who can reach a run").')


def host_port(host: str, port) -> str:
  return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def connect_host(bind_host: str) -> str:
  """Where a run's nodes dial each other."""
  return 'localhost' if is_every_interface(bind_host) else bind_host


def published(address: str, bind_host: str, publish_host: Optional[str]) -> str:
  """A node's address (`host:port`) as other processes, and hosts, dial it."""
  host = publish_host or (socket.gethostname() if is_every_interface(bind_host) else bind_host)
  return host_port(host, address.rsplit(':', 1)[1])


class _AddressBuilder(lp_address.AbstractAddressBuilder):
  """`host:port`, the port free when the program is launched (Launchpad's own builder says `localhost`)."""

  def __init__(self, host: str):
    self._address = host_port(host, portpicker.pick_unused_port())

  def build(self) -> str:
    return self._address


class OnHost:
  """A Launchpad node's mixin: its addresses are on the run's `--bind_host` (`on_host`), which peers dial."""
  _host = 'localhost'

  def on_host(self, bind_host: str) -> 'OnHost':
    self._host = connect_host(bind_host)
    return self

  def bind_addresses(self, **kwargs) -> None:
    if kwargs:  # Vertex AI's worker pool and replica (xm_docker): the address is the replica's, from CLUSTER_SPEC.
      super().bind_addresses(**kwargs)
      return
    for address in self.addresses:
      address.bind(_AddressBuilder(self._host))


def _owned_privately(path: str, directory: bool) -> Optional[str]:
  """Why `path` is not this user's own (a regular file or a directory, not writable by group or others); None if
  it is."""
  status = os.lstat(path)
  kind = stat.S_ISDIR(status.st_mode) if directory else stat.S_ISREG(status.st_mode)
  if not kind:
    return f'{path} is not a {"directory" if directory else "regular file"}'
  if status.st_uid != os.geteuid():
    return f'{path} belongs to user {status.st_uid}, not to this one ({os.geteuid()})'
  if status.st_mode & 0o022:
    return f'{path} is writable by others (mode {stat.S_IMODE(status.st_mode):o})'
  return None


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _unverified(path: str) -> Optional[str]:
  """Why the cached library at `path` may not be used (None: it may): it and its recorded hash
  (`<path>.sha256`, written when it was built) are this user's own, and the hash is the library's."""
  if not os.path.lexists(path):
    return 'not built yet'
  for part in (path, f'{path}.sha256'):
    if not os.path.lexists(part):
      return f'{part} is missing'
    problem = _owned_privately(part, directory=False)
    if problem:
      return problem
  with open(f'{path}.sha256') as f:
    if f.read().strip() != _sha256(path):
      return f'{path} is not the library that was built there (its hash differs from {path}.sha256)'
  return None


def shim_library() -> str:
  """`bind_shim.c` built for this machine into the user cache, or the one built there before once it is verified
  (this user's own, not writable by others, its hash the one recorded at its build; else rebuilt, with a
  warning); `Unenforceable` saying why it cannot be had."""
  if not sys.platform.startswith('linux'):
    raise Unenforceable(f'{SHIM_SOURCE} is a Linux LD_PRELOAD library, and this is {sys.platform}')
  with open(SHIM_SOURCE, 'rb') as f:
    digest = hashlib.sha256(f.read() + platform.machine().encode()).hexdigest()[:16]
  folder = os.path.join(datasets.cache_dir(), 'bind_shim')
  path = os.path.join(folder, f'bind_shim-{digest}.so')
  os.makedirs(folder, mode=0o700, exist_ok=True)
  if os.lstat(folder).st_uid == os.geteuid() and not os.path.islink(folder):
    os.chmod(folder, 0o700)
  problem = _owned_privately(folder, directory=True)
  if problem:
    raise Unenforceable(f'the bind library\'s cache cannot be trusted: {problem}')
  problem = _unverified(path)
  if problem is None:
    return path
  if problem != 'not built yet':
    print(f'Warning: the cached bind library failed its check ({problem}): rebuilding it.', file=sys.stderr,
          flush=True)
  compiler = shlex.split(os.environ.get('CC', '')) or [shutil.which('cc') or shutil.which('gcc') or '']
  if not compiler[0]:
    raise Unenforceable(f'no C compiler (cc, gcc, or $CC) to build {SHIM_SOURCE}')
  partial = f'{path}.{os.getpid()}.tmp'
  try:
    result = subprocess.run([*compiler, '-shared', '-fPIC', '-O2', '-o', partial, SHIM_SOURCE, '-ldl'],
                            capture_output=True, text=True, timeout=120)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise Unenforceable(f'{compiler[0]} could not build {SHIM_SOURCE} ({e})') from e
  if result.returncode or not os.path.exists(partial):
    raise Unenforceable(f'{compiler[0]} could not build {SHIM_SOURCE}: {result.stderr.strip()[-500:]}')
  os.chmod(partial, 0o755)
  with open(f'{partial}.sha256', 'w') as f:
    f.write(_sha256(partial))
  os.replace(f'{partial}.sha256', f'{path}.sha256')
  os.replace(partial, path)
  return path


def server_environment(bind_host: str) -> Dict[str, str]:
  """The variables under which a process's servers listen on `bind_host` only ({} for every interface)."""
  if is_every_interface(bind_host):
    return {}
  try:
    library = shim_library()
  except Unenforceable as e:
    raise Unenforceable(f'--bind_host={bind_host} cannot be enforced ({e}): the run\'s Reverb and Courier servers '
                        f'will listen on every interface of this machine, {EXPOSED}. Install a C compiler, or keep '
                        f'this machine on a private network (docs/distributed.md: "Who can reach a run").') from e
  others = [path for path in re.split(r'[ :]', os.environ.get('LD_PRELOAD', '')) if path and path != library]
  return {'LD_PRELOAD': ' '.join([library, *others]), BIND_ADDRESS_ENV: bind_host}


def _preloaded(library: str) -> bool:
  with open('/proc/self/maps') as f:
    return library in f.read()


def restrict_servers(bind_host: str, this_process: bool) -> None:
  """Makes the servers of every process started from now on listen on `bind_host` only, and with `this_process`
  (local_mt: the nodes are threads of this process) this process's own.

  The loader reads LD_PRELOAD only when a process starts: this process re-executes itself under it (the same
  pid and arguments), unless it already runs under it. `Unenforceable` when it cannot.
  """
  environment = server_environment(bind_host)
  os.environ.update(environment)
  if not this_process or not environment:
    return
  library = environment['LD_PRELOAD'].split()[0]
  if _preloaded(library):
    return
  if os.environ.get(_REEXECUTED_ENV) == library:  # Run under it already, yet not loaded: no loop.
    raise Unenforceable(f'--bind_host={bind_host} cannot be enforced: the dynamic loader did not preload {library}; '
                        f'the run\'s servers will listen on every interface of this machine, {EXPOSED}.')
  os.environ[_REEXECUTED_ENV] = library
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def beyond(ip: str, bind_host: str) -> bool:
  """Whether a listening address (as psutil shows it) reaches further than `bind_host` allows: anything but
  `bind_host` itself (IPv4-mapped or not) and this machine's loopback, unless that is every interface."""
  if is_every_interface(bind_host):
    return False
  address = ipaddress.ip_address(ip.split('%')[0])
  address = getattr(address, 'ipv4_mapped', None) or address
  return not address.is_loopback and address != ipaddress.ip_address(bind_host)


def exposed_listeners(pids: Iterable[int], bind_host: str) -> List[str]:
  """Each TCP listener of these processes (a run's nodes) beyond `bind_host`, as `pid P listens on IP:PORT` (read
  from /proc: the sockets of each process's file descriptors); a process that has exited has none."""
  exposed = []
  for pid in pids:
    try:
      connections = psutil.Process(pid).net_connections(kind='tcp')
    except psutil.Error:
      continue
    exposed += [f'pid {pid} listens on {host_port(c.laddr.ip, c.laddr.port)}' for c in connections
                if c.status == psutil.CONN_LISTEN and beyond(c.laddr.ip, bind_host)]
  return exposed
