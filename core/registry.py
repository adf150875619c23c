"""One small generic registry: config names -> functions or classes, each with its paper.

Every family (losses, divergences, entropy estimators, calibrators, corruptions, TTA methods)
keeps one ``Registry`` so that ``params.yaml`` picks a method by name. A function is registered
under its ``__name__`` (timm's ``register_model``), so ``grep "def <name>"`` finds it; a class
takes an explicit ``name=``. Registering a name twice is an error, and looking up an unknown
name lists the known ones. ``python -m core.registry`` lists every entry with file:line and paper.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "RegistryError", "registries"]

_CATALOGUE: weakref.WeakSet[Registry] = weakref.WeakSet()
_REPO_ROOT = Path(__file__).resolve().parents[1]
_MISSING: Any = object()
# Registries that ``python -m core.registry`` imports; projects are discovered, not imported here.
CORE_FAMILIES = (
    "core.losses",
    "core.entropy",
    "core.calibration",
    "core.data.corruptions",
    "core.models",
)


class RegistryError(KeyError):
    """An unknown, duplicate or misnamed entry. Subclasses KeyError; prints its message unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to objects of one family and records each entry's paper.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register(paper="Shannon 1948")
    ... def ce(logits, targets): ...
    >>> LOSSES.get("ce") is ce, LOSSES.paper("ce")
    (True, 'Shannon 1948')
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.module = sys._getframe(1).f_globals.get("__name__", "?")  # where it is defined
        self._entries: dict[str, T] = {}
        self._papers: dict[str, str | None] = {}
        _CATALOGUE.add(self)

    def register(
        self,
        name_or_obj: Any = _MISSING,
        obj: T | None = None,
        *,
        name: str | None = None,
        paper: str | None = None,
    ) -> Any:
        """Register an object; every form below returns the object (or a decorator for it).

        ``register(fn)`` / ``@register`` / ``@register(paper=...)``: a function under its
        ``__name__``. ``@register(name="x", paper=...)``: a class (or any object) under "x".
        ``register("x", obj)`` / ``@register("x")``: the old positional form. An explicit name
        that differs from a named function's ``__name__`` raises RegistryError.
        """
        if obj is None and name_or_obj not in (_MISSING, None) and not isinstance(name_or_obj, str):
            name_or_obj, obj = _MISSING, name_or_obj  # register(fn) or a bare @register
        if name_or_obj is not _MISSING and name is not None:
            raise RegistryError(
                f"{self.kind} registry: name given twice ({name_or_obj!r}, {name!r})"
            )
        explicit = name if name_or_obj is _MISSING else name_or_obj
        if name_or_obj is None or (
            explicit is not None and not (isinstance(explicit, str) and explicit)
        ):
            raise RegistryError(
                f"{self.kind} registry: a name must be a non-empty string, got {explicit!r}"
            )
        if obj is not None:
            return self._add(explicit, obj, paper)
        return lambda o: self._add(explicit, o, paper)

    def _add(self, name: str | None, obj: T, paper: str | None) -> T:
        fn_name = _function_name(obj)
        if name is None:
            if fn_name is None:
                raise RegistryError(
                    f"{self.kind} registry: {_describe(obj)} is not a named function; "
                    "register it with an explicit name=..."
                )
            name = fn_name
        elif fn_name is not None and fn_name != name:
            raise RegistryError(
                f"{self.kind} registry: key {name!r} differs from the function's name "
                f"{fn_name!r}; register it as {fn_name!r} (or rename the function)"
            )
        if paper is not None and (not isinstance(paper, str) or not paper.strip()):
            raise RegistryError(f"{self.kind} registry: paper must be a non-empty string")
        if name in self._entries:
            raise RegistryError(
                f"{self.kind} registry: {name!r} is already registered "
                f"(to {_describe(self._entries[name])}); pick another name"
            )
        self._entries[name] = obj
        self._papers[name] = paper
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises with the known names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
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

    def paper(self, name: str) -> str | None:
        """The paper recorded for ``name`` (None when registered without one)."""
        self.get(name)
        return self._papers[name]

    def location(self, name: str) -> str:
        """``file:line`` of the entry's definition, relative to the repository root."""
        return _location(self.get(name))

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


def registries() -> list[Registry]:
    """Every live Registry, sorted by defining module then kind."""
    return sorted(_CATALOGUE, key=lambda r: (r.module, r.kind))


def _function_name(obj: Any) -> str | None:
    """The ``__name__`` of a named Python function (not a class, lambda, partial or instance)."""
    if inspect.isfunction(obj) and obj.__name__ != "<lambda>":
        return obj.__name__
    return None


def _describe(obj: Callable | Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _location(obj: Any) -> str:
    try:
        path = inspect.getsourcefile(inspect.unwrap(obj))
        line = inspect.getsourcelines(inspect.unwrap(obj))[1]
    except (TypeError, OSError):
        return "?"
    if path is None:
        return "?"
    rel = os.path.relpath(path, _REPO_ROOT)
    return f"{path if rel.startswith('..') else rel}:{line}"


def discover_project_modules(package: str = "projects") -> list[str]:
    """Modules of ``package`` whose source defines a Registry, found by reading files (no import,
    so core keeps no static import of a project)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    pattern = re.compile(r"\bRegistry\s*[\[(]")
    found = []
    for root in map(Path, spec.submodule_search_locations):
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if "core.registry" in text and pattern.search(text):
                parts = path.relative_to(root).with_suffix("").parts
                parts = parts[:-1] if parts[-1] == "__init__" else parts
                found.append(".".join((package, *parts)))
    return sorted(found)


def main() -> int:
    """Print every registry and entry: name, file:line, paper; 1 if a module failed to import."""
    failed = []
    for module in (*CORE_FAMILIES, *discover_project_modules()):
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken project must not hide the others
            failed.append(f"{module}: {type(exc).__name__}: {exc}")
    for reg in registries():
        if not len(reg):
            continue
        print(f"{reg.kind} ({reg.module}, {len(reg)} entries)")
        width = max(map(len, reg.names()))
        for name in reg.names():
            print(f"  {name:<{width}}  {reg.location(name)}  {reg.paper(name) or '(no paper)'}")
    for line in failed:
        print(f"could not import {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # run the imported module's main: its catalogue is the live one
    sys.exit(importlib.import_module("core.registry").main())
