"""Optimizer and Lanczos steps out of compiled loops: `agents/loops.py` says when (convolutions on XLA:CPU) and
why; here the straight-line code they run in instead, each step one compiled call: the same computation, the same
keys.
"""

from typing import Any, Callable, Tuple

import jax


def scan(fn: Callable[[Any, Any], Tuple[Any, Any]], carry: Any, xs: Any, unrolled: bool) -> Tuple[Any, Any]:
  """`lax.scan(fn, carry, xs)`, or with `unrolled` the same steps in straight-line code (a trace-time loop)."""
  if not unrolled:
    return jax.lax.scan(fn, carry, xs)
  outputs = []
  for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
    carry, output = fn(carry, jax.tree_util.tree_map(lambda x: x[i], xs))
    outputs.append(output)
  return carry, jax.tree_util.tree_map(lambda *ys: jax.numpy.stack(ys), *outputs)
