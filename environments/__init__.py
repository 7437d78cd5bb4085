"""Environments by spec string: `environments.make('mdp:mnist:easy', seed=0)`.

A spec is `family:rest`; each family (`mdp`, `atari`) registers a maker
that parses `rest` and lists its valid specs, so a new family is one module
plus one `register_family` call, and every bad spec is an error listing the
valid ones.
"""

from typing import Callable, Dict, List, NamedTuple

import dm_env


class Family(NamedTuple):
  # (the spec's parts after the family name, seed, options) -> environment
  make: Callable[..., dm_env.Environment]
  # Every valid spec of the family, for error messages and `--helpfull`.
  valid_specs: Callable[[], List[str]]


FAMILIES: Dict[str, Family] = {}


def register_family(name: str, family: Family) -> None:
  FAMILIES[name] = family


def valid_specs() -> List[str]:
  return [spec for name in sorted(FAMILIES) for spec in FAMILIES[name].valid_specs()]


def make(spec: str, seed: int = 0, **options) -> dm_env.Environment:
  """Builds the environment a spec names; raises ValueError (naming --env) for a bad one."""
  family, _, rest = spec.partition(':')
  if family not in FAMILIES:
    raise ValueError(f'Unknown environment family {family!r} in --env={spec}; families: '
                     f'{", ".join(sorted(FAMILIES))}; valid specs: {", ".join(valid_specs())}.')
  return FAMILIES[family].make(spec, rest.split(':') if rest else [], seed=seed, **options)


def _register_builtin_families() -> None:
  from environments import atari, classification_mdp
  register_family('mdp', Family(make=classification_mdp.make_from_spec, valid_specs=classification_mdp.valid_specs))
  register_family('atari', Family(make=atari.make_from_spec, valid_specs=atari.valid_specs))


_register_builtin_families()
