"""When to keep optimizer and Lanczos steps out of compiled loops.

XLA:CPU (jaxlib 0.4.30) lowers the backward convolutions of a step inside a
`lax.scan` / `fori_loop` body to its naive kernels instead of Eigen's: on the
Nature DQN at batch 128, three scanned gradient steps take 10.6 s against
0.8 s for the same three steps as separate calls (a loop of trip count 1 is
as slow). So on CPU, for networks with convolution kernels, the probe and the
Lanczos iteration dispatch their steps from Python, each step one compiled
call of straight-line code: the same computation, the same keys.
"""

from typing import Any, Callable, Tuple

import jax

from agents.types import Params


def avoid_compiled_loops(params: Params) -> bool:
  """True on CPU when the network has convolution kernels (4-D parameters)."""
  has_convolutions = any(jax.numpy.ndim(leaf) == 4 for leaf in jax.tree_util.tree_leaves(params))
  return has_convolutions and jax.default_backend() == 'cpu'


def scan(fn: Callable[[Any, Any], Tuple[Any, Any]], carry: Any, xs: Any, unrolled: bool) -> Tuple[Any, Any]:
  """`lax.scan(fn, carry, xs)`, or with `unrolled` the same steps in straight-line code (a trace-time loop)."""
  if not unrolled:
    return jax.lax.scan(fn, carry, xs)
  outputs = []
  for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
    carry, output = fn(carry, jax.tree_util.tree_map(lambda x: x[i], xs))
    outputs.append(output)
  return carry, jax.tree_util.tree_map(lambda *ys: jax.numpy.stack(ys), *outputs)
