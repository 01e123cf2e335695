"""FPR95 / AUROC / AUPR of locoop/ood/metrics.py against hand-computed values."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from locoop.ood.metrics import evaluate_all, fpr_at_recall, ood_metrics, ood_metrics_openood


def test_no_ties():
    # ID (positive) 0.9 0.8 0.7 0.6, OOD 0.75 0.5 0.4.
    # AUROC = P(id > ood): 0.9 and 0.8 beat 3 each, 0.7 and 0.6 beat 2 each -> 10/12.
    # AP, descending: ID 0.9 (P 1/1), ID 0.8 (P 2/2), OOD 0.75, ID 0.7 (P 3/4), ID 0.6 (P 4/5)
    #   -> (1 + 1 + 3/4 + 4/5) / 4 = 0.8875.
    # FPR95: recalls 1/4, 2/4, 2/4, 3/4, 1: closest to 0.95 is 1 (threshold 0.6), OOD >= 0.6: one of 3.
    m = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.75, 0.5, 0.4])
    assert m == pytest.approx({"fpr95": 1 / 3, "auroc": 10 / 12, "aupr": 0.8875})


def test_ties_between_id_and_ood():
    # ID 0.9 0.5 0.5 0.3, OOD 0.5 0.2.
    # AUROC: 0.9 beats 2; each ID 0.5 ties the OOD 0.5 (1/2) and beats 0.2 -> 1.5 each; 0.3 beats 1
    #   -> (2 + 3 + 1) / 8 = 0.75.
    # AP over distinct thresholds: 0.9 (tp 1, fp 0, R 1/4, P 1), 0.5 (tp 3, fp 1, R 3/4, P 3/4),
    #   0.3 (tp 4, fp 1, R 1, P 4/5) -> 1/4 * 1 + 1/2 * 3/4 + 1/4 * 4/5 = 0.825.
    # FPR95: recalls 1/4, 3/4, 1 -> 1 (threshold 0.3): the OOD 0.5 is accepted -> 1/2.
    m = ood_metrics(np.array([0.9, 0.5, 0.5, 0.3]), np.array([0.5, 0.2]))
    assert m == pytest.approx({"fpr95": 0.5, "auroc": 0.75, "aupr": 0.825})


def test_fpr95_takes_the_lowest_threshold_of_an_equal_recall_plateau():
    # 20 ID: 19 scores 10..28 and one 0; 4 OOD: 7, 6, 5, -1.
    # Distinct thresholds, high to low: 28..10 (recall up to 19/20 = 0.95, fp 0), 7 (0.95, fp 1),
    # 6 (0.95, fp 2), 5 (0.95, fp 3), 0 (recall 1, fp 3), -1 (dropped: after full recall).
    # Papers' rule: walk from the full-recall point upwards, first minimum of |recall - 0.95|:
    #   0 -> 0.05, then 5 -> 0 (exact) => fp 3 of 4 OOD = 0.75.
    # "First TPR >= 0.95": threshold 10 with fp 0 => 0.
    idv = np.r_[np.arange(10, 29), 0.0]
    ood = np.array([7, 6, 5, -1.0])
    assert fpr_at_recall(idv, ood) == 0.75
    assert ood_metrics(idv, ood)["fpr95"] == 0.75
    assert fpr_at_recall(idv, ood, rule="at_least") == 0.0
    # AUROC: 19 ID beat all 4 OOD, ID 0 beats -1 -> 77/80. AP: 19 ID at precision 1, then ID 0 at
    # rank 23 -> (19 + 20/23) / 20.
    m = ood_metrics(idv, ood)
    assert m["auroc"] == pytest.approx(77 / 80)
    assert m["aupr"] == pytest.approx((19 + 20 / 23) / 20)

    # OpenOOD: OOD positive on -score; 95% of 4 OOD needs all 4: flag scores <= 7 as OOD,
    # which flags the ID 0 -> FPR 1/20.
    o = ood_metrics_openood(idv, ood)
    assert o["fpr95_openood"] == pytest.approx(1 / 20)
    assert o["auroc_openood"] == pytest.approx(77 / 80)
    # aupr_in (trapezoid, ID positive): precision 1 up to recall 0.95, drops to 19/22 at recall 0.95
    # (3 OOD), then 20/23 at recall 1: 0.95 + 0.05 * (19/22 + 20/23) / 2.
    assert o["aupr_in"] == pytest.approx(0.95 + 0.05 * (19 / 22 + 20 / 23) / 2)
    # aupr_out (trapezoid, OOD positive on -score): PR points (R, P) = (0, 1) (0.25, 1) (0.25, 1/2)
    # (0.5, 2/3) (0.75, 3/4) (1, 4/5) -> 0.25 + 0.25 * ((1/2 + 2/3) + (2/3 + 3/4) + (3/4 + 4/5)) / 2.
    assert o["aupr_out"] == pytest.approx(0.25 + 0.25 * ((1 / 2 + 2 / 3) + (2 / 3 + 3 / 4) + (3 / 4 + 4 / 5)) / 2)


def test_fpr95_may_pick_a_recall_below_095():
    # 12 ID: 0.5 and 2..12; 4 OOD: 0.5 (tied with an ID), 1.5, 0.2, 0.1.
    # Thresholds: 12..2 (recall 11/12, fp 0), 1.5 (11/12, fp 1), 0.5 (ID+OOD tie: recall 1, fp 2).
    # Papers: |1 - 0.95| = 0.05 > |11/12 - 0.95| = 0.033, walk 0.5 -> 1.5 => fp 1 of 4 = 0.25.
    # First TPR >= 0.95 is the tie group at 0.5 => fp 2 of 4 = 0.5.
    idv = np.r_[0.5, np.arange(2, 13)]
    ood = np.array([0.5, 1.5, 0.2, 0.1])
    assert ood_metrics(idv, ood)["fpr95"] == 0.25
    assert fpr_at_recall(idv, ood, rule="at_least") == 0.5
    # OpenOOD: all 4 OOD caught at score <= 1.5 -> the ID 0.5 is flagged: 1/12.
    assert ood_metrics_openood(idv, ood)["fpr95_openood"] == pytest.approx(1 / 12)


def test_all_ties_and_perfect_separation():
    # Every score equal: one threshold, everything accepted -> FPR 1, AUROC 1/2, AP = ID share.
    m = ood_metrics([1.0, 1.0], [1.0, 1.0, 1.0])
    assert m == pytest.approx({"fpr95": 1.0, "auroc": 0.5, "aupr": 2 / 5})
    m = ood_metrics([3.0, 2.0], [1.0, 0.0])
    assert m == pytest.approx({"fpr95": 0.0, "auroc": 1.0, "aupr": 1.0})


def test_auroc_and_aupr_equal_sklearn_on_random_tied_data():
    rng = np.random.default_rng(3)
    for _ in range(20):
        idv = np.round(rng.normal(0.5, 1, rng.integers(1, 40)) * 4) / 4
        ood = np.round(rng.normal(0, 1, rng.integers(1, 40)) * 4) / 4
        y = np.r_[np.ones(idv.size), np.zeros(ood.size)]
        s = np.r_[idv, ood]
        m = ood_metrics(idv, ood)
        assert m["auroc"] == roc_auc_score(y, s)
        assert m["aupr"] == average_precision_score(y, s)
        assert m["auroc"] == pytest.approx(ood_metrics_openood(idv, ood)["auroc_openood"])


def test_inputs_as_tensors_and_float32_and_include_openood():
    idv = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float32)
    m = ood_metrics(idv, np.array([0.75, 0.5, 0.4], dtype=np.float32), include_openood=True)
    assert set(m) == {"fpr95", "auroc", "aupr", "fpr95_openood", "auroc_openood", "aupr_in", "aupr_out"}
    assert m["fpr95"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("idv, ood, match", [
    ([], [1.0], "id_scores is empty"),
    ([1.0], [], "ood_scores is empty"),
    ([1.0, np.nan], [0.0], r"id_scores contains 1 NaN/inf values \(first at index 1\)"),
    ([1.0], [np.inf], "ood_scores contains 1 NaN/inf"),
    (["a"], [1.0], "must be numeric"),
])
def test_bad_input_raises(idv, ood, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(idv, ood)


def test_bad_level_and_rule():
    with pytest.raises(ValueError, match=r"recall_level must be in \(0, 1\]"):
        ood_metrics([1.0], [0.0], recall_level=95)
    with pytest.raises(ValueError, match="unknown FPR rule"):
        fpr_at_recall([1.0], [0.0], rule="first")


def test_evaluate_all_layout():
    res = evaluate_all({"MCM": [0.9, 0.8, 0.7, 0.6]}, {"SUN": {"MCM": [0.75, 0.5, 0.4]}, "Texture": {"MCM": [0.0]}})
    assert list(res) == ["MCM"] and list(res["MCM"]) == ["SUN", "Texture"]
    assert res["MCM"]["SUN"]["fpr95"] == pytest.approx(1 / 3)
    assert res["MCM"]["Texture"] == pytest.approx({"fpr95": 0.0, "auroc": 1.0, "aupr": 1.0})
    with pytest.raises(ValueError, match="OOD set 'SUN' has no scores for \\['GL-MCM'\\]"):
        evaluate_all({"MCM": [1.0], "GL-MCM": [1.0]}, {"SUN": {"MCM": [0.0]}})


@pytest.mark.parametrize("n_id", [9, 12, 37])
def test_perfect_separation_stays_within_unit_interval(n_id):
    # sklearn's average precision can sum to a hair above 1 (1.0000000000000002 for 9 ID images);
    # results files require [0, 1], so the metric is clipped there -- and otherwise equals sklearn's.
    from locoop.ood.metrics import ood_metrics as metrics

    id_s, ood_s = np.linspace(0.5, 0.9, n_id), np.linspace(0.0, 0.4, 5)
    ap = average_precision_score(np.r_[np.ones(n_id), np.zeros(5)], np.r_[id_s, ood_s])
    m = metrics(id_s, ood_s, include_openood=True)
    assert m["aupr"] == min(1.0, ap) == pytest.approx(1.0, abs=1e-12)
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0
    assert all(0.0 <= v <= 1.0 for v in m.values())
