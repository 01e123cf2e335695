"""Bootstrap confidence intervals of the OOD metrics, over images and over seeds.

**Over images** (:func:`bootstrap_metrics`): a replicate resamples, with replacement and separately,
the ID scores (``n_id`` draws) and every OOD set's scores (``n_set`` draws each); one ID resample
is shared by all OOD sets of the replicate, so the ``Average`` row (the mean over the sets) gets a
valid interval too. Every metric of :mod:`locoop.ood.metrics` is recomputed on each replicate and
the interval is the percentile interval of the replicates (``confidence`` 0.95: the 2.5 % and
97.5 % percentiles, linear interpolation). Random numbers: ``numpy.random.default_rng(seed)``,
per replicate first the ID indices (``integers(0, n_id, n_id)``), then each OOD set's in the given
order -- so a plain loop calling :func:`locoop.ood.metrics.ood_metrics` on the same draws gives
the same numbers (the tests do exactly that).

**Over seeds** (:func:`bootstrap_seeds`): the runs (e.g. seeds 1-3) are resampled with replacement
and the interval is that of the mean over the drawn runs. :func:`bootstrap_runs` reports both for a
list of runs: the interval of the mean over runs from the per-run image replicates (run ``r`` uses
``default_rng([seed, r])``), and the seed interval of the per-run estimates. With three seeds the
seed interval is coarse (it can only take the 10 distinct means of 3 draws); it is reported with
the number of runs so that nobody mistakes it for more.

The metrics are computed vectorised over replicates from weighted counts on the sorted distinct
scores of the original data (a replicate is a vector of multiplicities), so 1000 replicates of 50k ID
and 10k OOD scores take seconds (``tools/bench_bootstrap.py``). FPR95 in both conventions is a
ratio of integer counts and equals :func:`~locoop.ood.metrics.ood_metrics` exactly; AUROC is the
Mann-Whitney statistic in exact integer arithmetic (scikit-learn's trapezoid of the same curve
differs by float rounding, < 1e-12); AUPR (average precision) and OpenOOD's trapezoidal AUPR-In /
AUPR-Out agree to float rounding. OpenOOD's FPR reproduces scikit-learn's ``roc_curve``
``drop_intermediate`` rule, which can move the first ``TPR >= 0.95`` point.

All values are fractions in [0, 1], like :mod:`locoop.ood.metrics`; :func:`to_percent` converts a
result for the percent-valued results files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["METRICS", "MCM_METRICS", "OPENOOD_METRICS", "bootstrap_metrics", "bootstrap_seeds", "bootstrap_runs",
           "metrics_from_counts", "load_scores_npz", "bootstrap_run_dirs", "to_percent", "AVERAGE",
           "bootstrap_benchmark", "format_interval", "format_intervals_markdown", "format_intervals_table",
           "METRIC_TITLES"]

METRIC_TITLES = {"fpr95": "FPR95", "auroc": "AUROC", "aupr": "AUPR", "fpr95_openood": "FPR95 (OpenOOD)",
                 "auroc_openood": "AUROC (OpenOOD)", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out"}

MCM_METRICS = ("fpr95", "auroc", "aupr")
OPENOOD_METRICS = ("fpr95_openood", "auroc_openood", "aupr_in", "aupr_out")
METRICS = MCM_METRICS + OPENOOD_METRICS
AVERAGE = "Average"
ArrayLike = Union[np.ndarray, Sequence[float]]

IMAGE_METHOD = ("percentile bootstrap over images: ID and each OOD set resampled with replacement, separately; "
                "one ID resample shared by all OOD sets of a replicate")
SEED_METHOD = "percentile bootstrap over runs: runs resampled with replacement, interval of their mean"
RNG_PROTOCOL = ("numpy.random.default_rng(seed); per replicate integers(0, n_id, n_id) for the ID set, then "
                "integers(0, n, n) for each OOD set in order; run r of several uses default_rng([seed, r])")


# ------------------------------------------------------------------------------------ counts -> metrics
def _ranks_desc(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Position of each value in ``grid`` (distinct values, decreasing)."""
    return (grid.size - 1 - np.searchsorted(grid[::-1], values)).astype(np.int64)


def _auroc(w_id: np.ndarray, w_ood: np.ndarray, fp: np.ndarray, n_id: int, n_ood: int) -> np.ndarray:
    # Mann-Whitney: ID above OOD counts 1, ties 1/2; fp = OOD at or above each value.
    twice = 2 * (w_id * (n_ood - fp)).sum(axis=1) + (w_id * w_ood).sum(axis=1)
    return np.minimum(1.0, twice / (2.0 * n_id * n_ood))


def _average_precision(w_pos: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: int) -> np.ndarray:
    # sum over thresholds of (recall step) * precision; a step is the positives at that value
    # (where there is none the term is 0, and where there is one tp + fp >= 1).
    return np.clip((w_pos * tp / np.maximum(tp + fp, 1)).sum(axis=1) / float(n_pos), 0.0, 1.0)


def _pr_trapezoid(w_pos: np.ndarray, w_neg: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: int) -> np.ndarray:
    # scikit-learn's auc(recall, precision) of precision_recall_curve, which starts at (0, 1): the
    # trapezoid of each recall step (w_pos / n_pos at a value) between the precision before the
    # value (tp - w_pos, fp - w_neg; 1 with nothing accepted yet) and at it.
    before_tp = tp - w_pos
    before_all = before_tp + (fp - w_neg)
    p_before = np.where(before_all > 0, before_tp / np.maximum(before_all, 1), 1.0)
    p_at = tp / np.maximum(tp + fp, 1)
    area = (w_pos * (p_at + p_before)).sum(axis=1) / (2.0 * n_pos)
    return np.clip(area, 0.0, 1.0)


def _fpr_closest(tp: np.ndarray, fp: np.ndarray, n_id: int, n_ood: int, level: float) -> np.ndarray:
    # The papers' rule (metrics.fpr_at_recall, rule="closest"): among points up to the first with
    # full recall, the lowest threshold whose recall is closest to the level. Recall does not
    # decrease along the grid, so the closest recall is the last one below the level or the first
    # one at or above it; the lowest threshold of that recall is the last position holding it
    # (for recall 1: the first position reaching it, where the papers' walk starts).
    b = tp.shape[0]
    rows = np.arange(b)
    recall = tp / float(n_id)
    above = (recall < level).sum(axis=1)  # first position with recall >= level
    full = (tp < n_id).sum(axis=1)  # first position with recall 1
    r_above = recall[rows, above]
    plateau_end = np.minimum((recall <= r_above[:, None]).sum(axis=1) - 1, full)
    below = np.maximum(above - 1, 0)
    d_below = np.where(above > 0, np.abs(recall[rows, below] - level), np.inf)
    pick = np.where(np.abs(r_above - level) <= d_below, plateau_end, below)
    return fp[rows, pick] / float(n_ood)


def _fpr_openood(w_id: np.ndarray, w_ood: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_id: int, n_ood: int,
                 level: float) -> np.ndarray:
    # OpenOOD: OOD positive, score -s, so its ROC runs from the lowest score up; the FPR at the first
    # point of sklearn's roc_curve (drop_intermediate=True) with TPR >= level. Worked in our
    # decreasing-score positions u: the OOD / ID at or below value u are caught / flagged there.
    b, u = w_id.shape
    caught = n_ood - fp + w_ood
    flagged = n_id - tp + w_id
    present = (w_id + w_ood) > 0
    pos = np.arange(u)
    # the next point of the ROC (the next higher present score) is the previous present position
    last_seen = np.maximum.accumulate(np.where(present, pos[None, :], -1), axis=1)
    nxt = np.empty_like(last_seen)
    nxt[:, 0] = -1
    nxt[:, 1:] = last_seen[:, :-1]
    lowest = last_seen[:, -1]  # the ROC's first point
    rows = np.arange(b)[:, None]
    nxt_c = np.maximum(nxt, 0)
    # roc_curve drops a point whose step in and step out are equal in both counts (collinear)
    same = ((caught[rows, nxt_c] - caught) == w_ood) & ((flagged[rows, nxt_c] - flagged) == w_id)
    dropped = present & (nxt >= 0) & (pos[None, :] != lowest[:, None]) & same
    ok = present & ~dropped & (caught / float(n_ood) >= level)
    pick = u - 1 - np.argmax(ok[:, ::-1], axis=1)  # the first such point from the lowest score up
    return flagged[np.arange(b), pick] / float(n_id)


def metrics_from_counts(w_id: np.ndarray, w_ood: np.ndarray, metrics: Sequence[str] = METRICS,
                        recall_level: float = 0.95) -> Dict[str, np.ndarray]:
    """The OOD metrics of ``b`` weighted samples over one grid of distinct scores.

    Args:
        w_id: ``[b, U]`` integer multiplicities of the ID samples at each distinct score, the
            scores in **decreasing** order (a row of ones where a score occurs once = the data itself).
        w_ood: ``[b, U]`` the same for the OOD samples.
        metrics: names out of :data:`METRICS`.
        recall_level: 0.95 for FPR95.

    Returns:
        ``{metric: float64 [b]}`` as fractions.
    """
    w_id = np.asarray(w_id, dtype=np.int64)
    w_ood = np.asarray(w_ood, dtype=np.int64)
    if w_id.ndim == 1:
        w_id, w_ood = w_id[None], w_ood[None]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown bootstrap metrics {unknown}; choose from {list(METRICS)}")
    n_id, n_ood = int(w_id[0].sum()), int(w_ood[0].sum())
    tp, fp = np.cumsum(w_id, axis=1), np.cumsum(w_ood, axis=1)
    out: Dict[str, np.ndarray] = {}
    for m in metrics:
        if m in ("auroc", "auroc_openood"):  # the same area in both conventions
            done = [out[k] for k in ("auroc", "auroc_openood") if k in out]
            out[m] = done[0] if done else _auroc(w_id, w_ood, fp, n_id, n_ood)
        elif m == "aupr":
            out[m] = _average_precision(w_id, tp, fp, n_id)
        elif m == "fpr95":
            out[m] = _fpr_closest(tp, fp, n_id, n_ood, recall_level)
        elif m == "fpr95_openood":
            out[m] = _fpr_openood(w_id, w_ood, tp, fp, n_id, n_ood, recall_level)
        elif m == "aupr_in":
            out[m] = _pr_trapezoid(w_id, w_ood, tp, fp, n_id)
        elif m == "aupr_out":  # OOD positive from the lowest score up: counts at or below each value
            out[m] = _pr_trapezoid(w_ood, w_id, n_ood - fp + w_ood, n_id - tp + w_id, n_ood)
    return out


# ------------------------------------------------------------------------------------ bootstrap
def _scores(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64).reshape(-1)
    if a.size < 2:
        raise ValueError(f"{what} has {a.size} scores; a bootstrap needs at least 2")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN/inf scores")
    return a


def _check(n_resamples: int, confidence: float) -> Tuple[int, float]:
    n = int(n_resamples)
    if n < 2:
        raise ValueError(f"n_resamples must be >= 2, got {n_resamples}")
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return n, c


def _interval(samples: np.ndarray, estimate: float, confidence: float) -> Dict[str, float]:
    alpha = 1.0 - confidence
    lo, hi = np.percentile(samples, [100.0 * alpha / 2, 100.0 * (1 - alpha / 2)])
    return {"estimate": float(estimate), "low": float(lo), "high": float(hi),
            "se": float(np.std(samples, ddof=1)) if samples.size > 1 else float("nan")}


def _draw(rng: np.random.Generator, n_resamples: int, sizes: Sequence[int]) -> List[List[np.ndarray]]:
    """Indices of every replicate: ``out[b][k]`` for the k-th set (0 = ID), in the documented order."""
    return [[rng.integers(0, n, n) for n in sizes] for _ in range(n_resamples)]


def _batch_size(u: int, n: int, budget: int = 1 << 17) -> int:
    # a few rows per batch: the temporaries stay in the CPU cache (4x faster than 16 MB ones)
    return max(1, budget // max(1, u, n))


def bootstrap_metrics(id_scores: ArrayLike, ood_scores_by_set: Mapping[str, ArrayLike], n_resamples: int = 1000,
                      seed: int = 0, confidence: float = 0.95, metrics: Sequence[str] = MCM_METRICS,
                      recall_level: float = 0.95, keep_samples: bool = False,
                      rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
    """Percentile bootstrap intervals over images of one run (one score), per OOD set and their average.

    Args:
        id_scores: the ID scores (higher = more ID).
        ood_scores_by_set: ``{set: OOD scores}``, in the order the replicates draw them.
        n_resamples: number of replicates (1000).
        seed: seed of ``numpy.random.default_rng``.
        confidence: coverage of the interval (0.95).
        metrics: out of :data:`METRICS` (default the papers' ``fpr95``, ``auroc``, ``aupr``).
        recall_level: 0.95 for FPR95.
        keep_samples: also return every replicate's values (``samples``).
        rng: a generator to use instead of ``default_rng(seed)`` (how :func:`bootstrap_runs` seeds runs).

    Returns:
        ``{"method", "rng", "n_resamples", "seed", "confidence", "metrics", "sets": {set or "Average":
        {metric: {"estimate", "low", "high", "se"}}}}`` (fractions; ``estimate`` = the metric on all
        images, computed by :mod:`locoop.ood.metrics`), plus ``samples`` when asked.
    """
    from locoop.ood.metrics import ood_metrics

    n_resamples, confidence = _check(n_resamples, confidence)
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown bootstrap metrics {unknown or metrics}; choose from {list(METRICS)}")
    if not ood_scores_by_set:
        raise ValueError("bootstrap_metrics needs at least one OOD set")
    id_s = _scores(id_scores, "id_scores")
    sets = {name: _scores(v, f"OOD set {name!r}") for name, v in ood_scores_by_set.items()}
    rng = rng if rng is not None else np.random.default_rng(int(seed))
    grids = []
    for ood_s in sets.values():
        grid = np.unique(np.concatenate([id_s, ood_s]))[::-1]
        grids.append((grid.size, _ranks_desc(id_s, grid), _ranks_desc(ood_s, grid)))
    samples: Dict[str, Dict[str, np.ndarray]] = {name: {m: np.empty(n_resamples) for m in metrics} for name in sets}
    sizes = [id_s.size] + [v.size for v in sets.values()]
    step = _batch_size(max(g[0] for g in grids), max(sizes[1:]) + id_s.size)
    for lo in range(0, n_resamples, step):  # replicates in batches; draws in the documented order
        hi = min(n_resamples, lo + step)
        draws = _draw(rng, hi - lo, sizes)
        ii = np.stack([d[0] for d in draws])
        for k, name in enumerate(sets, start=1):
            u, g_id, g_ood = grids[k - 1]
            rows = (np.arange(hi - lo, dtype=np.int64) * u)[:, None]
            oo = np.stack([d[k] for d in draws])
            w_id = np.bincount((rows + g_id[ii]).ravel(), minlength=(hi - lo) * u).reshape(hi - lo, u)
            w_ood = np.bincount((rows + g_ood[oo]).ravel(), minlength=(hi - lo) * u).reshape(hi - lo, u)
            for m, v in metrics_from_counts(w_id, w_ood, metrics, recall_level).items():
                samples[name][m][lo:hi] = v
    samples[AVERAGE] = {m: np.mean([samples[s][m] for s in sets], axis=0) for m in metrics}

    include_openood = any(m in OPENOOD_METRICS for m in metrics)
    full = {name: ood_metrics(id_s, v, recall_level, include_openood=include_openood) for name, v in sets.items()}
    full[AVERAGE] = {m: float(np.mean([full[s][m] for s in sets])) for m in metrics}
    result: Dict[str, Any] = {
        "method": IMAGE_METHOD, "rng": RNG_PROTOCOL, "n_resamples": n_resamples, "seed": int(seed),
        "confidence": confidence, "metrics": metrics,
        "sets": {name: {m: _interval(samples[name][m], full[name][m], confidence) for m in metrics}
                 for name in samples},
    }
    if keep_samples:
        result["samples"] = samples
    return result


def bootstrap_seeds(values: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> Dict[str, Any]:
    """Percentile interval of the mean over runs, resampling the runs (one value per run).

    Returns:
        ``{"estimate" (the mean), "low", "high", "se", "n_runs", "n_resamples", "seed", "confidence",
        "method"}``.
    """
    n_resamples, confidence = _check(n_resamples, confidence)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 1 or not np.isfinite(v).all():
        raise ValueError(f"bootstrap_seeds needs finite values of at least one run, got {list(values)}")
    rng = np.random.default_rng(int(seed))
    means = np.array([v[rng.integers(0, v.size, v.size)].mean() for _ in range(n_resamples)])
    return dict(_interval(means, float(v.mean()), confidence), n_runs=int(v.size), n_resamples=n_resamples,
                seed=int(seed), confidence=confidence, method=SEED_METHOD)


def bootstrap_runs(runs: Sequence[Tuple[ArrayLike, Mapping[str, ArrayLike]]], n_resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95, metrics: Sequence[str] = MCM_METRICS,
                   recall_level: float = 0.95) -> Dict[str, Any]:
    """Intervals for several runs of one score (e.g. three seeds): per run, and of the mean over runs.

    Args:
        runs: per run ``(id_scores, {set: ood_scores})``; every run must have the same sets.

    Returns:
        ``{"per_run": [bootstrap_metrics result without samples], "mean": {"images": {set: {metric:
        interval}}, "seeds": {set: {metric: interval}}}, "n_runs", "n_resamples", "seed",
        "confidence", "metrics", "method", "rng"}``; ``images``: the mean over runs of each replicate
        (runs fixed, images resampled); ``seeds``: runs resampled (images fixed).
    """
    if not runs:
        raise ValueError("bootstrap_runs needs at least one run")
    names = [list(r[1]) for r in runs]
    if any(n != names[0] for n in names):
        raise ValueError(f"the runs have different OOD sets: {names}")
    per_run = []
    for r, (id_s, oods) in enumerate(runs):
        res = bootstrap_metrics(id_s, oods, n_resamples, seed, confidence, metrics, recall_level, keep_samples=True,
                                rng=np.random.default_rng([int(seed), r]))
        per_run.append(res)
    sets = list(per_run[0]["sets"])
    mean_images = {s: {m: _interval(np.mean([p["samples"][s][m] for p in per_run], axis=0),
                                    float(np.mean([p["sets"][s][m]["estimate"] for p in per_run])), confidence)
                       for m in per_run[0]["metrics"]} for s in sets}
    mean_seeds = {s: {m: bootstrap_seeds([p["sets"][s][m]["estimate"] for p in per_run], n_resamples, seed, confidence)
                      for m in per_run[0]["metrics"]} for s in sets}
    for p in per_run:
        p.pop("samples")
    return {"per_run": per_run, "mean": {"images": mean_images, "seeds": mean_seeds}, "n_runs": len(runs),
            "n_resamples": per_run[0]["n_resamples"], "seed": int(seed), "confidence": per_run[0]["confidence"],
            "metrics": per_run[0]["metrics"], "method": {"images": IMAGE_METHOD, "seeds": SEED_METHOD},
            "rng": RNG_PROTOCOL}


# ------------------------------------------------------------------------------------ files
def load_scores_npz(path: Union[str, Path]) -> Dict[str, Tuple[np.ndarray, Dict[str, np.ndarray]]]:
    """Per score, ``(ID scores, {OOD set: scores})`` from a run's ``ood_scores.npz`` (or its folder).

    The file holds ``ID/<score>`` and ``<set>/<score>`` arrays (plus ``id_labels`` and
    ``id_predictions``), as the OOD runner writes them.

    Raises:
        FileNotFoundError: no such file. ValueError: no ``ID/<score>`` entries, or a score without OOD sets.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "ood_scores.npz"
    if not p.is_file():
        raise FileNotFoundError(f"no per-image scores at {p}; run the OOD evaluation first (it writes ood_scores.npz)")
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    id_scores = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("ID/")}
    if not id_scores:
        raise ValueError(f"{p} has no 'ID/<score>' arrays; is it an ood_scores.npz of the OOD evaluation?")
    out: Dict[str, Tuple[np.ndarray, Dict[str, np.ndarray]]] = {}
    for score, id_s in id_scores.items():
        oods = {k.split("/", 1)[0]: v for k, v in arrays.items()
                if "/" in k and not k.startswith("ID/") and k.split("/", 1)[1] == score}
        if not oods:
            raise ValueError(f"{p} has ID scores for {score!r} but no OOD set with that score")
        out[score] = (id_s, oods)
    return out


def bootstrap_run_dirs(run_dirs: Sequence[Union[str, Path]], scores: Optional[Sequence[str]] = None,
                       n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                       metrics: Sequence[str] = MCM_METRICS, recall_level: float = 0.95) -> Dict[str, Dict[str, Any]]:
    """:func:`bootstrap_runs` of every score in the ``ood_scores.npz`` of each run folder.

    Returns:
        ``{score: bootstrap_runs result}`` (one run: ``per_run`` has one entry and ``mean.seeds``
        is degenerate; report ``per_run[0]`` then).

    Raises:
        ValueError: runs with different scores or sets.
    """
    loaded = [load_scores_npz(d) for d in run_dirs]
    if not loaded:
        raise ValueError("no run folders given")
    names = list(scores) if scores is not None else list(loaded[0])
    for d, run in zip(run_dirs, loaded):
        missing = [s for s in names if s not in run]
        if missing:
            raise ValueError(f"{d} has no per-image scores for {missing} (it has {sorted(run)})")
    return {s: bootstrap_runs([run[s] for run in loaded], n_resamples, seed, confidence, metrics, recall_level)
            for s in names}


def to_percent(obj: Any) -> Any:
    """A copy of a bootstrap result with every ``estimate``/``low``/``high``/``se`` in percent."""
    if isinstance(obj, dict):
        return {k: (100.0 * v if k in ("estimate", "low", "high", "se") and isinstance(v, float) else to_percent(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_percent(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------ a run's intervals
def bootstrap_benchmark(id_scores: Mapping[str, ArrayLike], ood_scores: Mapping[str, Mapping[str, ArrayLike]],
                        n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                        metrics: Sequence[str] = MCM_METRICS) -> Dict[str, Any]:
    """Intervals over images of one evaluation, every score (the ``bootstrap`` block of ``ood_results.json``).

    Every score uses ``default_rng(seed)``, so all scores see the same resampled images (paired).

    Args:
        id_scores: ``{score: ID scores}``.
        ood_scores: ``{set: {score: scores}}``.

    Returns:
        ``{"units": "percent", "n_resamples", "seed", "confidence", "metrics", "method", "rng",
        "scores": {score: {set or "Average": {metric: {"estimate", "low", "high", "se"}}}}}`` in percent.
    """
    out: Dict[str, Any] = {"units": "percent", "n_resamples": int(n_resamples), "seed": int(seed),
                           "confidence": float(confidence), "metrics": list(metrics), "method": IMAGE_METHOD,
                           "rng": RNG_PROTOCOL + "; every score draws from its own default_rng(seed)", "scores": {}}
    for score, id_s in id_scores.items():
        res = bootstrap_metrics(id_s, {o: per[score] for o, per in ood_scores.items()}, n_resamples, seed, confidence,
                                metrics)
        out["scores"][score] = to_percent(res["sets"])
    return out


def format_interval(iv: Optional[Mapping[str, float]], digits: int = 2) -> str:
    """``'42.10 [40.02, 44.31]'`` (estimate [low, high]); an em dash for None."""
    if not iv:
        return "—"
    return f"{iv['estimate']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def _interval_rows(per_score: Mapping[str, Mapping[str, Mapping[str, Any]]], key: Optional[str]):
    for o, per_metric in per_score.items():
        yield o, {m: (v.get(key) if key else v) for m, v in per_metric.items()}


def format_intervals_markdown(block: Mapping[str, Any], title: str = "Bootstrap confidence intervals",
                              key: Optional[str] = None, level: int = 2, note: str = "") -> str:
    """Markdown tables ``estimate [low, high]`` per score, OOD set and metric (percent).

    Args:
        block: a :func:`bootstrap_benchmark` result, or a summary's ``bootstrap`` block (``key`` then picks
            ``images`` or ``seeds`` out of each metric's entry).
        title: the section heading.
        key: None, or the entry of each metric to show.
        level: heading level of the section (its score tables are one level lower).
        note: a sentence after the heading.
    """
    metrics = list(block["metrics"])
    conf = 100 * float(block["confidence"])
    h = "#" * level
    out = [f"{h} {title}", "",
           f"{conf:g} % percentile intervals, {block['n_resamples']} resamples, bootstrap seed {block['seed']}; "
           "values in percent, estimate [low, high]." + (f" {note}" if note else "")]
    for score, per_score in block["scores"].items():
        out += ["", f"{h}# {score}", "", "| OOD set | " + " | ".join(METRIC_TITLES.get(m, m) for m in metrics) + " |",
                "|---|" + "---:|" * len(metrics)]
        for o, row in _interval_rows(per_score, key):
            out.append(f"| {o} | " + " | ".join(format_interval(row.get(m)) for m in metrics) + " |")
    return "\n".join(out) + "\n"


def format_intervals_table(block: Mapping[str, Any], key: Optional[str] = None, title: str = "") -> str:
    """Console text of :func:`format_intervals_markdown` (same arguments)."""
    metrics = list(block["metrics"])
    conf = 100 * float(block["confidence"])
    lines = [title or f"Bootstrap {conf:g} % intervals over images ({block['n_resamples']} resamples, seed "
             f"{block['seed']}); percent, estimate [low, high]"]
    for score, per_score in block["scores"].items():
        rows = list(_interval_rows(per_score, key))
        width = max(len(o) for o, _ in rows) + 2
        head = f"{'OOD set':<{width}}" + "".join(f"{METRIC_TITLES.get(m, m):>24}" for m in metrics)
        lines += ["", f"[{score}]", head]
        for o, row in rows:
            lines.append(f"{o:<{width}}" + "".join(f"{format_interval(row.get(m)):>24}" for m in metrics))
    return "\n".join(lines)
