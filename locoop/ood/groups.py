"""Results grouped into near-OOD / far-OOD with per-group averages (OpenOOD v1.5's tables).

Pure functions on the results shape of :mod:`locoop.ood.results` -- ``{score: {ood_set: {metric:
fraction}}}`` -- and a group map ``{"near": [sets], "far": [sets]}`` (e.g.
:meth:`locoop.data.datasets.openood.OpenOODBenchmark.groups`). A group's average is the mean of
each metric over its sets, as OpenOOD's ``nearood`` / ``farood`` rows (``evaluator.py``,
``_eval_ood``: ``np.mean`` over the sets of the split).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["GROUP_TITLES", "group_averages", "grouped_rows", "table_metrics", "format_grouped_markdown",
           "format_grouped_table", "grouped_json"]

GROUP_TITLES = {"near": "Near-OOD", "far": "Far-OOD"}
_TITLES = {"fpr95": "FPR95 ↓", "auroc": "AUROC ↑", "aupr": "AUPR ↑", "fpr95_openood": "FPR95 (OpenOOD) ↓",
           "auroc_openood": "AUROC ↑", "aupr_in": "AUPR-In ↑", "aupr_out": "AUPR-Out ↑"}
Results = Mapping[str, Mapping[str, Mapping[str, float]]]


def _title(group: str) -> str:
    return GROUP_TITLES.get(group, f"{group} average")


def _check(results: Results, groups: Mapping[str, Sequence[str]]) -> Dict[str, List[str]]:
    """The groups restricted to the sets present; errors for unknown or doubly grouped sets."""
    if not results:
        raise ValueError("results are empty")
    sets = list(next(iter(results.values())))
    seen: Dict[str, str] = {}
    out: Dict[str, List[str]] = {}
    for g, names in groups.items():
        for n in names:
            if n in seen:
                raise ValueError(f"OOD set {n!r} is in groups {seen[n]!r} and {g!r}")
            seen[n] = g
        present = [n for n in names if n in sets]
        if present:
            out[g] = present
    ungrouped = [s for s in sets if s not in seen]
    if ungrouped:
        raise ValueError(f"OOD sets {ungrouped} belong to no group of {dict(groups)}")
    for score, per_set in results.items():
        if set(per_set) != set(sets):
            raise ValueError(f"score {score!r} has OOD sets {list(per_set)}, another score has {sets}")
    return out


def group_averages(results: Results, groups: Mapping[str, Sequence[str]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{score: {group: {metric: mean over the group's sets}}}`` (groups without a present set omitted)."""
    present = _check(results, groups)
    return {score: {g: {k: float(np.mean([per_set[s][k] for s in names])) for k in per_set[names[0]]}
                    for g, names in present.items()} for score, per_set in results.items()}


def grouped_rows(results: Results, groups: Mapping[str, Sequence[str]], overall: bool = False
                 ) -> Dict[str, List[Tuple[str, str, Dict[str, float]]]]:
    """Table rows per score: each group's sets, then its average; ``overall`` adds the mean over all sets.

    Returns:
        ``{score: [(row name, kind, metrics)]}`` with kind ``set``, ``group`` or ``overall``; group rows
        are named ``Near-OOD`` / ``Far-OOD``, the overall row ``Average``.
    """
    present = _check(results, groups)
    avgs = group_averages(results, groups)
    out: Dict[str, List[Tuple[str, str, Dict[str, float]]]] = {}
    for score, per_set in results.items():
        rows: List[Tuple[str, str, Dict[str, float]]] = []
        for g, names in present.items():
            rows += [(n, "set", dict(per_set[n])) for n in names]
            rows.append((_title(g), "group", avgs[score][g]))
        if overall:
            keys = list(next(iter(per_set.values())))
            rows.append(("Average", "overall", {k: float(np.mean([m[k] for m in per_set.values()])) for k in keys}))
        out[score] = rows
    return out


def table_metrics(results: Results) -> List[str]:
    """Columns to show: OpenOOD's four when present (``fpr95_openood``, ``auroc_openood``, ``aupr_in``,
    ``aupr_out``), else the papers' ``fpr95``, ``auroc``, ``aupr``."""
    keys = set(next(iter(next(iter(results.values())).values())))
    openood = ["fpr95_openood", "auroc_openood", "aupr_in", "aupr_out"]
    return openood if set(openood) <= keys else [k for k in ("fpr95", "auroc", "aupr") if k in keys]


def format_grouped_markdown(results: Results, groups: Mapping[str, Sequence[str]],
                            metrics: Optional[Sequence[str]] = None,
                            id_accuracy: Optional[float] = None, title: str = "OOD detection results (near / far OOD)",
                            overall: bool = False, level: int = 1) -> str:
    """Markdown tables per score, rows grouped near / far with their averages (bold), values in percent.

    ``level``: heading level of the title (the score tables' headings are one level lower).
    """
    metrics = list(metrics or table_metrics(results))
    h = "#" * int(level)
    out = [f"{h} {title}", ""]
    if id_accuracy is not None:
        out += [f"ID accuracy: {100 * float(id_accuracy):.2f}%", ""]
    positive = "OOD" if any(k in ("fpr95_openood", "aupr_out") for k in metrics) else "ID"
    out.append(f"Values in percent; group rows are the mean over the group's sets. FPR95 positive class: {positive}.")
    for score, rows in grouped_rows(results, groups, overall).items():
        out += ["", f"{h}# {score}", "", "| OOD set | " + " | ".join(_TITLES.get(k, k) for k in metrics) + " |",
                "|---|" + "---:|" * len(metrics)]
        for name, kind, m in rows:
            cells = [f"{100 * m[k]:.2f}" for k in metrics]
            if kind != "set":
                name, cells = f"**{name}**", [f"**{c}**" for c in cells]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def format_grouped_table(results: Results, groups: Mapping[str, Sequence[str]], metrics: Optional[Sequence[str]] = None,
                         overall: bool = False) -> str:
    """Plain-text version of :func:`format_grouped_markdown` for the console."""
    metrics = list(metrics or table_metrics(results))
    lines = ["values in percent; group rows = mean over the group's sets"]
    for score, rows in grouped_rows(results, groups, overall).items():
        width = max(len(r[0]) for r in rows) + 2
        lines += ["", f"[{score}]", f"{'OOD set':<{width}}" + "".join(f"{_TITLES.get(k, k):>19}" for k in metrics)]
        for name, kind, m in rows:
            label = name if kind == "set" else f"= {name}"
            lines.append(f"{label:<{width}}" + "".join(f"{100 * m[k]:>19.2f}" for k in metrics))
    return "\n".join(lines)


def grouped_json(results: Results, groups: Mapping[str, Sequence[str]]) -> Dict[str, object]:
    """The block for ``ood_results.json``: ``{"groups": {group: [sets]}, "scores": {score: {Near-OOD: {metric:
    percent}, ...}}}``."""
    present = _check(results, groups)
    avgs = group_averages(results, groups)
    return {"groups": present,
            "scores": {s: {_title(g): {k: 100.0 * v for k, v in m.items()} for g, m in per.items()}
                       for s, per in avgs.items()}}
