"""Bootstrap intervals: the vectorised replicates equal a plain loop over the project's metric functions."""
import numpy as np
import pytest

from locoop.ood.bootstrap import (METRICS, bootstrap_metrics, bootstrap_run_dirs, bootstrap_runs, bootstrap_seeds,
                                  load_scores_npz, metrics_from_counts, to_percent)
from locoop.ood.metrics import ood_metrics, ood_metrics_openood

EXACT = ("fpr95", "fpr95_openood")  # ratios of integer counts: identical
CLOSE = ("auroc", "auroc_openood", "aupr", "aupr_in", "aupr_out")  # float sums in another order


def _data(kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        return rng.normal(1.0, 1.0, 120), {"A": rng.normal(0.0, 1.0, 50), "B": rng.normal(0.5, 1.0, 33)}
    if kind == "ties":  # few distinct values: every tie rule matters
        return (np.round(rng.normal(1.0, 1.0, 90), 1),
                {"A": np.round(rng.normal(0.0, 1.0, 40), 1), "B": rng.integers(0, 3, 25) * 0.5})
    if kind == "separated":
        return rng.uniform(2, 3, 30), {"A": rng.uniform(0, 1, 20)}
    if kind == "coarse":
        return rng.integers(0, 4, 60).astype(float), {"A": rng.integers(0, 4, 15).astype(float)}
    raise ValueError(kind)


def _loop(id_s, sets, n, seed):
    """The definition, spelled out: draw per replicate (ID, then each set), call the metric functions."""
    rng = np.random.default_rng(seed)
    out = {name: {m: [] for m in METRICS} for name in sets}
    for _ in range(n):
        ii = rng.integers(0, id_s.size, id_s.size)
        for name, ood in sets.items():
            oo = rng.integers(0, ood.size, ood.size)
            for m, v in ood_metrics(id_s[ii], ood[oo], include_openood=True).items():
                out[name][m].append(v)
    return {name: {m: np.array(v) for m, v in per.items()} for name, per in out.items()}


@pytest.mark.parametrize("kind", ["continuous", "ties", "separated", "coarse"])
def test_replicates_equal_the_loop(kind):
    id_s, sets = _data(kind)
    got = bootstrap_metrics(id_s, sets, n_resamples=40, seed=7, metrics=METRICS, keep_samples=True)
    ref = _loop(id_s, sets, 40, 7)
    for name in sets:
        for m in EXACT:
            assert np.array_equal(got["samples"][name][m], ref[name][m]), (name, m)
        for m in CLOSE:
            assert np.allclose(got["samples"][name][m], ref[name][m], rtol=0, atol=1e-12), (name, m)
    # intervals: percentiles of the replicates; the Average row averages the sets per replicate
    for m in METRICS:
        avg = np.mean([ref[name][m] for name in sets], axis=0)
        lo, hi = np.percentile(avg, [2.5, 97.5])
        ci = got["sets"]["Average"][m]
        assert ci["low"] == pytest.approx(lo, abs=1e-12) and ci["high"] == pytest.approx(hi, abs=1e-12)
        assert ci["se"] == pytest.approx(np.std(avg, ddof=1), abs=1e-12)
        full = ood_metrics(id_s, sets["A"], include_openood=True)[m]
        assert got["sets"]["A"][m]["estimate"] == full
    assert (got["n_resamples"], got["seed"], got["confidence"]) == (40, 7, 0.95)
    assert "integers(0, n_id, n_id)" in got["rng"] and got["method"].startswith("percentile bootstrap over images")


def test_unit_weights_are_the_metrics_of_the_data():
    id_s, sets = _data("ties", seed=3)
    ood = sets["A"]
    grid = np.unique(np.concatenate([id_s, ood]))[::-1]
    w_id = np.array([np.sum(id_s == v) for v in grid])
    w_ood = np.array([np.sum(ood == v) for v in grid])
    got = metrics_from_counts(w_id, w_ood)
    ref = ood_metrics(id_s, ood, include_openood=True)
    for m in METRICS:
        assert got[m][0] == pytest.approx(ref[m], abs=1e-12), m


def test_openood_fpr_follows_sklearn_drop_intermediate():
    # ascending scores: 18 OOD alone, then three values with one OOD and one ID each, then 17 ID.
    # OOD-positive ROC points (tp, fp): ... (18, 0), (19, 1), (20, 2): (19, 1) is collinear, so
    # roc_curve drops it and the first TPR >= 0.95 point is (20, 2): FPR 0.1, not 0.05.
    ood = np.r_[np.arange(18.0), 18.0, 19.0]
    id_s = np.r_[18.0, 19.0, np.arange(20.0, 38.0)]
    assert ood_metrics_openood(id_s, ood)["fpr95_openood"] == pytest.approx(0.1)
    grid = np.unique(np.concatenate([id_s, ood]))[::-1]
    w_id = np.array([[np.sum(id_s == v) for v in grid]])
    w_ood = np.array([[np.sum(ood == v) for v in grid]])
    assert metrics_from_counts(w_id, w_ood, ["fpr95_openood"])["fpr95_openood"][0] == pytest.approx(0.1)


def test_bootstrap_seeds_resamples_runs():
    vals = [0.1, 0.3, 0.2]
    got = bootstrap_seeds(vals, n_resamples=200, seed=5)
    rng = np.random.default_rng(5)
    means = [np.mean([vals[i] for i in rng.integers(0, 3, 3)]) for _ in range(200)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert got["estimate"] == pytest.approx(0.2)
    assert got["low"] == pytest.approx(lo) and got["high"] == pytest.approx(hi)
    assert got["n_runs"] == 3 and got["n_resamples"] == 200 and got["seed"] == 5
    one = bootstrap_seeds([0.4], n_resamples=10)
    assert one["low"] == one["high"] == one["estimate"] == 0.4


def test_bootstrap_runs_combines_images_and_seeds():
    runs = [_data("continuous", seed=s) for s in (1, 2)]
    got = bootstrap_runs(runs, n_resamples=40, seed=3, metrics=["fpr95", "auroc"])
    for r, (id_s, sets) in enumerate(runs):
        alone = bootstrap_metrics(id_s, sets, 40, metrics=["fpr95", "auroc"], keep_samples=True,
                                  rng=np.random.default_rng([3, r]))
        assert got["per_run"][r]["sets"] == alone["sets"]
    samples = [bootstrap_metrics(id_s, sets, 40, metrics=["auroc"], keep_samples=True,
                                 rng=np.random.default_rng([3, r]))["samples"]["B"]["auroc"]
               for r, (id_s, sets) in enumerate(runs)]
    lo, hi = np.percentile(np.mean(samples, axis=0), [2.5, 97.5])
    img = got["mean"]["images"]["B"]["auroc"]
    assert img["low"] == pytest.approx(lo) and img["high"] == pytest.approx(hi)
    est = [p["sets"]["B"]["auroc"]["estimate"] for p in got["per_run"]]
    assert got["mean"]["seeds"]["B"]["auroc"] == bootstrap_seeds(est, 40, 3)
    assert got["n_runs"] == 2 and "samples" not in got["per_run"][0]
    with pytest.raises(ValueError, match="different OOD sets"):
        bootstrap_runs([runs[0], (runs[1][0], {"A": runs[1][1]["A"]})], n_resamples=5)


def test_run_folders_and_percent(tmp_path):
    for r in (1, 2):
        id_s, sets = _data("ties", seed=r)
        zeros = np.zeros(id_s.size, dtype=np.int64)
        arrays = {"id_labels": zeros, "id_predictions": zeros,
                  "ID/MCM": id_s, "ID/GL-MCM": id_s * 2}
        for name, v in sets.items():
            arrays[f"{name}/MCM"], arrays[f"{name}/GL-MCM"] = v, v * 2
        (tmp_path / f"seed{r}").mkdir()
        np.savez_compressed(tmp_path / f"seed{r}" / "ood_scores.npz", **arrays)
    loaded = load_scores_npz(tmp_path / "seed1")
    assert sorted(loaded) == ["GL-MCM", "MCM"] and sorted(loaded["MCM"][1]) == ["A", "B"]
    res = bootstrap_run_dirs([tmp_path / "seed1", tmp_path / "seed2"], n_resamples=20, seed=1)
    assert sorted(res) == ["GL-MCM", "MCM"]
    # the score is invariant to the monotone map x -> 2x
    assert res["MCM"]["mean"]["images"] == res["GL-MCM"]["mean"]["images"]
    pct = to_percent(res["MCM"])
    ci, ci_pct = res["MCM"]["per_run"][0]["sets"]["A"]["auroc"], pct["per_run"][0]["sets"]["A"]["auroc"]
    assert ci_pct["low"] == pytest.approx(100 * ci["low"]) and pct["n_resamples"] == 20
    with pytest.raises(FileNotFoundError, match="ood_scores.npz"):
        load_scores_npz(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no per-image scores for"):
        bootstrap_run_dirs([tmp_path / "seed1"], scores=["energy"], n_resamples=5)


def test_bad_arguments():
    id_s, sets = _data("continuous")
    for kwargs, msg in (({"n_resamples": 1}, "n_resamples"), ({"confidence": 1.0}, "confidence"),
                        ({"metrics": ["fpr90"]}, "unknown bootstrap metrics")):
        with pytest.raises(ValueError, match=msg):
            bootstrap_metrics(id_s, sets, **kwargs)
    with pytest.raises(ValueError, match="at least one OOD set"):
        bootstrap_metrics(id_s, {})
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_metrics(np.r_[id_s, np.nan], sets, n_resamples=5)
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_metrics(id_s[:1], sets, n_resamples=5)
