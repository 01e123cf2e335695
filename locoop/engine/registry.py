"""Name -> class registries (Dassl style) for trainers, datasets and evaluators."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

__all__ = ["Registry", "TRAINER_REGISTRY", "DATASET_REGISTRY"]


class Registry:
    """A mapping from names to classes or functions.

    Use as a decorator (``@REG.register()`` / ``@REG.register("Alias")``) or directly
    (``REG.register(MyClass)``); look up with ``REG.get(name)``.
    """

    def __init__(self, name: str):
        self._name = name
        self._obj_map: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._obj_map

    def __len__(self) -> int:
        return len(self._obj_map)

    def __repr__(self) -> str:
        return f"Registry({self._name!r}, {self.registered_names()})"

    def _do_register(self, name: str, obj: Any, force: bool) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self._name} registry: a name must be a non-empty string, got {name!r}.")
        old = self._obj_map.get(name)
        if old is not None and old is not obj and not force:
            raise KeyError(
                f"'{name}' is already registered in the {self._name} registry (by "
                f"{getattr(old, '__module__', '?')}.{getattr(old, '__qualname__', old)}); "
                f"choose another name or pass force=True to replace it."
            )
        self._obj_map[name] = obj

    def register(self, obj: Any = None, name: Optional[str] = None, force: bool = False) -> Any:
        """Register ``obj`` under ``name`` (default: its ``__name__``).

        Args:
            obj: Class or function; when None (or a string, taken as the name) returns a decorator.
            name: Registered name.
            force: Replace an existing entry of the same name.

        Returns:
            ``obj`` itself, or a decorator when ``obj`` is None or a name.
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

    def get(self, name: str) -> Any:
        """Return the object registered as ``name``.

        Raises:
            KeyError: naming the registry, the closest registered name and all registered names.
        """
        if name in self._obj_map:
            return self._obj_map[name]
        names = self.registered_names()
        by_case = [n for n in names if n.lower() == str(name).lower()]
        close = by_case or difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(
            f"'{name}' is not registered in the {self._name} registry.{hint} "
            f"Registered: {names if names else 'none (was the module defining it imported?)'}."
        )

    def registered_names(self) -> list[str]:
        """Names in registration order."""
        return list(self._obj_map.keys())

    def items(self):
        return self._obj_map.items()


TRAINER_REGISTRY = Registry("TRAINER")
DATASET_REGISTRY = Registry("DATASET")


def _ensure_builtin(module: str) -> None:
    """Import a package whose import registers built-ins, if it exists."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:  # the package itself is absent: nothing to register
        if e.name != module:
            raise


# Trainers whose modules import heavy libraries (peft) are imported only when asked for.
_OPTIONAL_TRAINER_MODULES = ("locoop.setar.finetune",)


def get_trainer_class(name: str) -> Callable:
    """The trainer class registered as ``name``, importing the modules that register trainers.

    Raises:
        KeyError: unknown name (lists the registered ones and the closest match).
    """
    _ensure_builtin("locoop.trainers")
    if name not in TRAINER_REGISTRY.registered_names():
        for module in _OPTIONAL_TRAINER_MODULES:
            _ensure_builtin(module)
    return TRAINER_REGISTRY.get(name)


def build_trainer(cfg: Any, need_train: bool = True) -> Any:
    """Instantiate the trainer named by ``cfg.TRAINER.NAME``.

    Args:
        cfg: the resolved config.
        need_train: False for evaluation-only uses (eval, visualize): the training split is then
            neither required nor read.

    Raises:
        ValueError: empty TRAINER.NAME; KeyError: unknown name (lists the registered ones).
    """
    name = cfg.TRAINER.NAME
    if not name:
        _ensure_builtin("locoop.trainers")
        raise ValueError(
            f"TRAINER.NAME is empty; pass --trainer or set TRAINER.NAME to one of "
            f"{TRAINER_REGISTRY.registered_names()}."
        )
    cls = get_trainer_class(name)
    if getattr(cfg, "VERBOSE", True):
        print(f"Loading trainer: {name}")
    return cls(cfg, need_train=need_train)
