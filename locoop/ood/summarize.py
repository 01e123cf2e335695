"""Mean and standard deviation of several runs' ``ood_results.json`` (e.g. seeds 1-3).

The papers report the mean over 3 seeds. The standard deviation here is the
**population** one (``ddof=0``, ``numpy.std``'s default, as CoOp/Dassl's
``parse_test_res.py`` does); pass ``ddof=1`` for the sample one. Every summary states
which.
"""
from __future__ import annotations

import glob as _glob
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from locoop.ood.results import AVERAGE, JSON_NAME, REQUIRED_METRICS, METRIC_TITLES, atomic_write_text, read_results

SUMMARY_FORMAT_VERSION = 1
SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"
PathLike = Union[str, Path]


def find_result_files(paths: Iterable[PathLike] = (), pattern: Optional[str] = None) -> List[Path]:
    """Result files named by run folders / JSON paths and by a glob pattern, de-duplicated.

    Args:
        paths: run folders containing ``ood_results.json``, or the JSON files themselves.
        pattern: glob (``**`` allowed) matching run folders or JSON files.

    Raises:
        FileNotFoundError: a path without results, or a pattern matching none.
    """
    found: List[Path] = []
    for p in paths:
        p = Path(p)
        f = p / JSON_NAME if p.is_dir() else p
        if not f.is_file():
            hint = (f"; to search below it use --glob '{p}/**/{JSON_NAME}'" if p.is_dir() else "")
            raise FileNotFoundError(f"no {JSON_NAME} at {f}{hint}")
        found.append(f)
    if pattern:
        matches = sorted(_glob.glob(pattern, recursive=True))
        files = [Path(m) / JSON_NAME if Path(m).is_dir() else Path(m) for m in matches]
        files = [f for f in files if f.is_file() and f.name == JSON_NAME]
        if not files:
            raise FileNotFoundError(f"the pattern {pattern!r} matches no {JSON_NAME} (nor folders containing one)")
        found += files
    unique: List[Path] = []
    seen = set()
    for f in found:  # the same run twice would silently weigh it double
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _mean_std(values: Sequence[float], ddof: int) -> Dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=ddof)) if a.size > ddof else float("nan")
    return {"mean": float(a.mean()), "std": std, "values": [float(v) for v in a]}


def _structure(doc: Mapping[str, Any]) -> Dict[str, Dict[str, List[str]]]:
    return {s: {o: sorted(m) for o, m in rows.items()} for s, rows in doc["scores"].items()}


def _check_same(docs: Sequence[Mapping[str, Any]], files: Sequence[Path]) -> None:
    ref, ref_f = docs[0], files[0]
    ref_struct = _structure(ref)
    for doc, f in zip(docs[1:], files[1:]):
        for key in ("units", "positive_class", "fpr_convention"):
            if doc.get(key) != ref.get(key):
                raise ValueError(f"{f} has {key} = {doc.get(key)!r} but {ref_f} has {ref.get(key)!r}; "
                                 "runs evaluated under different conventions cannot be averaged")
        struct = _structure(doc)
        if set(struct) != set(ref_struct):
            raise ValueError(f"{f} has scores {sorted(struct)} but {ref_f} has {sorted(ref_struct)}; "
                             "evaluate every run with the same OOD.SCORES")
        for s in ref_struct:
            if set(struct[s]) != set(ref_struct[s]):
                only_a = sorted(set(struct[s]) - set(ref_struct[s]))
                only_b = sorted(set(ref_struct[s]) - set(struct[s]))
                raise ValueError(f"score {s!r}: OOD sets differ between {f} (extra {only_a}) and {ref_f} "
                                 f"(extra {only_b}); evaluate every run on the same OOD.DATASETS")
            for o in ref_struct[s]:
                if struct[s][o] != ref_struct[s][o]:
                    raise ValueError(f"score {s!r}, set {o!r}: metrics {struct[s][o]} in {f} but "
                                     f"{ref_struct[s][o]} in {ref_f}")
    has_acc = [d.get("id_accuracy") is not None for d in docs]
    if any(has_acc) and not all(has_acc):
        missing = [str(f) for f, h in zip(files, has_acc) if not h]
        raise ValueError(f"ID accuracy is missing in {missing} but present in the other runs")


def summarize_runs(paths: Sequence[PathLike], output_dir: Optional[PathLike] = None, ddof: int = 0) -> Dict[str, Any]:
    """Average several runs' ``ood_results.json`` per score, OOD set and metric.

    Args:
        paths: run folders or ``ood_results.json`` files (at least one).
        output_dir: if given, ``summary.md`` and ``summary.json`` are written there.
        ddof: 0 = population standard deviation (default), 1 = sample.

    Returns:
        The summary: ``scores[score][set][metric] = {"mean", "std", "values"}`` in percent
        (the ``Average`` row included), ``id_accuracy`` likewise, the run files, and
        ``files`` (written paths) when ``output_dir`` was given.

    Raises:
        ValueError: no runs, or runs with different scores / OOD sets / conventions.
        FileNotFoundError: a path without ``ood_results.json``.
    """
    files = find_result_files(paths)
    if not files:
        raise ValueError("no runs given: pass run folders containing ood_results.json")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof}")
    docs = [read_results(f) for f in files]
    _check_same(docs, files)

    ref = docs[0]
    scores: Dict[str, Dict[str, Dict[str, Dict[str, Any]]]] = {}
    for s, rows in ref["scores"].items():
        scores[s] = {}
        for o, metrics in rows.items():
            scores[s][o] = {k: _mean_std([d["scores"][s][o][k] for d in docs], ddof) for k in metrics}
    acc = None
    if ref.get("id_accuracy") is not None:
        acc = _mean_std([d["id_accuracy"] for d in docs], ddof)
    summary: Dict[str, Any] = {
        "format_version": SUMMARY_FORMAT_VERSION,
        "units": ref.get("units", "percent"),
        "positive_class": ref.get("positive_class"),
        "fpr_convention": ref.get("fpr_convention"),
        "std": "population (ddof=0)" if ddof == 0 else "sample (ddof=1)",
        "n_runs": len(files),
        "runs": [str(f) for f in files],
        "id_accuracy": acc,
        "scores": scores,
    }
    if output_dir is not None:
        out = Path(output_dir)
        summary["files"] = {
            "md": str(atomic_write_text(out / SUMMARY_MD, format_summary_markdown(summary))),
            "json": str(atomic_write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")),
        }
    return summary


def _cell(ms: Mapping[str, float]) -> str:
    return f"{ms['mean']:.2f} ± {ms['std']:.2f}"


def format_summary_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown tables of a summary: ``mean ± std`` per OOD set and metric, in percent."""
    out = [f"# OOD detection results: mean ± std over {summary['n_runs']} runs", ""]
    if summary.get("id_accuracy") is not None:
        out += [f"ID accuracy: {_cell(summary['id_accuracy'])}%", ""]
    out.append(f"Positive class: {summary.get('positive_class')}. Values in percent. "
               f"Standard deviation: {summary['std']}. FPR95 convention: {summary.get('fpr_convention')}.")
    out += ["", "Runs:"] + [f"- {r}" for r in summary["runs"]]
    for s, rows in summary["scores"].items():
        keys = [k for k in REQUIRED_METRICS if k in next(iter(rows.values()))]
        out += ["", f"## {s}", "",
                "| OOD set | " + " | ".join(METRIC_TITLES.get(k, k) for k in keys) + " |",
                "|---|" + "---:|" * len(keys)]
        for o, m in rows.items():
            out.append(f"| {o} | " + " | ".join(_cell(m[k]) for k in keys) + " |")
    return "\n".join(out) + "\n"


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """Console text of a summary (the ``Average`` row of every score plus all sets)."""
    lines = [f"{summary['n_runs']} runs; values in percent, mean ± std ({summary['std']})"]
    if summary.get("id_accuracy") is not None:
        lines.append(f"ID accuracy: {_cell(summary['id_accuracy'])}")
    for s, rows in summary["scores"].items():
        width = max(len(AVERAGE), *(len(o) for o in rows))
        lines += ["", f"[{s}]",
                  f"{'OOD set':<{width}}  " + "  ".join(f"{METRIC_TITLES[k]:>15}" for k in REQUIRED_METRICS)]
        for o, m in rows.items():
            lines.append(f"{o:<{width}}  " + "  ".join(f"{_cell(m[k]):>15}" for k in REQUIRED_METRICS))
    return "\n".join(lines)
