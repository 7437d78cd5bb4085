"""When to keep steps out of compiled loops: convolutions on XLA:CPU.

XLA:CPU (jaxlib 0.4.30) lowers the backward convolutions of a step inside a
`lax.scan` / `fori_loop` body to its naive kernels instead of Eigen's: on the
Nature DQN at batch 128, three scanned gradient steps take 10.6 s against
0.8 s for the same three steps as separate calls (a loop of trip count 1 is
as slow). So on CPU, for networks with convolution kernels, the probe and the
Lanczos iteration dispatch their steps from Python (probes/measures/compiled_loops.py),
and the learner's fused calls (`--updates_per_call`) dispatch their updates
one by one, syncing once per call (unrolling them in one compiled call
instead took 6 minutes to compile for 64 Nature-DQN updates).

Here, below `probes/`, because the learner needs it too.
"""

import jax

from agents.types import Params


def has_convolutions(params: Params) -> bool:
  """Whether the network has convolution kernels (4-D parameters; shapes suffice: `jax.eval_shape`'s)."""
  return any(len(getattr(leaf, 'shape', ())) == 4 for leaf in jax.tree_util.tree_leaves(params))


def avoid_compiled_loops(params: Params) -> bool:
  """True on CPU when the network has convolution kernels."""
  return has_convolutions(params) and jax.default_backend() == 'cpu'
