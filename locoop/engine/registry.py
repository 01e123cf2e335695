"""The trainer and dataset registries (Dassl's names) and ``build_trainer``.

One registry class (:class:`Registry`, from :mod:`clip.registry`) serves trainers, datasets,
evaluators, OOD scores, SeTAR searchers and tiny CLIP models; see docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from typing import Any, Callable, List

from clip.registry import Registry, RegistryError

__all__ = ["Registry", "RegistryError", "TRAINER_REGISTRY", "DATASET_REGISTRY", "list_trainers", "get_trainer_class",
           "build_trainer"]

TRAINER_REGISTRY = Registry("TRAINER", kind="trainer")
DATASET_REGISTRY = Registry("DATASET", kind="dataset")


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


def list_trainers() -> List[str]:
    """Names of every registered trainer (the built-in ones and the optional SeTAR+FT ones included)."""
    _ensure_builtin("locoop.trainers")
    for module in _OPTIONAL_TRAINER_MODULES:
        _ensure_builtin(module)
    return TRAINER_REGISTRY.registered_names()


def get_trainer_class(name: str) -> Callable:
    """The trainer class registered as ``name``, importing the modules that register trainers.

    Raises:
        RegistryError (a KeyError and a ValueError): unknown name (lists the registered ones and
        the closest match).
    """
    _ensure_builtin("locoop.trainers")
    if name not in TRAINER_REGISTRY:
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
        ValueError: empty TRAINER.NAME; RegistryError: unknown name (lists the registered ones).
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
