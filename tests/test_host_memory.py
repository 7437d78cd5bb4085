"""agents/host_memory.py: a large buffer XLA:CPU frees stays in the heap for the next one, instead of being
unmapped (and faulted in afresh by the next call)."""

import ctypes
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, command_env

MIB = 1 << 20

# Prints glibc's mallinfo2 (bytes in mmapped blocks, free bytes held in the heap) before a jitted call, with
# its 64 MiB output alive, and once the output is freed.
PROGRAM = r'''
import ctypes, json, sys
from agents import host_memory
if sys.argv[1] == 'reuse':
  assert host_memory.reuse_freed_memory()
import jax, jax.numpy as jnp

class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                                   'fsmblks', 'uordblks', 'fordblks', 'keepcost')]

libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = MallInfo2
info = lambda: {'mapped': libc.mallinfo2().hblkhd, 'free_in_heap': libc.mallinfo2().fordblks}
make = jax.jit(lambda scale: jnp.full((16 << 20,), scale, jnp.float32))  # 64 MiB.
jax.block_until_ready(make(1.0))  # Compiled; its output freed.
before = info()
out = jax.block_until_ready(make(2.0))
alive = info()
del out
print(json.dumps({'before': before, 'alive': alive, 'freed': info()}))
'''


def _mallinfo(mode: str) -> dict:
  done = subprocess.run([sys.executable, '-c', PROGRAM, mode], cwd=ROOT, env=command_env(), capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), 'mallinfo2'), reason='needs glibc >= 2.33 (mallinfo2)')
def test_a_freed_64_mib_output_is_kept_in_the_heap_for_reuse_instead_of_unmapped():
  default = _mallinfo('default')
  # glibc's default: the output is a mapping of its own, unmapped when freed.
  assert default['alive']['mapped'] - default['before']['mapped'] >= 64 * MIB
  assert default['freed']['mapped'] - default['before']['mapped'] < MIB
  reuse = _mallinfo('reuse')
  # Reused: no mapping; the heap holds the freed 64 MiB (the second call's output took the first one's).
  assert reuse['alive']['mapped'] - reuse['before']['mapped'] < MIB
  assert reuse['before']['free_in_heap'] >= 64 * MIB
  assert reuse['freed']['free_in_heap'] >= 64 * MIB
