"""What a SeTAR search writes: the log, the progress it resumes from, the summary and the settings.

Files in the output folder:

* ``search_log.csv`` / ``search_log.json`` -- one row per candidate (columns :data:`LOG_COLUMNS`:
  step, tower, weight_type, layer (empty for W_p; ``[stage, block]`` for a Swin-V2), ratio, n_removed (singular components removed),
  criterion (the selected one's value), the parts (loss, loss_id, loss_ood, acc for loss criteria;
  auroc, aupr, fpr95 for metric criteria; empty otherwise), chosen (the step's selected
  candidate), reused (value taken from an identical earlier evaluation, not recomputed -- fast
  mode)); rewritten after every step;
* ``search_progress.json`` -- everything needed to resume: what the search depends on
  (``identity``), the committed settings, the log, counters and time; rewritten atomically after
  every step, ``"complete": true`` once the search is done;
* ``search_summary.json`` and ``best_settings.json`` (with its completion marker, see
  :mod:`locoop.setar.settings`) -- written only when the search is complete.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from locoop.engine.fileio import atomic_write_text

from .settings import PROGRESS_FORMAT, save_best_settings

__all__ = ["LOG_COLUMNS", "LOG_CSV", "LOG_JSON", "PROGRESS_FILE", "SUMMARY_FILE", "SETTINGS_FILE", "SearchProgress",
           "write_search_log", "write_progress", "read_progress", "check_identity", "write_final_outputs"]

LOG_COLUMNS = ("step", "tower", "weight_type", "layer", "ratio", "n_removed", "criterion", "loss", "loss_id",
               "loss_ood", "acc", "auroc", "aupr", "fpr95", "chosen", "reused")
LOG_CSV = "search_log.csv"
LOG_JSON = "search_log.json"
PROGRESS_FILE = "search_progress.json"
SUMMARY_FILE = "search_summary.json"
SETTINGS_FILE = "best_settings.json"

PathLike = Union[str, os.PathLike]

# The config keys behind the identity entries, named in the message of a refused resume.
_CONFIG_KEYS = {"searcher": "SETAR.SEARCHER", "weight_types": "SETAR.WEIGHT_TYPES", "ratios": "SETAR.RATIOS",
                "prune_type": "SETAR.PRUNE_TYPE", "seed": "SEED", "freeze_proj": "SETAR.FREEZE_PROJ",
                "criterion": "SETAR.CRITERION", "lambda": "SETAR.LAMBDA", "top_k": "SETAR.TOPK",
                "score": "SETAR.SCORE", "T": "OOD.T", "num_classes": "the class list"}


@dataclass
class SearchProgress:
    """The state of a search after its last completed step (``search_progress.json``).

    Attributes:
        identity: what the search's results depend on (searcher, ratios, criterion, prompts,
            backbone, validation data, ...); a resume must match it exactly.
        settings: committed ``[tower, weight_type, layer, ratio]`` entries, in visiting order.
        log: the candidate rows of the completed steps.
        num_steps: steps of the whole search.
        baseline: criterion of the unpruned model (None before the first step).
        counters: block passes and candidate counts so far.
        seconds: search time so far.
        modes: the search mode of every run that worked on it (a resumed search has several).
        resumed_at: the step index at which each resumed run started.
        complete: True once every step is done.
    """

    identity: Dict[str, Any]
    settings: List[list] = field(default_factory=list)
    log: List[dict] = field(default_factory=list)
    num_steps: int = 0
    baseline: Optional[float] = None
    counters: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    modes: List[str] = field(default_factory=list)
    resumed_at: List[int] = field(default_factory=list)
    complete: bool = False

    def to_json(self) -> str:
        return json.dumps({"format": PROGRESS_FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = PROGRESS_FILE) -> "SearchProgress":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON ({err}); delete it to start the search over") from None
        if not isinstance(doc, dict) or doc.get("format") != PROGRESS_FORMAT:
            raise ValueError(f"{source} is not the progress file of a SeTAR search; move it away or use "
                             "another --output-dir")
        doc.pop("format")
        try:
            return cls(**doc)
        except TypeError as err:
            raise ValueError(f"{source} has unexpected entries ({err}); it was written by another version: "
                             "delete it to start the search over") from None


def _cell(value) -> object:
    """A CSV cell: empty for None, ``[stage, block]`` as JSON (a Swin-V2 layer), else the value."""
    if value is None:
        return ""
    return json.dumps(list(value)) if isinstance(value, (list, tuple)) else value


def write_search_log(output_dir: PathLike, log: Sequence[dict]) -> Dict[str, Path]:
    """Write ``search_log.csv`` and ``search_log.json`` (see the module docstring for the columns)."""
    out = Path(output_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in log:
        w.writerow({k: _cell(row.get(k)) for k in LOG_COLUMNS})
    return {"csv": atomic_write_text(out / LOG_CSV, buf.getvalue()),
            "json": atomic_write_text(out / LOG_JSON, json.dumps(list(log), indent=1))}


def write_progress(output_dir: PathLike, progress: SearchProgress) -> Path:
    """Write ``search_progress.json`` atomically (a killed run leaves the previous step's)."""
    return atomic_write_text(Path(output_dir) / PROGRESS_FILE, progress.to_json())


def read_progress(output_dir: PathLike) -> Optional[SearchProgress]:
    """The progress of an earlier search in ``output_dir``, or None if there is none.

    Raises:
        ValueError: the file is not a progress file of ours or is corrupt.
    """
    path = Path(output_dir) / PROGRESS_FILE
    if not path.is_file():
        return None
    return SearchProgress.from_json(path.read_text(encoding="utf-8"), str(path))


def _describe(key: str) -> str:
    return f"{key} ({_CONFIG_KEYS[key]})" if key in _CONFIG_KEYS else key


def check_identity(progress: SearchProgress, identity: Mapping[str, Any], source: str = PROGRESS_FILE,
                   partial: bool = False) -> None:
    """Refuse to resume a search whose results depend on other values than this run's.

    Args:
        partial: compare only the entries ``identity`` has (an early check before everything is known).

    Raises:
        ValueError: listing every differing entry with both values, and what to do.
    """
    want = json.loads(json.dumps(dict(identity)))  # the form it has after a round trip through the file
    have = progress.identity
    keys = sorted(set(want) if partial else set(want) | set(have), key=lambda k: (k not in want, k))
    diff = [f"{_describe(k)}: {json.dumps(have.get(k))} there, {json.dumps(want.get(k))} now"
            for k in keys if have.get(k) != want.get(k)]
    if diff:
        raise ValueError(f"cannot resume the SeTAR search in {source}: it was run with other settings -- "
                         + "; ".join(diff) + ". Run with the same settings to resume it, or use another --output-dir "
                         "(or delete that file) to start a new search")


def write_final_outputs(output_dir: PathLike, progress: SearchProgress, summary: Mapping[str, Any]) -> Dict[str, Path]:
    """The files of a complete search: log, summary, ``best_settings.json`` (marked complete), progress.

    ``best_settings.json`` is written last but one and the progress (``complete: true``) last, so a
    kill in between leaves a progress that a rerun completes again.
    """
    out = Path(output_dir)
    paths = write_search_log(out, progress.log)
    paths["summary"] = atomic_write_text(out / SUMMARY_FILE, json.dumps(dict(summary), indent=2))
    paths["settings"] = save_best_settings(out / SETTINGS_FILE, progress.settings)
    paths["progress"] = write_progress(out, progress)
    return paths
