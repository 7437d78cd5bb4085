"""Benchmarks printing figures side by side: learner and actors, probes, environments, cluster, device.

Each benchmark declares its flags in a `FlagValues` of its own and runs with `run`: the benchmarks import one
another's functions, and in absl's one namespace their `--seconds`, `--steps` or `--archs` would collide.
"""

import sys
from typing import Callable, List

from absl import app
from absl import flags


def run(main: Callable[[List[str]], None], own: flags.FlagValues) -> None:
  """`app.run(main)` with the benchmark's own flags added to absl's (listed by --help as the command's)."""
  for name in own:
    flags.FLAGS[name] = own[name]
    flags.FLAGS.register_flag_by_module(sys.argv[0], own[name])

  def main_with_own_flags(argv: List[str]) -> None:
    own.mark_as_parsed()
    main(argv)

  app.run(main_with_own_flags)
