"""Environments by spec string: `environments.make('mdp:mnist:easy', seed=0)`.

A spec is `family:rest`; each family (`mdp`, `atari`) registers a maker that
parses `rest`, lists its valid specs, and declares what the layers above ask
of it: the keyword options its maker takes (the experiment's configuration
has a field of each name; `launch/` passes a family only its own), the preset
of agent defaults it calls for, the specs of a spec's environment without
building it (`environments.specs`: what a node sizes its agent by, where
building would load a dataset), and, through every environment's
`data_source`, what data a run uses. So a new family is one module plus one
`register_family` call, and every bad spec is an error listing the valid ones.
"""

import importlib
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import dm_env

from environments.registry import Registry


class Specs(NamedTuple):
  """What an agent is sized by: an environment's observation spec and number of actions."""
  observation: dm_env.specs.Array
  num_actions: int


class Family(NamedTuple):
  # (spec, the spec's parts after the family name, seed, options) -> an environment with a `data_source` (str).
  make: Callable[..., dm_env.Environment]
  # Every valid spec of the family, for error messages and `--helpfull`.
  valid_specs: Callable[[], List[str]]
  # The keyword options `make` takes, e.g. ('data_dir',).
  options: Tuple[str, ...] = ()
  # The preset of agent defaults (launch/presets.py) a run of this family gets by default.
  preset: str = 'mdp'
  # (spec, the spec's parts after the family name, options) -> the environment's `Specs`, without building it (no
  # dataset read, no emulator stack); the same options as `make`'s. None: `specs` builds the environment and asks it.
  specs: Optional[Callable[..., Specs]] = None


FAMILIES: Registry = Registry('environment family', '--env')


def register_family(name: str, family: Family) -> None:
  FAMILIES.add(name, family)


def families_taking(option: str) -> List[str]:
  """The families whose maker takes a keyword option (empty: no family does)."""
  return [name for name in FAMILIES if option in FAMILIES[name].options]


def valid_specs() -> List[str]:
  return [spec for name in FAMILIES for spec in FAMILIES[name].valid_specs()]


def family(spec: str) -> Family:
  """The family of a spec; a ValueError naming --env and the valid specs for an unknown one."""
  name = spec.partition(':')[0]
  if name not in FAMILIES:
    raise ValueError(f'Unknown environment family {name!r} in --env={spec}; families: '
                     f'{", ".join(FAMILIES.names())}; valid specs: {", ".join(valid_specs())}.')
  return FAMILIES[name]


def _parts(spec: str) -> List[str]:
  rest = spec.partition(':')[2]
  return rest.split(':') if rest else []


def make(spec: str, seed: int = 0, **options: Any) -> dm_env.Environment:
  """Builds the environment a spec names; raises ValueError (naming --env) for a bad one."""
  return family(spec).make(spec, _parts(spec), seed=seed, **options)


def specs(spec: str, **options: Any) -> Specs:
  """The observation spec and number of actions of the environment a spec names, as its family declares them
  without building it (an MDP's dataset is not read); raises ValueError (naming --env) for a bad spec."""
  chosen = family(spec)
  if chosen.specs is None:  # A family that declares none: its environment, built.
    env = chosen.make(spec, _parts(spec), seed=0, **options)
    return Specs(env.observation_spec(), env.action_spec().num_values)
  return chosen.specs(spec, _parts(spec), **options)


def _imported_when_called(module: str, name: str) -> Callable[..., Any]:
  """`module.name`, imported at its first call: the packages above import this one where a family's libraries
  are absent (ale-py and OpenCV on an accelerator machine running `launch.benchmarks.device_check`)."""
  return lambda *args, **kwargs: getattr(importlib.import_module(module), name)(*args, **kwargs)


def _register_builtin_families() -> None:
  mdp, atari = 'environments.classification_mdp', 'environments.atari'
  register_family('mdp', Family(make=_imported_when_called(mdp, 'make_from_spec'),
                                valid_specs=_imported_when_called(mdp, 'valid_specs'), options=('data_dir',),
                                preset='mdp', specs=_imported_when_called(mdp, 'specs_from_spec')))
  register_family('atari', Family(make=_imported_when_called(atari, 'make_from_spec'),
                                  valid_specs=_imported_when_called(atari, 'valid_specs'),
                                  options=('sticky_action_probability',), preset='atari',
                                  specs=_imported_when_called(atari, 'specs_from_spec')))


_register_builtin_families()
