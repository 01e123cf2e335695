"""Bootstrap intervals: the vectorised replicates equal a plain loop over the project's metric functions."""
import json

import numpy as np
import pytest
import torch

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


# ------------------------------------------------------------------------------------ summarize and eval
SETS = ("iNaturalist", "SUN", "Places", "Texture")


def _write_run(folder, seed, scores=("MCM", "GL-MCM"), npz=True):
    """A run folder as the OOD evaluation writes it: ood_results.json from the per-image scores in ood_scores.npz."""
    from locoop.ood.results import write_results

    rng = np.random.default_rng(seed)
    id_s = {s: rng.normal(1.0 + 0.1 * k, 1.0, 40) for k, s in enumerate(scores)}
    ood = {o: {s: rng.normal(0.2 * j, 1.0, 15 + j) for s in scores} for j, o in enumerate(SETS)}
    results = {s: {o: ood_metrics(id_s[s], ood[o][s]) for o in SETS} for s in scores}
    write_results(folder, results, meta={"env": {}}, id_accuracy=0.5)
    if npz:
        arrays = {"id_labels": np.zeros(40, dtype=np.int64), "id_predictions": np.zeros(40, dtype=np.int64)}
        arrays.update({f"ID/{s}": v for s, v in id_s.items()})
        arrays.update({f"{o}/{s}": v for o, per in ood.items() for s, v in per.items()})
        np.savez_compressed(folder / "ood_scores.npz", **arrays)
    return id_s, ood


def _loop_interval(id_s, ood, n, seed, metric, conf=0.95):
    """One run's Average interval, spelled out: default_rng([seed, 0]), per replicate ID then each set."""
    rng = np.random.default_rng([seed, 0])
    vals = []
    for _ in range(n):
        ii = rng.integers(0, id_s.size, id_s.size)
        per_set = []
        for o in SETS:
            oo = rng.integers(0, ood[o].size, ood[o].size)
            per_set.append(ood_metrics(id_s[ii], ood[o][oo])[metric])
        vals.append(np.mean(per_set))
    return np.percentile(100 * np.array(vals), [100 * (1 - conf) / 2, 100 * (1 + conf) / 2])


def _cli(args, capsys):
    from locoop.cli import main as cli_main

    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_summarize_prints_and_records_intervals(tmp_path, capsys):
    runs = {s: _write_run(tmp_path / "runs" / f"seed{s}", s) for s in (1, 2, 3)}
    rc, out, err = _cli(["summarize"] + [tmp_path / "runs" / f"seed{s}" for s in runs]
                        + ["--bootstrap", "60", "--bootstrap-seed", "4", "--confidence", "0.9"], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "runs/summary.json").read_text())
    boot = summary["bootstrap"]
    assert (boot["n_resamples"], boot["seed"], boot["confidence"], boot["n_runs"]) == (60, 4, 0.9, 3)
    assert boot["metrics"] == ["fpr95", "auroc", "aupr"] and "default_rng([seed, r])" in boot["rng"]
    assert set(boot["scores"]) == {"MCM", "GL-MCM"} and set(boot["scores"]["MCM"]) == set(SETS) | {"Average"}
    # run 1's interval of its Average AUROC equals the definition written out
    per_run = boot["per_run"][0]["scores"]["MCM"]["Average"]["auroc"]
    id_s, ood = runs[1]
    lo, hi = _loop_interval(id_s["MCM"], {o: ood[o]["MCM"] for o in SETS}, 60, 4, "auroc", conf=0.9)
    assert per_run["low"] == pytest.approx(lo, abs=1e-9) and per_run["high"] == pytest.approx(hi, abs=1e-9)
    # the estimates are the summary's means; the seed interval resamples the three runs' estimates
    cell = boot["scores"]["MCM"]["SUN"]["fpr95"]
    mean = summary["scores"]["MCM"]["SUN"]["fpr95"]
    assert cell["images"]["estimate"] == pytest.approx(mean["mean"]) == pytest.approx(cell["seeds"]["estimate"])
    assert cell["seeds"] == pytest.approx(bootstrap_seeds(mean["values"], 60, 4, 0.9))
    assert min(mean["values"]) <= cell["seeds"]["low"] <= cell["seeds"]["high"] <= max(mean["values"])
    md = (tmp_path / "runs/summary.md").read_text()
    assert "## Bootstrap confidence intervals over images" in md
    assert "## Bootstrap confidence intervals over seeds" in md
    assert "90 % percentile intervals, 60 resamples, bootstrap seed 4" in md
    a = boot["scores"]["GL-MCM"]["Average"]["auroc"]["images"]
    assert f"{a['estimate']:.2f} [{a['low']:.2f}, {a['high']:.2f}]" in md and "over seeds (3 runs resampled)" in out
    assert "Bootstrap 90 % intervals (60 resamples, bootstrap seed 4)" in out

    # --paper keeps working next to the intervals
    rc, out, err = _cli(["summarize", tmp_path / "runs" / "seed1", "--bootstrap", "20", "--paper", "setar-mcm-imagenet",
                         "--output", tmp_path / "one"], capsys)
    assert rc == 0, err
    one = json.loads((tmp_path / "one/summary.json").read_text())
    assert one["paper_comparison"]["row"]["id"] == "setar-mcm-imagenet" and one["bootstrap"]["n_runs"] == 1
    assert one["bootstrap"]["scores"]["MCM"]["SUN"]["fpr95"]["seeds"] is None and "Paper row" in out
    assert "over seeds" not in out

    rc, out, err = _cli(["summarize", tmp_path / "runs" / "seed1", "--bootstrap", "0", "--output", tmp_path / "off"],
                        capsys)
    assert rc == 0 and "bootstrap" not in json.loads((tmp_path / "off/summary.json").read_text())


def test_summarize_without_or_with_foreign_per_image_scores(tmp_path, capsys):
    _write_run(tmp_path / "a", 1)
    _write_run(tmp_path / "b", 2, npz=False)
    rc, out, err = _cli(["summarize", tmp_path / "a", tmp_path / "b", "--bootstrap", "10", "--output", tmp_path],
                        capsys)
    assert rc == 0, err
    assert "Bootstrap intervals not computed: no per-image scores (ood_scores.npz) in" in out
    assert str(tmp_path / "b") in out
    assert "skipped" in json.loads((tmp_path / "summary.json").read_text())["bootstrap"]
    # per-image scores of another evaluation than the results file: refused
    _write_run(tmp_path / "c", 3)
    (tmp_path / "c" / "ood_scores.npz").write_bytes((tmp_path / "a" / "ood_scores.npz").read_bytes())
    rc, _, err = _cli(["summarize", tmp_path / "c", "--bootstrap", "10", "--output", tmp_path], capsys)
    assert rc == 2 and "does not match" in err and "same evaluation" in err
    rc, _, err = _cli(["summarize", tmp_path / "a", "--bootstrap", "1"], capsys)
    assert rc == 2 and "replicates >= 2" in err


def test_eval_writes_per_run_intervals_when_asked(tmp_path, tiny_vit_path):
    import clip
    from locoop.config import get_cfg_default, merge_cfg
    from locoop.data.synthetic import make_imagenet_like, make_ood_sets
    from locoop.ood.runner import run_ood_benchmark

    make_imagenet_like(str(tmp_path / "data"), num_classes=3, train_per_class=0, val_per_class=4, image_size=(40, 40))
    make_ood_sets(str(tmp_path / "data"), names=["SUN", "Texture"], per_set=5, image_size=(40, 40), seed=1)
    cfg = get_cfg_default()
    merge_cfg(cfg, "configs/datasets/imagenet.yaml", "configs/trainers/LoCoOp/vit_b16_ep50.yaml",
              {"DATASET.ROOT": str(tmp_path / "data")},
              ["INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0", "OOD.DATASETS", "['SUN', 'Texture']",
               "OOD.SCORES", "['MCM', 'energy']", "OOD.PLOT", "False", "VERBOSE", "False", "OOD.USE_CACHE", "False",
               "OOD.BOOTSTRAP", "30", "OOD.BOOTSTRAP_SEED", "7", "OOD.FPR_CONVENTION", "openood"])
    model = clip.load(tiny_vit_path, device="cpu")[0]
    with torch.no_grad():
        text = model.encode_text(clip.tokenize([f"a photo of a {i}." for i in range(3)]))
    res = run_ood_benchmark(cfg, model, text, tmp_path / "run", verbose=False)
    doc = json.loads((tmp_path / "run" / "ood_results.json").read_text())
    boot = doc["bootstrap"]
    assert (boot["n_resamples"], boot["seed"], boot["units"]) == (30, 7, "percent")
    assert boot["metrics"] == ["fpr95", "auroc", "aupr", "fpr95_openood", "auroc_openood", "aupr_in", "aupr_out"]
    npz = np.load(tmp_path / "run" / "ood_scores.npz")
    for score in ("MCM", "energy"):
        want = to_percent(bootstrap_metrics(npz[f"ID/{score}"], {o: npz[f"{o}/{score}"] for o in ("SUN", "Texture")},
                                            30, 7, metrics=boot["metrics"])["sets"])
        assert boot["scores"][score] == want
        for o in ("SUN", "Texture", "Average"):
            assert boot["scores"][score][o]["auroc"]["estimate"] == pytest.approx(doc["scores"][score][o]["auroc"])
    assert res["bootstrap"] == boot
    md = (tmp_path / "run" / "ood_results.md").read_text()
    assert "## Bootstrap confidence intervals over images" in md and "AUPR-Out" in md
