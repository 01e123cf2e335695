"""OOD detection metrics: FPR95, AUROC, AUPR, in two clearly separated conventions.

Scores follow :mod:`locoop.ood.scores`: **higher = more in-distribution (ID)**.

Paper convention (MCM / GL-MCM / LoCoOp) -- :func:`ood_metrics`
---------------------------------------------------------------
Read in deeplearning-wisc/MCM, AtsuMiyai/GL-MCM and AtsuMiyai/LoCoOp
(``utils/detection_util.py``: ``get_measures`` and ``fpr_and_fdr_at_recall``; identical in
the three repositories). **ID is the positive class** (label 1), the score is the ID score.

* ``auroc`` = ``sklearn.metrics.roc_auc_score(is_id, score)``.
* ``aupr`` = ``sklearn.metrics.average_precision_score(is_id, score)`` (AUPR-In: average
  precision with ID positive, not a trapezoid).
* ``fpr95`` = fraction of OOD samples scoring at or above a threshold chosen as follows.
  Sort the scores in decreasing order and keep one operating point per *distinct* score
  value (ties are accepted or rejected together; the point sits at the end of the tie
  group). Keep the points from the highest threshold down to the *first* one reaching
  full recall (TPR = 1; lower thresholds are dropped). Walk them from that full-recall
  point towards higher thresholds and take the first point whose recall minimises
  ``|recall - 0.95|``. Recall is ``tp / n_id`` in float64, so an exact tie in distance
  goes to the point met first, i.e. the higher recall (the lower threshold); and on a
  plateau of equal recall (only OOD samples between two ID scores) the *lowest*
  threshold of the plateau, the one with the most false positives, is taken.
  (The reference code also appends a point ``(recall 1, fp 0)`` after the walk; it can
  never win because the walk starts at a point with recall exactly 1 at the same
  distance, and ``argmin`` keeps the first.)

  So the chosen recall may be *below* 0.95 (e.g. 11 ID samples of 12 -> recall 0.917 is
  closer than 1.0) -- this differs from "the first threshold with TPR >= 0.95", which
  is offered as ``fpr_at_recall(..., rule="at_least")``.

OpenOOD convention -- :func:`ood_metrics_openood`
-------------------------------------------------
Read in Jingkang50/OpenOOD (``openood/evaluators/metrics.py``, ``auc_and_fpr_recall``,
v1.5). **OOD is the positive class**, the detector score is ``-score``.

* ``fpr95_openood`` = ``fpr[argmax(tpr >= 0.95)]`` on ``sklearn.metrics.roc_curve``
  (default ``drop_intermediate=True``): the fraction of **ID** samples flagged as OOD at
  the first threshold catching 95% of the OOD samples. A different quantity from
  ``fpr95``; never compare the two.
* ``auroc_openood`` = trapezoidal area under that ROC curve (equals ``auroc``).
* ``aupr_in`` / ``aupr_out`` = trapezoidal ``sklearn.metrics.auc(recall, precision)`` of
  ``precision_recall_curve`` with ID positive (score) / OOD positive (-score).

Every value is a fraction in [0, 1]; the result writers convert to percent.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple, Union

import numpy as np

# torch tensors are accepted too (anything with .detach()); torch and scikit-learn are
# imported lazily so that reading / summarising result files stays light.
ArrayLike = Union[np.ndarray, list, tuple, "torch.Tensor"]  # noqa: F821

FPR_CONVENTION = (
    "MCM/GL-MCM/LoCoOp: ID is the positive class; FPR95 is the fraction of OOD samples "
    "with score >= the threshold whose TPR (ID recall, over distinct score values) is "
    "closest to 0.95 (ties: higher recall; equal-recall plateau: lowest threshold); "
    "AUROC = roc_auc_score, AUPR = average_precision_score (ID positive)"
)
FPR_CONVENTION_OPENOOD = (
    "OpenOOD v1.5: OOD is the positive class; fpr95_openood is the fraction of ID samples "
    "flagged as OOD at the first ROC point with OOD TPR >= 0.95 (sklearn roc_curve on "
    "-score); aupr_in / aupr_out are trapezoidal areas of the PR curves"
)


def _as_scores(x: ArrayLike, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{what} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{what} is empty: OOD metrics need at least one ID and one OOD score")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{what} contains {int(bad.sum())} NaN/inf values (first at index "
                         f"{int(np.flatnonzero(bad)[0])}); fix the score computation before evaluating")
    return a


def _check_level(level: float, what: str) -> float:
    level = float(level)
    if not (0.0 < level <= 1.0):
        raise ValueError(f"{what} must be in (0, 1], got {level}")
    return level


def _validate(id_scores: ArrayLike, ood_scores: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    return _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")


def _labels_and_scores(id_s: np.ndarray, ood_s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """ID-positive labels (1 = ID) and the concatenated scores, ID first."""
    y = np.concatenate([np.ones(id_s.size, dtype=np.int64), np.zeros(ood_s.size, dtype=np.int64)])
    return y, np.concatenate([id_s, ood_s])


def _distinct_threshold_curve(y: np.ndarray, s: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) counts at each distinct score, thresholds in decreasing order.

    Point ``k`` accepts every sample whose score is >= the k-th largest distinct score, which is
    returned as the third array.
    """
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # The last index of each run of equal scores: ties move together.
    ends = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[ends]
    fp = ends + 1 - tp
    return tp, fp, s_sorted[ends]


def operating_point(id_scores: ArrayLike, ood_scores: ArrayLike, recall_level: float = 0.95,
                    rule: str = "closest") -> Dict[str, float]:
    """The operating point behind :func:`fpr_at_recall`: its FPR, score threshold and ID recall.

    Args:
        id_scores / ood_scores / recall_level / rule: as :func:`fpr_at_recall`.

    Returns:
        ``{"fpr", "threshold", "tpr"}``: samples scoring ``>= threshold`` are accepted as ID; ``tpr``
        is the ID recall there (with ``rule="closest"`` possibly below ``recall_level``), ``fpr`` the
        fraction of OOD samples accepted (the value :func:`fpr_at_recall` returns).
    """
    recall_level = _check_level(recall_level, "recall_level")
    id_s, ood_s = _validate(id_scores, ood_scores)
    y, s = _labels_and_scores(id_s, ood_s)
    tp, fp, thresholds = _distinct_threshold_curve(y, s)
    n_pos, n_neg = id_s.size, ood_s.size
    recall = tp / float(n_pos)
    if rule == "closest":
        full = int(np.searchsorted(tp, n_pos, side="left"))  # first point with recall 1
        walk = np.arange(full, -1, -1)  # from full recall towards higher thresholds
        pick = walk[int(np.argmin(np.abs(recall[walk] - recall_level)))]
    elif rule == "at_least":
        # recall is non-decreasing along the curve: the first point reaching the level.
        pick = int(np.argmax(recall >= recall_level))
    else:
        raise ValueError(f"unknown FPR rule {rule!r}; use 'closest' (papers) or 'at_least'")
    return {"fpr": float(fp[pick] / n_neg), "threshold": float(thresholds[pick]), "tpr": float(recall[pick])}


def fpr_at_recall(id_scores: ArrayLike, ood_scores: ArrayLike, recall_level: float = 0.95,
                  rule: str = "closest") -> float:
    """FPR (fraction of OOD accepted as ID) at an ID recall level, ID positive.

    Args:
        id_scores: scores of ID samples (higher = more ID).
        ood_scores: scores of OOD samples.
        recall_level: target TPR of the ID class.
        rule: ``"closest"`` -- the papers' rule (recall closest to the level, see the
            module docstring, may be below it); ``"at_least"`` -- the smallest FPR
            among thresholds with recall >= the level (first such threshold).

    Returns:
        The FPR as a fraction in [0, 1]. :func:`operating_point` also gives the threshold.
    """
    return operating_point(id_scores, ood_scores, recall_level, rule)["fpr"]


def _unit(x: float) -> float:
    """A fraction, clamped to [0, 1]: sklearn's sums can overshoot 1 by a rounding error
    (``average_precision_score`` gives 1.0000000000000002 for 9 perfectly separated ID scores)."""
    return min(1.0, max(0.0, float(x)))


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike, recall_level: float = 0.95,
                include_openood: bool = False) -> Dict[str, float]:
    """FPR95, AUROC and AUPR exactly as the MCM / GL-MCM / LoCoOp evaluation code.

    Args:
        id_scores: ID scores (higher = more ID), any shape (flattened).
        ood_scores: OOD scores.
        recall_level: ID recall for the FPR (0.95 -> FPR95).
        include_openood: also add the keys of :func:`ood_metrics_openood`.

    Returns:
        ``{"fpr95", "auroc", "aupr"}`` as fractions in [0, 1] (ID positive), plus
        ``fpr95_openood``, ``auroc_openood``, ``aupr_in``, ``aupr_out`` if asked.

    Raises:
        ValueError: empty input, NaN/inf, non-numeric data or a bad recall level.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    id_s, ood_s = _validate(id_scores, ood_scores)
    y, s = _labels_and_scores(id_s, ood_s)
    out = {
        "fpr95": fpr_at_recall(id_s, ood_s, recall_level, rule="closest"),
        "auroc": _unit(roc_auc_score(y, s)),
        "aupr": _unit(average_precision_score(y, s)),
    }
    if include_openood:
        out.update(ood_metrics_openood(id_s, ood_s, recall_level))
    return out


def ood_metrics_openood(id_scores: ArrayLike, ood_scores: ArrayLike, tpr_level: float = 0.95) -> Dict[str, float]:
    """Metrics in the OpenOOD v1.5 convention (OOD positive), under distinct names.

    Args:
        id_scores: ID scores (higher = more ID).
        ood_scores: OOD scores.
        tpr_level: OOD detection rate at which the ID false-positive rate is read.

    Returns:
        ``{"fpr95_openood", "auroc_openood", "aupr_in", "aupr_out"}`` as fractions.
    """
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    tpr_level = _check_level(tpr_level, "tpr_level")
    id_s, ood_s = _validate(id_scores, ood_scores)
    y_id, s = _labels_and_scores(id_s, ood_s)
    y_ood = 1 - y_id
    fpr, tpr, _ = roc_curve(y_ood, -s)
    p_in, r_in, _ = precision_recall_curve(y_id, s)
    p_out, r_out, _ = precision_recall_curve(y_ood, -s)
    return {
        "fpr95_openood": float(fpr[int(np.argmax(tpr >= tpr_level))]),
        "auroc_openood": _unit(auc(fpr, tpr)),
        "aupr_in": _unit(auc(r_in, p_in)),
        "aupr_out": _unit(auc(r_out, p_out)),
    }


def evaluate_all(id_scores: Mapping[str, ArrayLike], ood_scores_by_set: Mapping[str, Mapping[str, ArrayLike]],
                 recall_level: float = 0.95, include_openood: bool = False) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Metrics of every score on every OOD set, in the layout ``write_results`` takes.

    Args:
        id_scores: ``{score: ID scores}`` (e.g. from ``compute_scores`` on the ID test set).
        ood_scores_by_set: ``{ood_set: {score: scores}}``.
        recall_level: ID recall for the FPR.
        include_openood: add the OpenOOD-convention keys.

    Returns:
        ``{score: {ood_set: metrics}}`` (fractions).

    Raises:
        ValueError: an OOD set lacks a score present for the ID set.
    """
    if not id_scores or not ood_scores_by_set:
        raise ValueError("evaluate_all needs ID scores and at least one OOD set")
    for ood, per_score in ood_scores_by_set.items():
        missing = [k for k in id_scores if k not in per_score]
        if missing:
            raise ValueError(f"OOD set {ood!r} has no scores for {missing}")
    return {score: {ood: ood_metrics(id_scores[score], per_score[score], recall_level, include_openood)
                    for ood, per_score in ood_scores_by_set.items()}
            for score in id_scores}
