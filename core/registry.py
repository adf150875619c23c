"""One small generic registry: config names -> functions or classes.

Every family (losses, divergences, entropy estimators, calibrators, TTA methods) keeps one
``Registry`` so that ``params.yaml`` picks a method by name. Names are explicit (never
derived from ``__name__``), registering a name twice is an error, and looking up an unknown
name lists the known ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "RegistryError"]


class RegistryError(KeyError):
    """An unknown or duplicate name. Subclasses KeyError; prints its message unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps explicit names to objects of one family.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("ce")
    ... def ce(logits, targets): ...
    >>> LOSSES.get("ce") is ce
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj`` return a decorator."""
        if not isinstance(name, str) or not name:
            raise RegistryError(
                f"{self.kind} registry: a name must be a non-empty string, got {name!r}"
            )

        def add(o: T) -> T:
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} registry: {name!r} is already registered "
                    f"(to {_describe(self._entries[name])}); pick another name"
                )
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises with the known names."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries)) or '(none)'}"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the registered factory: ``get(name)(*args, **kwargs)``."""
        factory = self.get(name)
        if not callable(factory):
            raise RegistryError(f"{self.kind} {name!r} is not callable")
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _describe(obj: Callable | Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
