"""Restricted, code-free loading of the pickles the papers' code writes.

The LoCoOp / CoOp training (Dassl.pytorch) writes two kinds of pickle that ``torch.load(weights_only=True)``
refuses:

* checkpoints ``prompt_learner/model.pth.tar-<epoch>`` (Dassl's ``save_checkpoint``): besides tensors they
  hold the scheduler's state, and Dassl's warm-up scheduler keeps its successor there as a real
  ``torch.optim.lr_scheduler.CosineAnnealingLR`` object, which references the ``SGD`` optimiser object;
* few-shot splits ``split_fewshot/shot_<K>-seed_<S>.pkl``: a plain pickle (not torch's format) of
  ``dassl.data.datasets.base_dataset.Datum`` objects.

Unpickling normally imports whatever a file names and calls it, so a crafted file can run any code.
Here a :class:`pickle.Unpickler` resolves names only through an *allowlist* (the "restricting globals"
recipe of the :mod:`pickle` documentation): tensors and their storages, plain containers, and the known
optimiser / scheduler / ``Datum`` classes. Those classes are never imported or run: each allowed name maps to
an inert stand-in, a :class:`ForeignObject` (a ``dict`` subclass) that records the pickled state and
nothing else. Any other name stops the load with :class:`RefusedGlobalError` before anything of the file is
called, so a ``__reduce__`` payload (``os.system``, ``builtins.open``, ``builtins.eval``, ...) never runs.

Our own files never come here: they are read with ``torch.load(weights_only=True)`` first.
"""
from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import re
import types
import zipfile
from typing import Any, Callable, Dict, Mapping, Optional

import torch

__all__ = [
    "ForeignObject", "DasslDatum", "RefusedGlobalError", "ForeignFileError", "RefusedFileError", "DamagedFileError",
    "CHECKPOINT_ALLOWLIST", "SPLIT_ALLOWLIST", "file_kind", "clean_message", "restricted_pickle_load",
    "restricted_torch_load", "load_foreign_file", "is_inert", "describe_inert",
]


class ForeignObject(dict):
    """Inert stand-in for an object of an allowed class found in a foreign pickle.

    It holds the pickled attribute dict (its ``__dict__`` / ``__getstate__`` result) as dict items and the
    original class name in :attr:`source_class`; none of that class's code is imported or run. It cannot be
    pickled again, so it never slips into one of our checkpoints.
    """

    source_class: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Reached only through a REDUCE opcode (``cls(*args)``): keep the arguments as data.
        super().__init__()
        if args:
            self["__args__"] = list(args)
        if kwargs:
            self["__kwargs__"] = dict(kwargs)

    def __setstate__(self, state: Any) -> None:
        # pickle's BUILD opcode: ``state`` or ``(state, slotstate)``.
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                if part:
                    self.update(part)
        elif isinstance(state, dict):
            self.update(state)
        else:
            self["__state__"] = state

    def __reduce_ex__(self, protocol: Any):
        raise TypeError(f"an inert stand-in for {self.source_class} cannot be pickled; store plain values instead")

    def __repr__(self) -> str:
        return f"<inert {self.source_class} {sorted(map(str, self))}>"


class DasslDatum(ForeignObject):
    """Stand-in for ``dassl.data.datasets.base_dataset.Datum`` (attributes ``_impath``, ``_label``, ...)."""

    source_class = "dassl.data.datasets.base_dataset.Datum"

    @property
    def impath(self) -> str:
        return self.get("_impath", self.get("impath", ""))

    @property
    def label(self) -> int:
        return self.get("_label", self.get("label", 0))

    @property
    def domain(self) -> int:
        return self.get("_domain", self.get("domain", 0))

    @property
    def classname(self) -> str:
        return self.get("_classname", self.get("classname", ""))


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle names a global (class or function) outside the allowlist; nothing of it was run."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refused global {name!r}")
        self.global_name = name


class ForeignFileError(ValueError):
    """Base of the errors of :func:`load_foreign_file` (a ``ValueError``: the commands print it as one line)."""


class RefusedFileError(ForeignFileError):
    """The file is intact but holds an object that is not allowed (named in :attr:`global_name`)."""

    def __init__(self, message: str, global_name: str) -> None:
        super().__init__(message)
        self.global_name = global_name


class DamagedFileError(ForeignFileError):
    """The file is truncated, not a zip archive or pickle, or its pickle is malformed."""


_STAND_INS: Dict[str, type] = {}


def _stand_in(qualname: str, base: type = ForeignObject) -> type:
    """One inert class per allowed name (so ``NEWOBJ`` can create it and the name is kept)."""
    if qualname not in _STAND_INS:
        short = qualname.rsplit(".", 1)[-1].lstrip("_") or "Object"
        _STAND_INS[qualname] = type(f"Inert{short}", (base,), {"source_class": qualname, "__module__": __name__})
    return _STAND_INS[qualname]


def _plain_dict(*_args: Any, **_kwargs: Any) -> dict:
    # ``collections.defaultdict(factory)`` -> a plain dict: the factory (a class object) is never kept or called.
    return {}


def _tensor_globals() -> Dict[str, Any]:
    out: Dict[str, Any] = {"collections.OrderedDict": collections.OrderedDict, "torch.Size": torch.Size}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        fn = getattr(torch._utils, name, None)
        if fn is not None:
            out[f"torch._utils.{name}"] = fn
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                  torch.int32, torch.int64, torch.bool):
        out[str(dtype)] = dtype
    return out


_CONTAINERS: Dict[str, Any] = {
    "builtins.dict": dict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "collections.Counter": collections.Counter,  # MultiStepLR's milestones
    "collections.defaultdict": _plain_dict,      # an optimiser's per-parameter state
}

# Optimisers and schedulers that CoOp / LoCoOp (Dassl's build_optimizer / build_lr_scheduler) can pickle.
_OPTIM_CLASSES = (
    "torch.optim.sgd.SGD", "torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.rmsprop.RMSprop",
    "torch.optim.radam.RAdam",
    "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR", "torch.optim.lr_scheduler.ExponentialLR",
    "torch.optim.lr_scheduler.ConstantLR", "torch.optim.lr_scheduler.LinearLR",
    "dassl.optim.lr_scheduler._BaseWarmupScheduler", "dassl.optim.lr_scheduler.ConstantWarmupScheduler",
    "dassl.optim.lr_scheduler.LinearWarmupScheduler",
    "dassl.optim.radam.RAdam", "dassl.optim.radam.PlainRAdam", "dassl.optim.radam.AdamW",
)

#: What a Dassl checkpoint may contain: tensors, containers, inert optimiser / scheduler stand-ins.
CHECKPOINT_ALLOWLIST: Mapping[str, Any] = types.MappingProxyType(
    {**_tensor_globals(), **_CONTAINERS, **{name: _stand_in(name) for name in _OPTIM_CLASSES}})

#: What a CoOp / LoCoOp few-shot split pickle may contain: Dassl ``Datum`` records in plain containers.
SPLIT_ALLOWLIST: Mapping[str, Any] = types.MappingProxyType({
    "collections.OrderedDict": collections.OrderedDict,
    "dassl.data.datasets.base_dataset.Datum": DasslDatum,
    "dassl.data.datasets.Datum": DasslDatum,
    "dassl.data.Datum": DasslDatum,
})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only through :attr:`allowed`; everything else raises :class:`RefusedGlobalError`."""

    allowed: Mapping[str, Any] = types.MappingProxyType({})

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names used by protocol <= 2 (torch.save's default), e.g. "__builtin__.dict".
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        try:
            return self.allowed[full]
        except KeyError:
            raise RefusedGlobalError(full) from None


def _unpickler_class(allowed: Mapping[str, Any]) -> type:
    return type("RestrictedUnpickler", (_RestrictedUnpickler,), {"allowed": allowed})


def _pickle_module(allowed: Mapping[str, Any]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose ``Unpickler`` / ``load`` are restricted (for ``torch.load``)."""
    cls = _unpickler_class(allowed)
    mod = types.ModuleType("locoop_restricted_pickle")
    mod.Unpickler = cls  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: cls(f, **kw).load()  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return mod


def restricted_pickle_load(path: str, allowed: Mapping[str, Any] = SPLIT_ALLOWLIST) -> Any:
    """Unpickle a plain pickle file resolving globals only through ``allowed``.

    Raises:
        RefusedGlobalError: the file names something outside ``allowed`` (nothing of it ran).
        pickle.UnpicklingError / EOFError / ...: the file is not a valid pickle.
    """
    with open(path, "rb") as f:
        return _unpickler_class(allowed)(f).load()


def restricted_torch_load(path: str, allowed: Mapping[str, Any] = CHECKPOINT_ALLOWLIST,
                          map_location: Any = "cpu") -> Any:
    """``torch.load`` of a torch file (zip or legacy format) whose pickle resolves globals only through ``allowed``.

    torch reads the tensor storages itself; every other global goes through the restricted unpickler.

    Raises:
        RefusedGlobalError: the file names something outside ``allowed`` (nothing of it ran).
        RuntimeError / pickle.UnpicklingError / EOFError / ...: damaged or not a torch file.
    """
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "").lower() in ("1", "y", "yes", "true"):
        raise RuntimeError("TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which makes torch refuse a restricted unpickler; "
                           "unset it to read checkpoints written by the papers' code")
    return torch.load(path, map_location=map_location, pickle_module=_pickle_module(allowed), weights_only=False)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def clean_message(text: Any, limit: int = 300) -> str:
    """``text`` as one line without terminal escape codes or control characters, at most ``limit`` characters."""
    s = _ANSI.sub("", str(text))
    s = "".join(ch if ch.isprintable() else " " for ch in s)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def file_kind(path: str) -> str:
    """``"zip"`` (torch.save's format), ``"truncated-zip"``, ``"pickle"``, ``"empty"`` or ``"other"``."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip" if zipfile.is_zipfile(path) else "truncated-zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= pickle.HIGHEST_PROTOCOL:
        return "pickle"
    return "other"


_KIND_TEXT = {
    "empty": "the file is empty",
    "truncated-zip": "it starts like a zip archive but its end is missing (cut short)",
    "other": "it is neither a zip archive (torch.save's format) nor a pickle",
}


_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a pre-zip torch.save file


def load_foreign_file(path: str, what: str, loader: Callable[[str], Any], allowed_desc: str,
                      torch_file: bool = False) -> Any:
    """Run ``loader(path)`` and turn its failures into one clear :class:`ForeignFileError`.

    Args:
        path: the file.
        what: what the file should be, for the messages (e.g. "checkpoint").
        loader: :func:`restricted_torch_load` or :func:`restricted_pickle_load` bound to an allowlist.
        allowed_desc: what such a file may hold, for the refusal message.
        torch_file: the file must be a ``torch.save`` file; a plain pickle is reported as such.

    Raises:
        RefusedFileError: the file holds an object outside the allowlist (named; nothing was executed).
        DamagedFileError: truncated, empty, not a zip / pickle, or a malformed pickle ("damaged" in the text).
        ForeignFileError: an intact plain pickle where a ``torch.save`` file was expected.
    """
    kind = file_kind(path)
    if kind in _KIND_TEXT:
        raise DamagedFileError(f"'{path}' is damaged or not a {what}: {_KIND_TEXT[kind]}. Copy or download it again.")
    try:
        if torch_file and kind == "pickle":
            with open(path, "rb") as f:  # a legacy torch file starts with its magic number; a plain pickle does not
                first = _unpickler_class({})(f).load()
            if first != _TORCH_LEGACY_MAGIC:
                raise ForeignFileError(f"'{path}' is not a {what} written by this framework or by the papers' code: "
                                       f"it is a plain pickle of a {type(first).__name__}, not a torch.save file.")
        return loader(path)
    except RefusedGlobalError as e:
        raise RefusedFileError(
            f"'{path}' is not a {what} written by this framework or by the papers' code: it contains a "
            f"'{e.global_name}' object, which such a file never holds (it may hold only {allowed_desc}). "
            f"It was not loaded and nothing in it was executed.", e.global_name) from None
    except ForeignFileError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, OSError) as e:
        detail = "a zip archive whose contents cannot be read" if kind == "zip" else "a pickle that cannot be read"
        raise DamagedFileError(f"'{path}' is damaged or not a {what} ({detail}: {type(e).__name__}: "
                               f"{clean_message(e)}). Copy or download it again.") from None


def is_inert(obj: Any) -> bool:
    """True for a :class:`ForeignObject` stand-in."""
    return isinstance(obj, ForeignObject)


def describe_inert(obj: Optional[Any]) -> str:
    """The original class name of a stand-in, or the type name of a plain value."""
    return obj.source_class if isinstance(obj, ForeignObject) else type(obj).__name__
