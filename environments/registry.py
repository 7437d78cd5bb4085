"""A named registry: one lookup, one 'Unknown ...' error, for every kind of pluggable piece.

Architectures, output encodings, optimizer presets and interventions (and the
environment families) are each a `Registry` of small functions, so that adding
one is a decorated function and a bad name is the same error everywhere:
naming the flag that took it and every accepted value. Pure Python: any
package may import it.
"""

from typing import Callable, Dict, Generic, Iterator, List, Optional, TypeVar

T = TypeVar('T')


class Registry(Generic[T]):
  """Entries of one kind by name; iterating yields the names (sorted), as `sorted(dict)` did.

  `kind` and `flag` only word the error: `Registry('architecture', '--arch')`
  says "Unknown architecture 'lstm' (--arch); accepted: cnn, mlp, ...". A
  name is registered once: a second registration is an error, not a silent
  replacement.
  """

  def __init__(self, kind: str, flag: Optional[str] = None):
    self.kind = kind
    self.flag = flag
    self._entries: Dict[str, T] = {}

  def add(self, name: str, entry: T) -> T:
    if name in self._entries:
      raise ValueError(f'{self.kind} {name!r} is registered twice.')
    self._entries[name] = entry
    return entry

  def register(self, name: str) -> Callable[[T], T]:
    """A decorator: `@REGISTRY.register('name')` adds the function under `name` and returns it unchanged."""
    return lambda entry: self.add(name, entry)

  def get(self, name: str) -> T:
    if name not in self._entries:
      where = f' ({self.flag})' if self.flag else ''
      raise ValueError(f'Unknown {self.kind} {name!r}{where}; accepted: {", ".join(self.names())}.')
    return self._entries[name]

  def names(self) -> List[str]:
    return sorted(self._entries)

  def __getitem__(self, name: str) -> T:
    return self.get(name)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)
