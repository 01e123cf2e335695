"""Score histograms and ROC curves (PNG) of an OOD evaluation.

Figures are built with matplotlib's object API on the Agg canvas: no pyplot state, no
GUI backend, nothing left open after saving, and the caller's backend choice untouched.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np

ArrayLike = Union[np.ndarray, list, tuple]


def _new_figure(figsize=(6.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    fig.clear()  # release the artists now rather than at garbage collection
    return path


def safe_name(text: str) -> str:
    """File-name-safe version of a score or data set name ('GL-MCM' stays 'GL-MCM')."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return s or "unnamed"


def _finite(x: ArrayLike, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{what} is empty: nothing to plot")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN/inf scores")
    return a


def plot_score_histograms(id_scores: ArrayLike, ood_scores_by_set: Mapping[str, ArrayLike], score_name: str,
                          out_dir: Union[str, Path], bins: Optional[int] = None) -> List[Path]:
    """One PNG per OOD set: density histograms of ID and OOD scores on shared bins.

    Args:
        id_scores: scores of the ID test set (higher = more ID).
        ood_scores_by_set: ``{ood_set_name: scores}``.
        score_name: used in the title and the file name ``hist_<score>_<set>.png``.
        out_dir: output folder (created if needed).
        bins: number of bins spanning the union of the ID and that set's OOD scores;
            None = ``2 * sqrt(n)`` clipped to [10, 100] (n = ID + OOD count).

    Returns:
        The written paths, in the order of ``ood_scores_by_set``.
    """
    if not ood_scores_by_set:
        raise ValueError("ood_scores_by_set is empty: give at least one OOD set")
    if bins is not None and int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    id_a = _finite(id_scores, "id_scores")
    out_dir = Path(out_dir)
    paths = []
    for name, scores in ood_scores_by_set.items():
        ood_a = _finite(scores, f"OOD scores of {name!r}")
        lo = min(id_a.min(), ood_a.min())
        hi = max(id_a.max(), ood_a.max())
        if hi <= lo:  # all scores equal: give the single bar some width
            lo, hi = lo - 0.5, hi + 0.5
        n_bins = int(bins) if bins is not None else int(np.clip(np.ceil(2 * np.sqrt(id_a.size + ood_a.size)), 10, 100))
        edges = np.linspace(lo, hi, n_bins + 1)
        fig = _new_figure()
        ax = fig.add_subplot(1, 1, 1)
        ax.hist(id_a, bins=edges, density=True, alpha=0.55, color="tab:blue", label=f"ID (n={id_a.size})")
        ax.hist(ood_a, bins=edges, density=True, alpha=0.55, color="tab:orange",
                label=f"OOD: {name} (n={ood_a.size})")
        ax.set_xlabel(f"{score_name} score (higher = more in-distribution)")
        ax.set_ylabel("density")
        ax.set_title(f"{score_name}: ID vs {name}")
        ax.legend(loc="best")
        paths.append(_save(fig, out_dir / f"hist_{safe_name(score_name)}_{safe_name(name)}.png"))
    return paths


def plot_roc(id_scores: ArrayLike, ood_scores_by_set: Mapping[str, ArrayLike], score_name: str,
             out_path: Union[str, Path], metrics_by_set: Optional[Mapping[str, Mapping[str, float]]] = None) -> Path:
    """ROC curves (ID positive) of every OOD set in one PNG, the 95% TPR level marked.

    Args:
        id_scores: ID scores.
        ood_scores_by_set: ``{ood_set_name: scores}``.
        score_name: title.
        out_path: PNG path.
        metrics_by_set: optional ``{set: {"auroc": fraction, ...}}`` shown in the legend.
    """
    from sklearn.metrics import roc_curve

    if not ood_scores_by_set:
        raise ValueError("ood_scores_by_set is empty: give at least one OOD set")
    id_a = _finite(id_scores, "id_scores")
    fig = _new_figure((5.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, scores in ood_scores_by_set.items():
        ood_a = _finite(scores, f"OOD scores of {name!r}")
        y = np.r_[np.ones(id_a.size), np.zeros(ood_a.size)]
        fpr, tpr, _ = roc_curve(y, np.r_[id_a, ood_a])
        label = name
        if metrics_by_set and name in metrics_by_set and "auroc" in metrics_by_set[name]:
            label += f" (AUROC {100 * metrics_by_set[name]['auroc']:.2f})"
        ax.plot(fpr, tpr, label=label)
    ax.axhline(0.95, color="gray", linestyle="--", linewidth=0.8, label="TPR 0.95")
    ax.plot([0, 1], [0, 1], color="lightgray", linewidth=0.8)
    ax.set_xlabel("FPR (OOD accepted as ID)")
    ax.set_ylabel("TPR (ID recall)")
    ax.set_title(f"ROC, {score_name} (ID positive)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, Path(out_path))


def plot_all_histograms(id_scores_by_score: Mapping[str, ArrayLike],
                        ood_scores_by_score: Mapping[str, Mapping[str, ArrayLike]],
                        out_dir: Union[str, Path], bins: Optional[int] = None) -> Dict[str, List[Path]]:
    """:func:`plot_score_histograms` for every score: ``{score: paths}``.

    Args:
        id_scores_by_score: ``{score: ID scores}``.
        ood_scores_by_score: ``{score: {ood_set: scores}}``.
        out_dir: output folder.
        bins: bins per histogram.
    """
    missing = [s for s in id_scores_by_score if s not in ood_scores_by_score]
    if missing:
        raise ValueError(f"no OOD scores for score(s) {missing}")
    return {s: plot_score_histograms(id_scores_by_score[s], ood_scores_by_score[s], s, out_dir, bins)
            for s in id_scores_by_score}
