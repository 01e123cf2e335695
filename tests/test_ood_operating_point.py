"""The FPR95 operating point (locoop/ood/metrics.py operating_point): threshold and recall behind fpr_at_recall."""
import numpy as np
import pytest

from locoop.ood.metrics import fpr_at_recall, operating_point


def test_plateau_example_gives_the_lowest_threshold_of_the_plateau():
    # 20 ID: 10..28 and 0; 4 OOD: 7, 6, 5, -1 (worked out in test_ood_metrics): the papers' rule walks
    # from full recall (threshold 0) upwards and stops at the first recall 0.95 point, threshold 5,
    # where 3 of the 4 OOD scores (7, 6, 5) are accepted. "At least 0.95" stops at threshold 10.
    idv = np.r_[np.arange(10, 29), 0.0]
    ood = np.array([7, 6, 5, -1.0])
    assert operating_point(idv, ood) == {"fpr": 0.75, "threshold": 5.0, "tpr": 0.95}
    assert operating_point(idv, ood, rule="at_least") == {"fpr": 0.0, "threshold": 10.0, "tpr": 0.95}


def test_recall_below_095_is_reported():
    # 12 ID: 0.5 and 2..12; OOD 0.5, 1.5, 0.2, 0.1: recall 11/12 at threshold 1.5 is closer to 0.95 than 1.
    idv = np.r_[0.5, np.arange(2, 13)]
    ood = np.array([0.5, 1.5, 0.2, 0.1])
    p = operating_point(idv, ood)
    assert p["threshold"] == 1.5 and p["tpr"] == pytest.approx(11 / 12) and p["fpr"] == 0.25


@pytest.mark.parametrize("seed", range(5))
def test_threshold_reproduces_the_fpr_and_tpr_by_counting(seed):
    rng = np.random.default_rng(seed)
    idv = np.round(rng.normal(1.0, 0.5, 57), 1)  # rounding makes ties, also across ID and OOD
    ood = np.round(rng.normal(0.3, 0.5, 31), 1)
    for rule in ("closest", "at_least"):
        p = operating_point(idv, ood, rule=rule)
        assert p["fpr"] == fpr_at_recall(idv, ood, rule=rule)
        assert p["fpr"] == pytest.approx(np.mean(ood >= p["threshold"]))
        assert p["tpr"] == pytest.approx(np.mean(idv >= p["threshold"]))
