"""SeTAR settings: ``[[tower, weight_type, layer, ratio], ...]``, and the files that hold them.

This is the form SeTAR's search returns (its ``lora_settings``): one entry per visited matrix,
in visiting order, including the matrices whose best ratio is ``0`` (kept so a file records the
whole search; a zero entry changes nothing when applied). ``layer`` is ``null`` for ``W_p``, and a
``[stage, block]`` pair for a Swin-V2 classifier (SeTAR's naming, e.g. ``["visual", "W_up", [3, 1], 0.1]``;
a tuple once read).
Example::

    [["visual", "W_up", 11, 0.35], ["visual", "W_up", 10, 0.0], ["text", "W_p", null, 0.1]]

Settings are validated against the model before anything is applied: unknown tower or weight
type, a layer the tower does not have, a ratio that is neither in ``[0, 1)`` nor a whole number
``>= 1`` (an absolute rank, as SeTAR reads it: ``5`` removes 5 components), one removing every
component, and a matrix listed twice are errors naming the entry.

Files (:func:`load_settings`, the one reader; :data:`SETTINGS_FORMS` lists the forms it accepts):

* ``best_settings.json`` as ``setar-search`` writes it (:func:`save_best_settings`), only once the
  search is complete, carrying the completion marker::

      {"format": "locoop.setar.settings", "complete": true, "settings": [[...], ...]}

  A file of this form without ``"complete": true`` is refused, as is the search's own
  ``search_progress.json``: both mean the search did not finish (rerun it: it resumes).
* a plain list as above (written by hand, SeTAR's ``lora_settings``, ``finetune_settings.json``):
  it carries no marker and is taken as complete -- our search never writes settings in this form
  before it has finished, so only a file someone else wrote can be one.
* SeTAR's own ``config_best.json`` (and its ``config_finetune.json``) as published in its
  ``results/`` folders: the run's arguments as a JSON object whose ``lora_settings`` holds the list
  above; the other arguments are not read (the config gives them). SeTAR writes this file only
  after its search has finished. A ``lora_settings`` of ``null`` (a config before any search) is
  refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from locoop.engine.fileio import atomic_write_text

from .lowrank import TOWERS, WEIGHT_TYPES, LowRankEditor, check_ratio, get_linear, n_removed

__all__ = ["Setting", "SETTINGS_FORMAT", "PROGRESS_FORMAT", "SETTINGS_FORMS", "validate_settings", "load_settings",
           "save_settings", "save_best_settings", "apply_settings", "nonzero"]

Setting = Tuple[str, str, Optional[int], float]

SETTINGS_FORMAT = "locoop.setar.settings"  # best_settings.json of a finished search
PROGRESS_FORMAT = "locoop.setar.search_progress"  # search_progress.json of a search (see outputs.py)


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
        elif _is_stage_block(layer):  # SeTAR's Swin-V2 naming [stage, block]
            layer = tuple(int(v) for v in layer)
        elif isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise _entry_error(i, entry, f"layer must be a block index >= 0 (or a Swin-V2 [stage, block] pair), "
                               f"got {layer!r}", source)
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


def _is_stage_block(layer: Any) -> bool:
    return (isinstance(layer, (list, tuple)) and len(layer) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layer))


def _read_plain_list(data: Any, source: str) -> Any:
    return data


def _read_best_settings(data: Mapping, source: str) -> Any:
    if data.get("complete") is not True:
        raise ValueError(f"{source} is marked incomplete: the SeTAR search writing it did not finish; run the same "
                         "`python -m locoop setar-search` command again (it resumes) and use the best_settings.json "
                         "it writes when it is done")
    if "settings" not in data:
        raise ValueError(f"{source} has no 'settings' entry; expected {{\"format\": \"{SETTINGS_FORMAT}\", "
                         "\"complete\": true, \"settings\": [[tower, weight_type, layer, ratio], ...]}")
    return data["settings"]


def _is_setar_args(data: Any) -> bool:
    return isinstance(data, Mapping) and "lora_settings" in data and "format" not in data


def _read_setar_args(data: Mapping, source: str) -> Any:
    entries = data["lora_settings"]
    if entries is None:
        raise ValueError(f"{source} is a SeTAR config whose lora_settings is null (no searched settings): give the "
                         "config_best.json SeTAR's search wrote, or our setar-search's best_settings.json")
    return entries


def _read_progress(data: Mapping, source: str) -> Any:
    raise ValueError(f"{source} is the progress file of a SeTAR search, not its result; run the same "
                     "`python -m locoop setar-search` command again (it resumes or finishes) and use the "
                     "best_settings.json next to it")


def _is_ours(fmt: str) -> Callable[[Any], bool]:
    return lambda data: isinstance(data, Mapping) and data.get("format") == fmt


# (name, detect(data), read(data, source) -> entries); the first form whose detect() is true reads the file.
SETTINGS_FORMS: List[Tuple[str, Callable[[Any], bool], Callable[[Any, str], Any]]] = [
    ("plain list [[tower, weight_type, layer, ratio], ...]", lambda data: isinstance(data, list), _read_plain_list),
    (f"best_settings.json of setar-search (format {SETTINGS_FORMAT!r})", _is_ours(SETTINGS_FORMAT),
     _read_best_settings),
    ("search_progress.json (refused)", _is_ours(PROGRESS_FORMAT), _read_progress),
    ("SeTAR's config_best.json / config_finetune.json (its lora_settings)", _is_setar_args, _read_setar_args),
]


def load_settings(path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> List[Setting]:
    """Read, check and validate a settings file in one of the :data:`SETTINGS_FORMS`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, an unknown form, a file of an unfinished search, or invalid settings.
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
    for _name, detect, read in SETTINGS_FORMS:
        if detect(data):
            return validate_settings(read(data, str(path)), model, source=str(path))
    raise ValueError(f"{path}: expected a list [[tower, weight_type, layer, ratio], ...], a best_settings.json "
                     f"written by setar-search or SeTAR's config_best.json (with lora_settings), got a "
                     f"{type(data).__name__}"
                     + (f" with keys {sorted(data)[:8]}" if isinstance(data, Mapping) else ""))


def _entry_lines(entries: Sequence[Setting], indent: str) -> str:
    if not entries:
        return "[]"
    lines = ",\n".join(indent + "  " + json.dumps([t, w, list(l) if isinstance(l, tuple) else l, r])
                       for t, w, l, r in entries)
    return "[\n" + lines + "\n" + indent + "]"


def save_settings(path: Union[str, os.PathLike], settings: Sequence[Sequence]) -> Path:
    """Write settings as a plain JSON list, one entry per line (atomic: temp file + rename)."""
    return atomic_write_text(path, _entry_lines(validate_settings(settings), "") + "\n")


def save_best_settings(path: Union[str, os.PathLike], settings: Sequence[Sequence]) -> Path:
    """Write the settings of a *complete* search with its completion marker (atomic)."""
    entries = validate_settings(settings)
    text = (f'{{\n  "format": {json.dumps(SETTINGS_FORMAT)},\n  "complete": true,\n'
            f'  "settings": {_entry_lines(entries, "  ")}\n}}\n')
    return atomic_write_text(path, text)


def apply_settings(editor: LowRankEditor, settings: Iterable) -> List[Setting]:
    """Validate all settings against the editor's model, then apply them in order."""
    checked = validate_settings(settings, editor.model)
    for tower, weight_type, layer, ratio in checked:
        editor.apply(tower, weight_type, layer, ratio)
    return checked


def nonzero(settings: Iterable[Sequence]) -> List[Setting]:
    """The entries with a non-zero ratio (the matrices actually pruned)."""
    return [tuple(s) for s in settings if float(s[3]) > 0]
