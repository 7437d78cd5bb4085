"""Host memory for XLA:CPU: large freed blocks kept for reuse instead of handed back to the OS.

XLA:CPU allocates every output buffer of a call afresh. glibc's malloc serves
a block above its mmap threshold (32 MiB at most) with a mapping of its own
and unmaps it when freed, so every update of a network with a large layer
pays page faults for fresh parameters, gradients and optimizer state: the
CNN's 50,176 x 256 dense weight is 51 MB. On 2 cores, a CNN update at batch
32 took 396 ms this way and 236 ms with its blocks served from the heap and
reused (`launch.benchmarks.agent --sections=fused` prints the rates).

`reuse_freed_memory` makes glibc serve every block from the heap and keep up
to `KEEP_FREED` bytes of freed memory at its top for reuse; freed memory past
that goes back to the OS as before.
"""

import ctypes
import ctypes.util
import functools
import sys

KEEP_FREED = 1 << 30  # Bytes of freed heap kept for reuse (glibc's M_TRIM_THRESHOLD).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>


@functools.lru_cache(maxsize=None)
def reuse_freed_memory() -> bool:
  """Once per process (the learner and the probes call it); True where glibc took the settings, False where
  there is no glibc (nothing changed)."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
  except (OSError, AttributeError):  # A C library without mallopt (musl).
    return False
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED))
