"""A delay on links, for kernels without `netem`: a relay of Ethernet frames between pairs of interfaces.

  # In the switch's namespace (launch.simulation.netns starts it):
  python launch/simulation/link_delay.py p1:d1,p2:d2 10

Each pair is a host's link end on the switch (`p1`) and a veth whose peer is
a bridge port (`d1`): every frame read on one is written to the other `delay`
ms later, in order (a constant delay reorders nothing). Frames are read and
written with their virtio-net header (PACKET_VNET_HDR), so the veths' large
segmentation-offloaded frames and their partial checksums cross intact, as
through the bridge. At most `QUEUE_LIMIT` frames wait per direction (netem's
default limit is 1,000); more are dropped, as a full queue drops them. It
prints `ready` once its sockets are bound, and runs until SIGTERM.

Standard library only and run as a file, not as `launch.simulation.link_delay`: it starts
in a blink and holds no package's imports.
"""

import collections
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Deque, Dict, List, Tuple

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20: a socket does not read back the frames it writes.
FRAME_BYTES = 1 << 17  # A 64 KiB GSO frame with its headers fits.
QUEUE_LIMIT = 10_000


def _socket(interface: str) -> socket.socket:
  sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
  sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
  sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
  sock.bind((interface, ETH_P_ALL))
  sock.setblocking(False)
  return sock


def relay(pairs: List[Tuple[str, str]], delay_s: float) -> None:
  """Forwards frames both ways between each pair, `delay_s` late, until SIGTERM."""
  stop = []
  signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
  sockets = {name: _socket(name) for pair in pairs for name in pair}
  peer: Dict[socket.socket, socket.socket] = {}
  for a, b in pairs:
    peer[sockets[a]], peer[sockets[b]] = sockets[b], sockets[a]
  queues: Dict[socket.socket, Deque[Tuple[float, bytes]]] = {sock: collections.deque() for sock in peer}
  readable = list(peer)
  print('ready', flush=True)
  while not stop:
    now = time.monotonic()
    due = [queue[0][0] for queue in queues.values() if queue]
    timeout = max(min(due) - now, 0.0) if due else 0.5
    try:
      ready, _, _ = select.select(readable, [], [], timeout)
    except InterruptedError:
      continue
    now = time.monotonic()
    for sock in ready:
      queue = queues[peer[sock]]  # Frames read here leave by the peer.
      while True:
        try:
          frame = sock.recv(FRAME_BYTES)
        except (BlockingIOError, InterruptedError):
          break
        except OSError:  # The link went down meanwhile (a partition): its frames are lost.
          break
        if len(queue) < QUEUE_LIMIT:
          queue.append((now + delay_s, frame))
    now = time.monotonic()
    for sock, queue in queues.items():
      while queue and queue[0][0] <= now:
        _, frame = queue.popleft()
        try:
          sock.send(frame)
        except OSError:  # A link down (a partition) or a full device queue: the frame is lost, as on a wire.
          pass


def wait_ready(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
  """Waits for a relay started with stdout piped to say `ready`; a RuntimeError if it dies first."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    ready, _, _ = select.select([process.stdout], [], [], 0.5)
    if ready:
      line = process.stdout.readline()
      if line.strip() == 'ready':
        return
    if process.poll() is not None:
      raise RuntimeError(f'the link delay relay exited with {process.returncode} before it was ready')
  raise RuntimeError(f'the link delay relay was not ready within {timeout_s:.0f} s')


if __name__ == '__main__':
  relay([tuple(pair.split(':')) for pair in sys.argv[1].split(',')], float(sys.argv[2]) / 1000)
