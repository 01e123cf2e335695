"""Name -> object registries: one class for tiny CLIP models, trainers, datasets, scores and searchers.

Every registry is used the same way (Dassl's decorator, timm's ``list_*`` / ``get_*`` /
``create_*`` functions on top) and fails the same way: an unknown name raises
:class:`RegistryError` naming the registry, the closest registered name and all of them::

    MODELS = Registry("MODEL", kind="model", plural="models")

    @MODELS.register()               # or .register("Alias"), or MODELS.register(obj, name=...)
    class Tiny: ...

    MODELS.get("tiny")               # RegistryError: unknown model 'tiny' (MODEL registry); did you
                                     # mean 'Tiny'? valid models: Tiny

A registry may normalise names before comparing them (scores ignore case, ``-``, ``_`` and
spaces) and may accept aliases. The framework re-exports the class as
:class:`locoop.engine.registry.Registry`; it lives in the CLIP package so the tiny-model registry
uses it without the CLIP package depending on the framework.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

__all__ = ["Registry", "RegistryError"]


class RegistryError(KeyError, ValueError):
    """An unknown or doubly registered name.

    A ``KeyError`` (a failed lookup, as in Dassl) and a ``ValueError`` (a bad user value, what the
    command line reports as one line), so either ``except`` clause catches it.
    """

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


class Registry:
    """A mapping from names to objects (classes, functions or specs).

    Args:
        name: the registry's name in messages (``"TRAINER"``).
        kind: what one entry is, in messages (``"trainer"``; default: ``name`` in lower case).
        plural: plural of ``kind`` (default ``kind + "s"``).
        normalize: maps a name to the form lookups compare (default: exact names).
        aliases: extra names accepted by :meth:`get` (alias -> registered name).
    """

    def __init__(self, name: str, kind: Optional[str] = None, plural: Optional[str] = None,
                 normalize: Optional[Callable[[str], str]] = None, aliases: Optional[Mapping[str, str]] = None):
        self._name = name
        self.kind = kind or name.lower()
        self.plural = plural or f"{self.kind}s"
        self._normalize = normalize or (lambda s: s)
        self._obj_map: Dict[str, Any] = {}
        self._aliases: Dict[str, str] = {}
        for alias, target in (aliases or {}).items():
            self.add_alias(alias, target)

    @property
    def name(self) -> str:
        return self._name

    # ------------------------------------------------------------------ mapping protocol
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._resolve(name) is not None

    def __len__(self) -> int:
        return len(self._obj_map)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._obj_map))

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self._name!r}, {self.registered_names()})"

    def keys(self) -> List[str]:
        return self.registered_names()

    def values(self) -> List[Any]:
        return list(self._obj_map.values())

    def items(self):
        return list(self._obj_map.items())

    # ------------------------------------------------------------------ registration
    def _do_register(self, name: str, obj: Any, force: bool) -> None:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self._name} registry: a name must be a non-empty string, got {name!r}.")
        existing = self._resolve(name)
        if existing is not None and not force and self._obj_map[existing] is not obj:
            old = self._obj_map[existing]
            as_ = "" if existing == name else f" (as {existing!r})"
            raise RegistryError(
                f"{self.kind} {name!r} is already registered in the {self._name} registry{as_} by "
                f"{_describe(old)}; choose another name or pass force=True to replace it.")
        if existing is not None and existing != name:
            del self._obj_map[existing]
        self._obj_map[name] = obj

    def register(self, obj: Any = None, name: Optional[str] = None, force: bool = False) -> Any:
        """Register ``obj`` under ``name`` (default: its ``__name__``).

        Args:
            obj: class, function or spec; None (or a string, taken as the name) returns a decorator.
            name: registered name.
            force: replace an existing entry of the same name.

        Returns:
            ``obj`` itself, or a decorator when ``obj`` is None or a name.

        Raises:
            RegistryError: the name is taken by another object (and ``force`` is False).
        """
        if isinstance(obj, str):  # @REG.register("Alias")
            name, obj = obj, None
        if obj is None:
            def deco(o: Any) -> Any:
                self._do_register(name or o.__name__, o, force)
                return o
            return deco
        self._do_register(name or obj.__name__, obj, force)
        return obj

    def add_alias(self, alias: str, target: str) -> None:
        """Accept ``alias`` for the entry ``target`` (which may be registered later)."""
        self._aliases[self._normalize(alias)] = target

    def unregister(self, name: str) -> Any:
        """Remove and return the entry ``name`` (tests registering temporary entries use it)."""
        key = self._resolve(name)
        if key is None:
            raise self._unknown(name)
        return self._obj_map.pop(key)

    # ------------------------------------------------------------------ lookup
    def _resolve(self, name: str) -> Optional[str]:
        if name in self._obj_map:
            return name
        want = self._normalize(name)
        for key in self._obj_map:
            if self._normalize(key) == want:
                return key
        target = self._aliases.get(want)
        if target is not None and target in self._obj_map:
            return target
        return None

    def canonical_name(self, name: str) -> str:
        """The registered spelling of ``name`` (aliases and normalised spellings resolved).

        Raises:
            RegistryError: unknown name.
        """
        key = self._resolve(name) if isinstance(name, str) else None
        if key is None:
            raise self._unknown(name)
        return key

    def get(self, name: str) -> Any:
        """The object registered as ``name``.

        Raises:
            RegistryError: unknown name; the message names the registry, the closest registered
                name and all registered names.
        """
        return self._obj_map[self.canonical_name(name)]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``: instantiate a registered class or call a factory."""
        return self.get(name)(*args, **kwargs)

    def registered_names(self) -> List[str]:
        """Names in registration order."""
        return list(self._obj_map)

    def list(self, predicate: Optional[Callable[[str, Any], bool]] = None) -> List[str]:
        """Names in registration order, optionally only those with ``predicate(name, obj)``."""
        return [n for n, o in self._obj_map.items() if predicate is None or predicate(n, o)]

    def closest(self, name: str) -> Optional[str]:
        """The registered name most like ``name`` (same letters in another case first), or None."""
        names = self.registered_names()
        text = str(name)
        by_case = [n for n in names if n.lower() == text.lower()]
        if by_case:
            return by_case[0]
        normalised = {self._normalize(n): n for n in names}
        close = difflib.get_close_matches(self._normalize(text), list(normalised), n=1, cutoff=0.5)
        if close:
            return normalised[close[0]]
        close = difflib.get_close_matches(text, names, n=1, cutoff=0.5)
        return close[0] if close else None

    def _unknown(self, name: Any) -> RegistryError:
        names = self.registered_names()
        close = self.closest(name) if isinstance(name, str) else None
        hint = f"; did you mean {close!r}?" if close else ";"
        valid = ", ".join(names) if names else "none (was the module that registers them imported?)"
        return RegistryError(f"unknown {self.kind} {name!r} ({self._name} registry){hint} "
                             f"valid {self.plural}: {valid}")
