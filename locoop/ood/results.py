"""Result files of an OOD evaluation run: Markdown, CSV and JSON, written atomically.

``results`` maps score name -> OOD set name -> metrics dict with at least ``fpr95``,
``auroc``, ``aupr`` as **fractions** (the output of :func:`locoop.ood.metrics.ood_metrics`;
extra metric keys such as the OpenOOD ones are kept). The files hold **percentages**.
An ``Average`` row (the mean over the OOD sets of each metric, like the papers' "avg")
is added for every score.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from locoop.engine.fileio import atomic_write_text
from locoop.engine.provenance import environment
from locoop.ood.metrics import FPR_CONVENTION

RESULTS_FORMAT_VERSION = 1
AVERAGE = "Average"
REQUIRED_METRICS = ("fpr95", "auroc", "aupr")
# Column titles in the Markdown / console tables; arrows say which direction is better.
METRIC_TITLES = {"fpr95": "FPR95 ↓", "auroc": "AUROC ↑", "aupr": "AUPR ↑"}
MD_NAME, CSV_NAME, JSON_NAME = "ood_results.md", "ood_results.csv", "ood_results.json"

Results = Mapping[str, Mapping[str, Mapping[str, float]]]



# The environment record of results files (library versions, hardware): one helper for every run record.
collect_env = environment


def _check_results(results: Results) -> None:
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty dict {score: {ood_set: {fpr95, auroc, aupr}}}")
    for score, per_set in results.items():
        if not isinstance(per_set, Mapping) or not per_set:
            raise ValueError(f"results[{score!r}] must be a non-empty dict {{ood_set: metrics}}")
        for ood, m in per_set.items():
            if ood == AVERAGE:
                raise ValueError(f"OOD set name {AVERAGE!r} is reserved for the average row (score {score!r})")
            if not isinstance(m, Mapping):
                raise ValueError(f"results[{score!r}][{ood!r}] must be a metrics dict, got {type(m).__name__}")
            missing = [k for k in REQUIRED_METRICS if k not in m]
            if missing:
                raise ValueError(f"results[{score!r}][{ood!r}] lacks {missing}; expected the keys of "
                                 "ood_metrics(): fpr95, auroc, aupr")
            for k, v in m.items():
                if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(float(v)):
                    raise ValueError(f"results[{score!r}][{ood!r}][{k!r}] = {v!r} is not a finite number")
                if not 0.0 <= float(v) <= 1.0:
                    raise ValueError(f"results[{score!r}][{ood!r}][{k!r}] = {v!r} is outside [0, 1]; "
                                     "pass fractions (the writers convert to percent)")
        sets = list(per_set)
        keys = [tuple(per_set[o]) for o in sets]
        if any(set(k) != set(keys[0]) for k in keys):
            raise ValueError(f"results[{score!r}]: the OOD sets carry different metric keys {keys}")


def with_average(results: Results) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Copy of ``results`` with an ``Average`` row per score (mean over the OOD sets)."""
    _check_results(results)
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for score, per_set in results.items():
        rows = {ood: {k: float(v) for k, v in m.items()} for ood, m in per_set.items()}
        keys = list(next(iter(rows.values())))
        rows[AVERAGE] = {k: float(np.mean([rows[o][k] for o in per_set])) for k in keys}
        out[score] = rows
    return out


def _percent(results_avg: Mapping[str, Mapping[str, Mapping[str, float]]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    return {s: {o: {k: 100.0 * v for k, v in m.items()} for o, m in rows.items()} for s, rows in results_avg.items()}


def _resolve_accuracy(results: Mapping[str, Any], id_accuracy: Optional[float]):
    """Split an optional ``id_accuracy`` entry off ``results`` (both call styles accepted)."""
    if "id_accuracy" in results:
        inner = results["id_accuracy"]
        results = {k: v for k, v in results.items() if k != "id_accuracy"}
        if id_accuracy is not None and inner is not None and float(inner) != float(id_accuracy):
            raise ValueError(f"id_accuracy given twice with different values ({inner} and {id_accuracy})")
        id_accuracy = inner if id_accuracy is None else id_accuracy
    if id_accuracy is not None:
        a = float(id_accuracy)
        if not (math.isfinite(a) and 0.0 <= a <= 1.0):
            raise ValueError(f"id_accuracy must be a fraction in [0, 1], got {id_accuracy!r}")
        id_accuracy = a
    return results, id_accuracy


def format_table(results: Results, id_accuracy: Optional[float] = None) -> str:
    """Plain-text tables (percent, 2 decimals) for the console, one block per score.

    Args:
        results: ``{score: {ood_set: {fpr95, auroc, aupr}}}`` in fractions (an ``Average``
            row is added here) -- an ``id_accuracy`` entry is accepted too.
        id_accuracy: optional ID accuracy (fraction).
    """
    results, id_accuracy = _resolve_accuracy(results, id_accuracy)
    pct = _percent(with_average(results))
    width = max(len(AVERAGE), *(len(o) for rows in pct.values() for o in rows))
    lines = []
    if id_accuracy is not None:
        lines.append(f"ID accuracy: {100 * id_accuracy:.2f}%")
    lines.append("Positive class: ID; values in percent")
    for score, rows in pct.items():
        lines.append("")
        lines.append(f"[{score}]")
        head = f"{'OOD set':<{width}}  " + "  ".join(f"{METRIC_TITLES[k]:>8}" for k in REQUIRED_METRICS)
        lines.append(head)
        lines.append("-" * len(head))
        for ood, m in rows.items():
            lines.append(f"{ood:<{width}}  " + "  ".join(f"{m[k]:>8.2f}" for k in REQUIRED_METRICS))
    return "\n".join(lines)


def _image_counts(num_images: Optional[Mapping[str, Any]], num_skipped: Optional[Mapping[str, Any]]) -> list:
    """Rows ``(set, scored, skipped)``: the sets of either mapping, in their order (None = unknown)."""
    names = list(num_images or {}) + [k for k in (num_skipped or {}) if k not in (num_images or {})]
    rows = []
    for name in names:
        scored, skipped = (num_images or {}).get(name), (num_skipped or {}).get(name)
        rows.append((str(name), None if scored is None else int(scored), None if skipped is None else int(skipped)))
    return rows


def format_markdown(results: Results, id_accuracy: Optional[float] = None,
                    title: str = "OOD detection results", num_images: Optional[Mapping[str, Any]] = None,
                    num_skipped: Optional[Mapping[str, Any]] = None) -> str:
    """The ``ood_results.md`` text: a Markdown table per score, values in percent.

    Args:
        results: ``{score: {ood_set: metrics}}`` in fractions (an ``id_accuracy`` entry is accepted).
        id_accuracy: optional ID accuracy (fraction).
        title: the heading.
        num_images: optional ``{set: images scored}`` (the ID set included), e.g. ``meta["num_images"]``.
        num_skipped: optional ``{set: unreadable images skipped}``, e.g. ``meta["num_skipped"]``.
            With either, an "Images" table closes the file, and any skipped image is announced
            at the top: the metrics were computed without those images.
    """
    results, id_accuracy = _resolve_accuracy(results, id_accuracy)
    pct = _percent(with_average(results))
    counts = _image_counts(num_images, num_skipped)
    out = [f"# {title}", ""]
    if id_accuracy is not None:
        out.append(f"ID accuracy: {100 * id_accuracy:.2f}%")
        out.append("")
    out.append(f"Positive class: ID (in-distribution). Values in percent. FPR95 convention: {FPR_CONVENTION}.")
    skipped = [(name, k) for name, _, k in counts if k]
    if skipped:
        total = sum(k for _, k in skipped)
        out += ["", f"**{total} unreadable image{'s' if total != 1 else ''} skipped** ("
                + ", ".join(f"{k} {name}" for name, k in skipped) + "): the numbers below leave "
                f"{'them' if total != 1 else 'it'} out; the paths are in {JSON_NAME} (`meta.skipped_images`), "
                "and `DATASET.STRICT True` makes an unreadable image an error."]
    for score, rows in pct.items():
        out += ["", f"## {score}", "",
                "| OOD set | " + " | ".join(METRIC_TITLES[k] for k in REQUIRED_METRICS) + " |",
                "|---|" + "---:|" * len(REQUIRED_METRICS)]
        for ood, m in rows.items():
            out.append(f"| {ood} | " + " | ".join(f"{m[k]:.2f}" for k in REQUIRED_METRICS) + " |")
    if counts:
        out += ["", "## Images", "", "| set | images scored | skipped (unreadable) |", "|---|---:|---:|"]
        for name, scored, k in counts:
            out.append(f"| {name} | {'?' if scored is None else scored} | {'?' if k is None else k} |")
    return "\n".join(out) + "\n"


def format_csv(results: Results) -> str:
    """The ``ood_results.csv`` text: score, ood_set, fpr95, auroc, aupr[, extra metrics] in percent."""
    results, _ = _resolve_accuracy(results, None)
    pct = _percent(with_average(results))
    extra = []
    for rows in pct.values():
        for k in next(iter(rows.values())):
            if k not in REQUIRED_METRICS and k not in extra:
                extra.append(k)
    cols = list(REQUIRED_METRICS) + extra
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["score", "ood_set"] + cols)
    for score, rows in pct.items():
        for ood, m in rows.items():
            w.writerow([score, ood] + [f"{m[k]:.6f}" if k in m else "" for k in cols])
    return buf.getvalue()


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    try:  # yacs CfgNode and other mappings
        return dict(o)
    except (TypeError, ValueError):
        return str(o)


def build_results_json(results: Results, meta: Optional[Mapping[str, Any]] = None,
                       id_accuracy: Optional[float] = None, groups: Optional[Mapping[str, Any]] = None,
                       bootstrap: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``ood_results.json`` document (percentages, averages, conventions, metadata).

    ``groups`` (``{"near": [sets], "far": [sets]}``) adds ``groups``: the sets of each group and every
    score's group averages (:func:`locoop.ood.groups.grouped_json`); ``bootstrap`` (a
    :func:`locoop.ood.bootstrap.bootstrap_benchmark` block) is stored as ``bootstrap``.
    """
    results, id_accuracy = _resolve_accuracy(results, id_accuracy)
    meta = dict(meta or {})
    if "env" not in meta:
        meta["env"] = collect_env(meta.get("device"))
    doc = {
        "format_version": RESULTS_FORMAT_VERSION,
        "units": "percent",
        "positive_class": "ID",
        "fpr_convention": FPR_CONVENTION,
        "id_accuracy": None if id_accuracy is None else 100.0 * id_accuracy,
        "scores": _percent(with_average(results)),
    }
    if groups:
        from locoop.ood.groups import grouped_json

        doc["groups"] = grouped_json(results, groups)
    if bootstrap:
        doc["bootstrap"] = dict(bootstrap)
    doc["meta"] = meta
    return doc


def _extra_markdown(results: Results, groups: Optional[Mapping[str, Any]],
                    bootstrap: Optional[Mapping[str, Any]]) -> str:
    """The grouped near / far tables and the bootstrap intervals appended to ``ood_results.md``."""
    parts = []
    if groups:
        from locoop.ood.groups import format_grouped_markdown

        parts.append(format_grouped_markdown(results, groups, title="Near-OOD / far-OOD", level=2))
    if bootstrap:
        from locoop.ood.bootstrap import format_intervals_markdown

        parts.append(format_intervals_markdown(bootstrap, title="Bootstrap confidence intervals over images",
                                               level=2))
    return "".join("\n" + p for p in parts)


def write_results(run_dir: Union[str, Path], results: Results, meta: Optional[Mapping[str, Any]] = None,
                  id_accuracy: Optional[float] = None, groups: Optional[Mapping[str, Any]] = None,
                  bootstrap: Optional[Mapping[str, Any]] = None) -> Dict[str, Path]:
    """Write ``ood_results.md``, ``ood_results.csv`` and ``ood_results.json`` into ``run_dir``.

    Args:
        run_dir: output folder (created if needed).
        results: ``{score: {ood_set: {fpr95, auroc, aupr, ...}}}`` as fractions; may also
            contain ``"id_accuracy": fraction``.
        meta: reproducibility data stored under ``"meta"`` in the JSON. Conventional keys:
            ``config`` (resolved config dict), ``classnames_file``, ``classnames_hash``,
            ``split_file``, ``split_hash``, ``num_images`` ({set: count}, ID included),
            ``num_skipped`` ({set: unreadable images skipped}), ``T``, ``device``, ``env``
            (filled with :func:`collect_env` when absent). Must be JSON-serialisable
            (paths, numpy values and config nodes are converted).
        id_accuracy: ID top-1 accuracy as a fraction (alternative to the results entry).
        groups: ``{"near": [sets], "far": [sets]}`` of an image-list benchmark (OpenOOD v1.5): the
            Markdown gets the tables grouped near / far with their averages, the JSON ``groups``.
        bootstrap: per-run bootstrap intervals (:func:`locoop.ood.bootstrap.bootstrap_benchmark`):
            the JSON's ``bootstrap``, a Markdown section.

    Returns:
        ``{"md": path, "csv": path, "json": path}``.

    Raises:
        ValueError: malformed results (missing metric, value outside [0, 1], reserved
            set name ``Average``), checked before anything is written.
    """
    results, id_accuracy = _resolve_accuracy(results, id_accuracy)
    doc = build_results_json(results, meta, id_accuracy, groups, bootstrap)  # validates first
    md = format_markdown(results, id_accuracy, num_images=(meta or {}).get("num_images"),
                         num_skipped=(meta or {}).get("num_skipped")) + _extra_markdown(results, groups, bootstrap)
    text_csv = format_csv(results)
    text_json = json.dumps(doc, indent=2, default=_json_default, ensure_ascii=False) + "\n"
    run_dir = Path(run_dir)
    return {
        "md": atomic_write_text(run_dir / MD_NAME, md),
        "csv": atomic_write_text(run_dir / CSV_NAME, text_csv),
        "json": atomic_write_text(run_dir / JSON_NAME, text_json),
    }


def read_results(path: Union[str, Path]) -> Dict[str, Any]:
    """Load an ``ood_results.json`` (a run folder or the file itself) and check its shape.

    Raises:
        FileNotFoundError: no results file there.
        ValueError: not a results document of a known format.
    """
    p = Path(path)
    if p.is_dir():
        p = p / JSON_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no {JSON_NAME} at {p}; run the OOD evaluation first, or pass the run "
                                f"folder that contains {JSON_NAME}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "scores" not in doc or doc.get("format_version") != RESULTS_FORMAT_VERSION:
        raise ValueError(f"{p} is not an ood_results.json of format version {RESULTS_FORMAT_VERSION} "
                         "(missing 'scores' or other format_version)")
    return doc
