"""absl flags generated from configuration dataclasses: each knob is declared once, as a field.

Every leaf field declared with `agents.config.option` (nested configuration
dataclasses are walked) becomes one flag: named by its `flag` metadata, else
by the nested config's prefix and the field's name; typed by its annotation;
its default and help the field's own. A preset is a set of values keyed by
flag name, applied to any field the same way: a flag given on the command
line wins, else the preset's value, else the field's default; `--helpfull`
shows each preset's value beside the default.

    FIELDS = config_flags.define(ExperimentConfig, presets=PRESETS)   # at import
    config = config_flags.build(ExperimentConfig, FIELDS, PRESETS['atari'])   # after parsing
"""

import dataclasses
import typing
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Type

from absl import app
from absl import flags

# Flag-name prefixes of nested configuration fields: `dataclasses.field(..., metadata={PREFIX: 'probe_'})`.
PREFIX = 'flag_prefix'
Presets = Mapping[str, Mapping[str, Any]]  # preset name -> {flag name: value}


class ConfigField(NamedTuple):
  path: Tuple[str, ...]  # Attribute path from the root config, e.g. ('probe', 'steps').
  flag: str
  kind: type  # int, float, bool, str or tuple.
  optional: bool  # None is a value.
  default: Any
  metadata: Mapping[str, Any]


def _kind(annotation: Any) -> Tuple[type, bool]:
  """(base type, whether None is allowed) of a field's annotation."""
  args = typing.get_args(annotation)
  if typing.get_origin(annotation) is typing.Union and type(None) in args:
    (inner,) = [a for a in args if a is not type(None)]
    return _kind(inner)[0], True
  if typing.get_origin(annotation) is tuple:
    return tuple, False
  return annotation, False


def fields(config_class: Type, prefix: str = '', path: Tuple[str, ...] = ()) -> List[ConfigField]:
  """Every flag-able leaf of a configuration dataclass, nested ones included."""
  found = []
  hints = typing.get_type_hints(config_class)
  for field in dataclasses.fields(config_class):
    annotation = hints[field.name]
    if dataclasses.is_dataclass(annotation):
      found.extend(fields(annotation, prefix + field.metadata.get(PREFIX, ''), path + (field.name,)))
      continue
    if 'help' not in field.metadata:
      raise TypeError(f'{config_class.__name__}.{field.name} is not declared with agents.config.option.')
    kind, optional = _kind(annotation)
    found.append(ConfigField(path + (field.name,), field.metadata['flag'] or prefix + field.name, kind, optional,
                             field.default, field.metadata))
  return found


def _help(field: ConfigField, presets: Presets, suffix: str) -> str:
  text = field.metadata['help']
  choices = field.metadata['choices']
  if field.kind is tuple and choices:
    text += f' Accepted: {", ".join(choices())}.'
  shown = [f'{name}: {values[field.flag]!r}' for name, values in presets.items() if field.flag in values]
  if shown:
    text += f' [The default depends on --preset: {"; ".join(shown)}.]'
  return text + suffix


def define(config_class: Type, presets: Presets = None, only: Optional[Sequence[str]] = None,
           overrides: bool = False, help_suffix: str = '',
           flag_values: flags.FlagValues = flags.FLAGS) -> List[ConfigField]:
  """Defines the flags of `config_class`'s fields (those named in `only`, if given).

  With `overrides`, every default is None, meaning "as the configuration it
  is applied to says" (`apply_overrides`): for commands that change a few
  settings of an existing run.
  """
  presets = presets or {}
  chosen = [f for f in fields(config_class) if only is None or f.flag in only]
  missing = set(only or ()) - {f.flag for f in chosen}
  if missing:
    raise ValueError(f'No configuration field has the flag(s) {", ".join(sorted(missing))}.')
  for field in chosen:
    default = None if overrides else field.default
    text = _help(field, presets, help_suffix)
    bounds = {key: field.metadata[key] for key in ('lower_bound', 'upper_bound') if field.metadata[key] is not None}
    choices = field.metadata['choices']
    common = dict(flag_values=flag_values)
    if field.kind is bool:
      flags.DEFINE_bool(field.flag, default, text, **common)
    elif field.kind is tuple:
      flags.DEFINE_list(field.flag, None if default is None else list(default), text, **common)
    elif field.kind is str and choices:
      flags.DEFINE_enum(field.flag, default, list(choices()), text, **common)
    elif field.kind is str:
      flags.DEFINE_string(field.flag, default, text, **common)
    elif field.kind is int:
      flags.DEFINE_integer(field.flag, default, text, **bounds, **common)
    elif field.kind is float:
      flags.DEFINE_float(field.flag, default, text, **bounds, **common)
    else:
      raise TypeError(f'Flag --{field.flag}: no flag type for {field.kind}.')
  return chosen


def _value(field: ConfigField, value: Any) -> Any:
  return tuple(value) if field.kind is tuple and value is not None else value


def _replace(config: Any, path: Tuple[str, ...], value: Any) -> Any:
  if len(path) == 1:
    return dataclasses.replace(config, **{path[0]: value})
  return dataclasses.replace(config, **{path[0]: _replace(getattr(config, path[0]), path[1:], value)})


def build(config_class: Type, defined: Sequence[ConfigField], preset: Mapping[str, Any] = None,
          flag_values: flags.FlagValues = flags.FLAGS) -> Any:
  """The configuration the parsed flags describe: given flags, else the preset's values, else the defaults."""
  preset = preset or {}
  unknown = set(preset) - {f.flag for f in defined}
  if unknown:
    raise ValueError(f'The preset sets unknown flag(s): {", ".join(sorted(unknown))}.')
  config = config_class()
  for field in defined:
    holder = flag_values[field.flag]
    value = holder.value if holder.present or field.flag not in preset else preset[field.flag]
    config = _replace(config, field.path, _value(field, value))
  return config


def apply_overrides(config: Any, defined: Sequence[ConfigField], flag_values: flags.FlagValues = flags.FLAGS) -> Any:
  """`config` with the fields whose override flags (`define(..., overrides=True)`) were given."""
  for field in defined:
    value = flag_values[field.flag].value
    if value is not None:
      config = _replace(config, field.path, _value(field, value))
  return config


def value_of(config: Any, field: ConfigField) -> Any:
  for name in field.path:
    config = getattr(config, name)
  return config


def check_command_line(argv: Sequence[str], *required: flags.FlagHolder) -> None:
  """A command's usage errors: positional arguments (absl leaves them in `argv`), or a required flag not given."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}.')
  for holder in required:
    if not holder.value:
      raise app.UsageError(f'--{holder.name} is required.')

