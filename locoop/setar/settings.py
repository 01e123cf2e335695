"""SeTAR settings: ``[[tower, weight_type, layer, ratio], ...]`` as JSON.

This is the form SeTAR's search returns (its ``lora_settings``): one entry per visited matrix,
in visiting order, including the matrices whose best ratio is ``0`` (kept so a file records the
whole search; a zero entry changes nothing when applied). ``layer`` is ``null`` for ``W_p``.
Example::

    [["visual", "W_up", 11, 0.35], ["visual", "W_up", 10, 0.0], ["text", "W_p", null, 0.1]]

Files are validated against the model before anything is applied: unknown tower or weight type,
a layer the tower does not have, a ratio outside ``[0, 1)`` or one removing every component,
and a matrix listed twice are errors naming the entry.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from locoop.engine.fileio import atomic_write_text

from .lowrank import TOWERS, WEIGHT_TYPES, LowRankEditor, check_ratio, get_linear, n_removed

__all__ = ["Setting", "validate_settings", "load_settings", "save_settings", "apply_settings", "nonzero"]

Setting = Tuple[str, str, Optional[int], float]


def _entry_error(i: int, entry, msg: str, source: str) -> ValueError:
    return ValueError(f"{source}: entry {i} {json.dumps(entry) if _jsonable(entry) else entry!r}: {msg}")


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


def validate_settings(settings: Iterable, model: Optional[nn.Module] = None,
                      source: str = "settings") -> List[Setting]:
    """Check settings and return them as a list of ``(tower, weight_type, layer, ratio)`` tuples.

    Args:
        settings: ``[[tower, weight_type, layer, ratio], ...]``.
        model: if given, layers and ratios are checked against its shapes.
        source: where the settings come from (used in messages, e.g. a file name).

    Raises:
        ValueError: naming the bad entry and the valid choices.
    """
    if isinstance(settings, (str, bytes, Mapping)) or not isinstance(settings, Iterable):
        raise ValueError(f"{source}: expected a list [[tower, weight_type, layer, ratio], ...], "
                         f"got {type(settings).__name__}")
    out: List[Setting] = []
    seen = {}
    for i, entry in enumerate(settings):
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise _entry_error(i, entry, "each entry must be [tower, weight_type, layer, ratio]", source)
        tower, weight_type, layer, ratio = entry
        if tower not in TOWERS:
            raise _entry_error(i, entry, f"unknown tower {tower!r}; valid towers: {', '.join(TOWERS)}", source)
        if weight_type not in WEIGHT_TYPES:
            raise _entry_error(i, entry, f"unknown weight type {weight_type!r}; valid weight types: "
                               f"{', '.join(WEIGHT_TYPES)}", source)
        if weight_type == "W_p":
            if layer is not None:
                raise _entry_error(i, entry, "W_p has no layer; write null", source)
        elif isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise _entry_error(i, entry, f"layer must be a block index >= 0, got {layer!r}", source)
        try:
            r = check_ratio(ratio)
        except ValueError as err:
            raise _entry_error(i, entry, str(err), source) from None
        if model is not None:
            try:
                lin = get_linear(model, tower, weight_type, layer)
                n_removed(r, tuple(lin.weight.shape), f"{tower} {weight_type}")
            except ValueError as err:
                raise _entry_error(i, entry, str(err), source) from None
        key = (tower, weight_type, layer)
        if key in seen:
            raise _entry_error(i, entry, f"this matrix is already set by entry {seen[key]}; list each matrix once",
                               source)
        seen[key] = i
        out.append((tower, weight_type, layer, r))
    return out


def load_settings(path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> List[Setting]:
    """Read and validate a settings JSON file (see :func:`validate_settings`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or invalid settings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings file {str(path)!r} not found; give the best_settings.json written by "
                                "a previous `python -m locoop setar-search` run")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); "
                         "expected [[tower, weight_type, layer, ratio], ...]") from None
    return validate_settings(data, model, source=str(path))


def save_settings(path: Union[str, os.PathLike], settings: Sequence[Sequence]) -> Path:
    """Write settings as JSON, one entry per line (atomic: temp file + rename)."""
    entries = validate_settings(settings)
    lines = ",\n".join("  " + json.dumps([t, w, l, r]) for t, w, l, r in entries)
    return atomic_write_text(path, "[\n" + lines + "\n]\n" if entries else "[]\n")


def apply_settings(editor: LowRankEditor, settings: Iterable) -> List[Setting]:
    """Validate all settings against the editor's model, then apply them in order."""
    checked = validate_settings(settings, editor.model)
    for tower, weight_type, layer, ratio in checked:
        editor.apply(tower, weight_type, layer, ratio)
    return checked


def nonzero(settings: Iterable[Sequence]) -> List[Setting]:
    """The entries with a non-zero ratio (the matrices actually pruned)."""
    return [tuple(s) for s in settings if float(s[3]) > 0]
