"""Score histograms, a one-page overview and ROC curves (PNG) of an OOD evaluation.

Every histogram carries its AUROC and FPR95 and a line at the threshold FPR95 is read at (the
operating point of :func:`locoop.ood.metrics.operating_point`, the papers' rule: the ID recall
closest to 95%); the overview puts every OOD set x the main scores on one page.

Figures are built with matplotlib's object API on the Agg canvas: no pyplot state, no
GUI backend, nothing left open after saving, and the caller's backend choice untouched.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

ArrayLike = Union[np.ndarray, list, tuple]
Metrics = Mapping[str, float]
# Rows of the overview when the caller names none: the papers' two scores, those that were computed.
OVERVIEW_SCORES = ("MCM", "GL-MCM")
OVERVIEW_NAME = "overview.png"
_ID_COLOR, _OOD_COLOR, _THRESHOLD_COLOR = "tab:blue", "tab:orange", "black"


def _new_figure(figsize=(6.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The constrained layout is computed in the one draw savefig does (bbox_inches="tight" draws twice).
    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    from locoop.engine.fileio import atomic_write

    # atomic as every other result file: a full disk leaves no half-written PNG, and its error names the file
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
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


def _edges(id_a: np.ndarray, ood_a: np.ndarray, bins: Optional[int]) -> np.ndarray:
    lo = min(id_a.min(), ood_a.min())
    hi = max(id_a.max(), ood_a.max())
    if hi <= lo:  # all scores equal: give the single bar some width
        lo, hi = lo - 0.5, hi + 0.5
    n_bins = int(bins) if bins is not None else int(np.clip(np.ceil(2 * np.sqrt(id_a.size + ood_a.size)), 10, 100))
    return np.linspace(lo, hi, n_bins + 1)


def _annotate(id_a: np.ndarray, ood_a: np.ndarray, given: Optional[Metrics]) -> Dict[str, float]:
    """AUROC / FPR95 (the given ones when passed, else computed) and the FPR95 operating point."""
    from locoop.ood.metrics import ood_metrics, operating_point

    point = operating_point(id_a, ood_a)
    if given is not None and "auroc" in given and "fpr95" in given:
        auroc, fpr95 = float(given["auroc"]), float(given["fpr95"])
    else:
        m = ood_metrics(id_a, ood_a)
        auroc, fpr95 = m["auroc"], m["fpr95"]
    return {"auroc": auroc, "fpr95": fpr95, "threshold": point["threshold"], "tpr": point["tpr"]}


def _draw_pair(ax, id_a: np.ndarray, ood_a: np.ndarray, name: str, bins: Optional[int],
               given: Optional[Metrics], legend: bool, fontsize: Union[str, float] = "medium") -> Dict[str, float]:
    """ID and OOD density histograms on shared bins, the threshold line and the metrics on ``ax``."""
    a = _annotate(id_a, ood_a, given)
    edges = _edges(id_a, ood_a, bins)
    # One filled step outline per histogram: the same bars as 'bar' without an artist per bin (4x faster to draw).
    ax.hist(id_a, bins=edges, density=True, histtype="stepfilled", alpha=0.55, color=_ID_COLOR,
            label=f"ID (n={id_a.size})")
    ax.hist(ood_a, bins=edges, density=True, histtype="stepfilled", alpha=0.55, color=_OOD_COLOR,
            label=f"OOD: {name} (n={ood_a.size})")
    ax.axvline(a["threshold"], color=_THRESHOLD_COLOR, linestyle="--", linewidth=1.0,
               label=f"FPR95 threshold (TPR {100 * a['tpr']:.1f}%)")
    ax.text(0.02, 0.97, f"AUROC {100 * a['auroc']:.2f}%\nFPR95 {100 * a['fpr95']:.2f}%", transform=ax.transAxes,
            va="top", ha="left", fontsize=fontsize,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "lightgray"})
    if legend:
        ax.legend(loc="upper right", fontsize="small" if fontsize == "medium" else "x-small")
    return a


def plot_score_histograms(id_scores: ArrayLike, ood_scores_by_set: Mapping[str, ArrayLike], score_name: str,
                          out_dir: Union[str, Path], bins: Optional[int] = None,
                          metrics_by_set: Optional[Mapping[str, Metrics]] = None) -> List[Path]:
    """One PNG per OOD set: density histograms of ID and OOD scores on shared bins.

    Each figure shows the set's AUROC and FPR95 and a dashed line at the FPR95 threshold (ID
    scores at or above it are accepted; its ID recall is the one closest to 95%).

    Args:
        id_scores: scores of the ID test set (higher = more ID).
        ood_scores_by_set: ``{ood_set_name: scores}``.
        score_name: used in the title and the file name ``hist_<score>_<set>.png``.
        out_dir: output folder (created if needed).
        bins: number of bins spanning the union of the ID and that set's OOD scores;
            None = ``2 * sqrt(n)`` clipped to [10, 100] (n = ID + OOD count).
        metrics_by_set: optional ``{set: {"auroc", "fpr95"}}`` (fractions) to show instead of
            recomputing them from the scores (e.g. the evaluation's own numbers).

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
        fig = _new_figure()
        ax = fig.add_subplot(1, 1, 1)
        _draw_pair(ax, id_a, ood_a, name, bins, (metrics_by_set or {}).get(name), legend=True)
        ax.set_xlabel(f"{score_name} score (higher = more in-distribution)")
        ax.set_ylabel("density")
        ax.set_title(f"{score_name}: ID vs {name}")
        paths.append(_save(fig, out_dir / f"hist_{safe_name(score_name)}_{safe_name(name)}.png"))
    return paths


def plot_overview(id_scores_by_score: Mapping[str, ArrayLike],
                  ood_scores_by_score: Mapping[str, Mapping[str, ArrayLike]], out_path: Union[str, Path],
                  scores: Optional[Sequence[str]] = None, bins: Optional[int] = None,
                  metrics: Optional[Mapping[str, Mapping[str, Metrics]]] = None,
                  title: Optional[str] = None) -> Path:
    """One page with a histogram panel per (score, OOD set): rows = scores, columns = OOD sets.

    Args:
        id_scores_by_score: ``{score: ID scores}``.
        ood_scores_by_score: ``{score: {ood_set: scores}}`` (the layout :func:`plot_all_histograms` takes).
        out_path: PNG path (an evaluation writes ``plots/overview.png``).
        scores: the rows; None = those of :data:`OVERVIEW_SCORES` that were computed, else every score.
        bins: bins per panel (as :func:`plot_score_histograms`).
        metrics: optional ``{score: {set: {"auroc", "fpr95"}}}`` (fractions) to show instead of
            recomputing them.
        title: figure title (default: "ID vs OOD scores; ID is the positive class").

    Returns:
        The written path.

    Raises:
        ValueError: no scores, a requested score that was not computed, OOD sets that differ
            between scores, empty or NaN scores.
    """
    if not id_scores_by_score:
        raise ValueError("id_scores_by_score is empty: give at least one score")
    if scores is None:
        scores = [s for s in OVERVIEW_SCORES if s in id_scores_by_score] or list(id_scores_by_score)
    scores = list(scores)
    if not scores:
        raise ValueError("scores is empty: name at least one score row")
    missing = [s for s in scores if s not in id_scores_by_score or s not in ood_scores_by_score]
    if missing:
        raise ValueError(f"no scores for {missing}; computed: {sorted(id_scores_by_score)}")
    sets = list(ood_scores_by_score[scores[0]])
    if not sets:
        raise ValueError(f"no OOD sets for score {scores[0]!r}")
    for s in scores[1:]:
        if list(ood_scores_by_score[s]) != sets:
            raise ValueError(f"score {s!r} has OOD sets {list(ood_scores_by_score[s])}, {scores[0]!r} has {sets}")
    from matplotlib.ticker import MaxNLocator

    rows, cols = len(scores), len(sets)
    fig = _new_figure((3.3 * cols, 2.6 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, score in enumerate(scores):
        id_a = _finite(id_scores_by_score[score], f"ID scores of {score!r}")
        for c, name in enumerate(sets):
            ax = axes[r][c]
            ood_a = _finite(ood_scores_by_score[score][name], f"{score} scores of {name!r}")
            _draw_pair(ax, id_a, ood_a, name, bins, ((metrics or {}).get(score) or {}).get(name), legend=False,
                       fontsize="small")
            ax.tick_params(labelsize="small")
            ax.xaxis.set_major_locator(MaxNLocator(4))  # small panels: few, readable score ticks
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{name} (n={ood_a.size})", fontsize="medium")
            if c == 0:
                ax.set_ylabel(f"{score}\n(ID n={id_a.size})", fontsize="medium")
    # One legend, in the top-right panel (a figure legend "outside" the panels needs matplotlib >= 3.7).
    handles, labels = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles, ["ID", "OOD"] + labels[2:], loc="upper right", fontsize="x-small")
    fig.suptitle(title or "ID vs OOD scores (higher = more ID; ID is the positive class)", fontsize="large")
    return _save(fig, Path(out_path))


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
                        out_dir: Union[str, Path], bins: Optional[int] = None,
                        metrics: Optional[Mapping[str, Mapping[str, Metrics]]] = None) -> Dict[str, List[Path]]:
    """:func:`plot_score_histograms` for every score: ``{score: paths}``.

    Args:
        id_scores_by_score: ``{score: ID scores}``.
        ood_scores_by_score: ``{score: {ood_set: scores}}``.
        out_dir: output folder.
        bins: bins per histogram.
        metrics: optional ``{score: {set: {"auroc", "fpr95"}}}`` (fractions) shown on the
            histograms instead of recomputing them.
    """
    missing = [s for s in id_scores_by_score if s not in ood_scores_by_score]
    if missing:
        raise ValueError(f"no OOD scores for score(s) {missing}")
    return {s: plot_score_histograms(id_scores_by_score[s], ood_scores_by_score[s], s, out_dir, bins,
                                     metrics_by_set=(metrics or {}).get(s))
            for s in id_scores_by_score}
