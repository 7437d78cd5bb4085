"""Who can reach a run: the bind library, --bind_host's checks, the published addresses.

A live run's sockets: tests/test_train_program.py's attach test (it has a live local_mp run to read them from).
"""

import errno
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from launch.program import network
from tests.conftest import ROOT, SMALL_RUN, node_processes, train

# Binds a listener of each kind to the wildcard address (and one to 127.0.0.2), printing where each is bound.
BIND_EACH = textwrap.dedent('''
    import socket
    def bound(family, host, v6only=None):
      with socket.socket(family) as s:
        if v6only is not None:
          s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        try:
          s.bind((host, 0))
        except OSError as e:
          return f'error:{e.errno}'
        return s.getsockname()[0]
    print(bound(socket.AF_INET, ''), bound(socket.AF_INET6, '', 0), bound(socket.AF_INET6, '', 1),
          bound(socket.AF_INET, '127.0.0.2'))
''')


def _bound_addresses(environment) -> list:
  result = subprocess.run([sys.executable, '-c', BIND_EACH], env={**os.environ, **environment},
                          capture_output=True, text=True, timeout=60, check=True)
  return result.stdout.split()


def _has_ipv6_loopback() -> bool:
  try:
    with socket.socket(socket.AF_INET6) as s:
      s.bind(('::1', 0))
    return True
  except OSError:
    return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason='needs IPv6 (::1) for the dual-stack cases')
def test_the_bind_library_moves_wildcard_binds_to_the_chosen_address_and_leaves_others():
  assert _bound_addresses({}) == ['0.0.0.0', '::', '::', '127.0.0.2']  # Without it: every interface.
  loopback = network.server_environment('127.0.0.1')
  assert loopback[network.BIND_ADDRESS_ENV] == '127.0.0.1'
  # IPv4 socket: the address; dual-stack: the address IPv4-mapped; IPv6-only: IPv6's loopback; a chosen one: kept.
  assert _bound_addresses(loopback) == ['127.0.0.1', '::ffff:127.0.0.1', '::1', '127.0.0.2']
  assert _bound_addresses(network.server_environment('127.0.0.2')) == ['127.0.0.2', '::ffff:127.0.0.2', '::1',
                                                                       '127.0.0.2']
  not_here = f'error:{errno.EADDRNOTAVAIL}'  # An address no socket can take (TEST-NET-3): refused, none bound.
  assert _bound_addresses(network.server_environment('203.0.113.7')) == [not_here] * 3 + ['127.0.0.2']
  assert _bound_addresses(network.server_environment('::1')) == ['127.0.0.1', '::1', '::1', '127.0.0.2']
  assert network.server_environment('0.0.0.0') == {}  # Every interface: what the servers do by themselves.


def test_local_mt_reexecutes_itself_under_the_library_keeping_its_pid():
  code = textwrap.dedent('''
      import os, socket
      from launch.program import network
      print('pid', os.getpid(), flush=True)
      network.restrict_servers('127.0.0.1', this_process=True)
      with socket.socket() as s:
        s.bind(('', 0))
        print('bound', s.getsockname()[0])
  ''')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-3000:]
  pids = [line for line in result.stdout.splitlines() if line.startswith('pid')]
  assert len(pids) == 2 and pids[0] == pids[1]  # Printed before and after the exec: one process.
  assert result.stdout.splitlines()[-1] == 'bound 127.0.0.1'


def test_bind_host_is_checked_and_addresses_are_published_for_other_hosts():
  with pytest.raises(ValueError, match='--bind_host=localhost is not an IP address'):
    network.check('localhost', None)
  with pytest.raises(ValueError, match='--bind_host=203.0.113.7 is not an address of this machine'):
    network.check('203.0.113.7', None)  # TEST-NET-3: nobody's.
  with pytest.raises(ValueError, match='--publish_host=node7'):
    network.check('127.0.0.1', 'node7')
  network.check('0.0.0.0', 'node7')
  network.check('127.0.0.2', None)
  assert network.exposure('127.0.0.1') == ''
  assert 'every interface' in network.exposure('0.0.0.0') and 'authentication' in network.exposure('::')
  assert network.published('127.0.0.1:1234', '127.0.0.1', None) == '127.0.0.1:1234'
  assert network.published('[::1]:5', '::1', None) == '[::1]:5'
  assert network.published('localhost:9', '0.0.0.0', None) == f'{socket.gethostname()}:9'
  assert network.published('localhost:9', '::', 'node7.cluster') == 'node7.cluster:9'
  assert network.connect_host('0.0.0.0') == 'localhost' and network.connect_host('::1') == '::1'
  assert [network.is_loopback(ip) for ip in ('127.0.0.1', '::1', '::ffff:127.0.0.1', '0.0.0.0', '::', '192.0.2.2',
                                             '::ffff:192.0.2.2')] == [True, True, True, False, False, False, False]


def test_the_cached_bind_library_is_used_only_once_verified(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  library = network.shim_library()
  folder = os.path.dirname(library)
  assert os.stat(folder).st_mode & 0o777 == 0o700 and os.stat(library).st_mode & 0o022 == 0
  with open(library, 'rb') as f:
    built = f.read()
  # Another library in its place (its hash differs from the one recorded at the build): rebuilt, not loaded.
  with open(library, 'wb') as f:
    f.write(b'\x7fELF planted')
  assert network.shim_library() == library
  with open(library, 'rb') as f:
    assert f.read() == built
  # Writable by others, or in a directory writable by others: rebuilt, the directory made private again.
  os.chmod(library, 0o666)
  os.chmod(folder, 0o777)
  network.shim_library()
  assert os.stat(library).st_mode & 0o777 == 0o755 and os.stat(folder).st_mode & 0o777 == 0o700
  if os.geteuid() == 0:  # Only root can give a file away: another user's library is rebuilt as this user's.
    os.chown(library, 12345, 12345)
    network.shim_library()
    assert os.stat(library).st_uid == 0
  assert _bound_addresses(network.server_environment('127.0.0.1'))[0] == '127.0.0.1'


@pytest.mark.slow
def test_without_a_compiler_a_run_refuses_to_start_unless_every_interface_is_asked_for(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))  # No library built before.
  monkeypatch.setenv('CC', str(tmp_path / 'no-such-cc'))
  with pytest.raises(network.Unenforceable, match='could not build'):
    network.server_environment('127.0.0.1')
  assert network.server_environment('0.0.0.0') == {}  # Every interface, asked for: nothing to enforce.
  result = train(str(tmp_path / 'run'), '--launch_type=local_mp', timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert '--bind_host=127.0.0.1 cannot be enforced' in result.stderr and 'Refusing to start' in result.stderr
  assert '--bind_host=0.0.0.0' in result.stderr and not os.path.exists(tmp_path / 'run')


_LISTEN = ('import socket, time\ns = socket.socket({family})\ns.bind(({host!r}, 0))\ns.listen()\n'
           'print(s.getsockname()[1], flush=True)\ntime.sleep(600)')


def test_listeners_beyond_bind_host_are_found_in_a_processs_sockets():
  listeners = {}
  try:
    for host, family in (('0.0.0.0', 'socket.AF_INET'), ('127.0.0.1', 'socket.AF_INET'),
                         ('127.0.0.2', 'socket.AF_INET'),
                         *((('::', 'socket.AF_INET6'), ('::1', 'socket.AF_INET6')) if _has_ipv6_loopback() else ())):
      process = subprocess.Popen([sys.executable, '-c', _LISTEN.format(family=family, host=host)],
                                 stdout=subprocess.PIPE, text=True)
      listeners[host] = (process, int(process.stdout.readline()))
    pids = [process.pid for process, _ in listeners.values()]
    beyond = network.exposed_listeners(pids, '127.0.0.1')
    expected = {f'pid {listeners[host][0].pid} listens on {network.host_port(host, listeners[host][1])}'
                for host in ('0.0.0.0', '::') if host in listeners}
    assert set(beyond) == expected  # Loopback addresses stay on this machine; every interface does not.
    assert network.exposed_listeners(pids, '0.0.0.0') == []  # Asked for.
    assert all(network.beyond(ip, '10.0.0.5') for ip in ('0.0.0.0', '::', '10.0.0.6', '::ffff:10.0.0.6'))
    assert not any(network.beyond(ip, '10.0.0.5') for ip in ('10.0.0.5', '::ffff:10.0.0.5', '127.0.0.1', '::1'))
  finally:
    for process, _ in listeners.values():
      process.kill()
      process.wait()


# A C compiler that builds a library with no bind() in it, whatever it is asked: the nodes listen where they like.
_IGNORING_CC = '''#!/bin/sh
while [ $# -gt 0 ]; do if [ "$1" = -o ]; then out="$2"; fi; shift; done
echo 'int unused;' | cc -shared -fPIC -x c -o "$out" -
'''


@pytest.mark.slow
def test_a_run_whose_nodes_listen_beyond_bind_host_is_stopped(tmp_path, monkeypatch):
  compiler = tmp_path / 'cc'
  compiler.write_text(_IGNORING_CC)
  compiler.chmod(0o755)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.setenv('CC', str(compiler))
  run_dir = str(tmp_path / 'run')
  flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--probe_every'))]
  result = train(run_dir, '--launch_type=local_mp', *flags, '--max_learner_steps=100000', '--probe_every=0')
  assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
  assert "The run's servers listen beyond --bind_host=127.0.0.1: pid " in result.stderr
  assert 'listens on [::]:' in result.stderr or 'listens on 0.0.0.0:' in result.stderr
  assert not node_processes(run_dir)
