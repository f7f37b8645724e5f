"""Named extension points: every dataset, compositor, fusion rule and stage objective is registered once, by name,
in the ``Registry`` of its kind, and found there by configs, the model, the index and the jobs (no ``if name == ...``
chains elsewhere).

    from detailfusion.library.model.fusion import FUSION_RULES, FusionRule
    FUSION_RULES.register("my_rule", FusionRule(...))        # or @COMPOSITORS.register("mine") on a class

The built-in entries are registered by the module that defines the registry (its ``home``), so importing a registry
gives the full list. Entries registered by code outside ``detailfusion`` (a user's module, a test file) are
``extensions()``: the platform ships them with each job to its Ray processes (Train workers, Tune trials, encoder
actors, Serve replicas), which ``install`` them before anything looks them up; an entry must pickle (a class or a
function at a module's top level, or a dataclass holding such functions).
"""

from __future__ import annotations

import importlib
import sys
from typing import Generic, TypeVar

from detailfusion.library.errors import ConfigError

T = TypeVar("T")

_REGISTRIES: dict[str, "Registry"] = {}


class Registry(Generic[T]):
    """Entries of one kind by name."""

    def __init__(self, kind: str, home: str):
        """``home``: the module defining this registry (``__name__``), imported by a worker to ``install`` it."""
        if kind in _REGISTRIES:
            raise ValueError(f"a registry of {kind}s exists already")
        self.kind, self.home, self._entries = kind, home, {}
        self._origin: dict[str, str] = {}  # name -> the module that registered it ("shipped": installed here)
        _REGISTRIES[kind] = self

    def register(self, name: str, entry: T | None = None, *, replace: bool = False):
        """Add ``entry`` under ``name`` (returns it); without ``entry``, a decorator. A taken name is refused
        unless ``replace``."""
        if entry is None:
            return lambda found: self.register(name, found, replace=replace)
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries and not replace and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered already ({self._entries[name]!r}); "
                             "pass replace=True to override it")
        self._entries[name] = entry
        self._origin[name] = _caller_module()
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        self._origin.pop(name, None)

    def get(self, name: str, where: str = "") -> T:
        """The entry of ``name``; an unknown name raises ConfigError naming ``where`` and every registered name."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            at = f"{where}: " if where else ""
            raise ConfigError(f"{at}unknown {self.kind} {name!r}; registered: {', '.join(self.names())}") from None

    def check(self, name: str, where: str = "") -> str:
        """``name`` itself when registered (for config validation)."""
        self.get(name, where)
        return name

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def extensions(self) -> dict[str, T]:
        """The entries registered by code outside the ``detailfusion`` package (or shipped here from a driver)."""
        return {n: e for n, e in self._entries.items() if not self._origin[n].startswith("detailfusion.")}


def _caller_module() -> str:
    """The module of the first frame outside this one (the code that registered an entry)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def extensions() -> list[tuple[str, str, dict]]:
    """(home module, kind, {name: entry}) of every registry's extensions: what a job ships to its workers."""
    return [(reg.home, kind, found) for kind, reg in _REGISTRIES.items() if (found := reg.extensions())]


def install(shipped: list[tuple[str, str, dict]] | None) -> None:
    """Register the driver's ``extensions()`` in this process (a Ray worker), replacing same-named entries."""
    for home, kind, entries in shipped or ():
        importlib.import_module(home)
        registry = _REGISTRIES[kind]
        for name, entry in entries.items():
            registry.register(name, entry, replace=True)
            registry._origin[name] = "shipped"  # still an extension here: a trial ships it on to its Train workers
