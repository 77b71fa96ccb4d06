"""Decorator registries: a new method, model, loss or augmentation is one decorated function."""

from typing import Callable, Generic, TypeVar

from calibjax.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
  """Maps names to objects of one kind.

  >>> losses = Registry("loss")
  >>> @losses.register("ce")
  ... def ce(*, logits, labels): ...
  >>> losses.get("ce") is ce
  True
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def add(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} '{name}' is registered twice")
      self._entries[name] = obj
      return obj

    return add

  def get(self, name: str) -> T:
    try:
      return self._entries[name]
    except KeyError:
      raise UnknownNameError(
          f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}") from None

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
