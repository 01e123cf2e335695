"""Result files, histograms and the seed summary (locoop/ood/results.py, summarize.py, viz/plots.py)."""
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from locoop.cli import main as cli_main
from locoop.ood.results import format_table, read_results, with_average, write_results
from locoop.ood.summarize import summarize_runs
from locoop.viz.plots import plot_roc, plot_score_histograms

# Fractions; the files hold percent.
RESULTS = {
    "MCM": {
        "iNaturalist": {"fpr95": 0.30, "auroc": 0.90, "aupr": 0.95},
        "Texture": {"fpr95": 0.50, "auroc": 0.80, "aupr": 0.85},
    },
    "GL-MCM": {
        "iNaturalist": {"fpr95": 0.20, "auroc": 0.95, "aupr": 0.97},
        "Texture": {"fpr95": 0.40, "auroc": 0.85, "aupr": 0.89},
    },
}
META = {
    "config": {"OOD": {"T": 1.0}, "SEED": 1},
    "classnames_hash": "abc123",
    "split_hash": "def456",
    "num_images": {"ImageNet": 10, "iNaturalist": 5, "Texture": 4},
    "num_skipped": {"ImageNet": 1, "iNaturalist": 0, "Texture": 0},
    "env": {"torch": "x"},
}


def test_average_row_is_the_mean_over_sets():
    avg = with_average(RESULTS)
    # MCM: fpr (0.30 + 0.50) / 2 = 0.40, auroc (0.90 + 0.80) / 2 = 0.85, aupr (0.95 + 0.85) / 2 = 0.90
    assert avg["MCM"]["Average"] == pytest.approx({"fpr95": 0.40, "auroc": 0.85, "aupr": 0.90})
    assert list(avg["MCM"]) == ["iNaturalist", "Texture", "Average"]
    assert "Average" not in RESULTS["MCM"]  # input untouched


def test_write_results_files(tmp_path):
    paths = write_results(tmp_path / "run", RESULTS, META, id_accuracy=0.7125)
    assert set(paths) == {"md", "csv", "json"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "ood_results.csv", "ood_results.json", "ood_results.md"]  # no temporary files left

    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["score"] for r in rows] == ["MCM"] * 3 + ["GL-MCM"] * 3
    assert [r["ood_set"] for r in rows] == ["iNaturalist", "Texture", "Average"] * 2
    gl_avg = rows[5]  # GL-MCM average: (20 + 40) / 2, (95 + 85) / 2, (97 + 89) / 2 in percent
    assert float(gl_avg["fpr95"]) == pytest.approx(30.0)
    assert float(gl_avg["auroc"]) == pytest.approx(90.0)
    assert float(gl_avg["aupr"]) == pytest.approx(93.0)

    doc = json.loads(paths["json"].read_text())
    assert doc["positive_class"] == "ID" and doc["units"] == "percent"
    assert "closest to 0.95" in doc["fpr_convention"]
    assert doc["id_accuracy"] == pytest.approx(71.25)
    assert doc["scores"]["MCM"]["Texture"] == pytest.approx({"fpr95": 50.0, "auroc": 80.0, "aupr": 85.0})
    assert doc["scores"]["MCM"]["Average"] == pytest.approx({"fpr95": 40.0, "auroc": 85.0, "aupr": 90.0})
    assert doc["meta"] == META
    assert read_results(tmp_path / "run")["scores"] == doc["scores"]

    md = paths["md"].read_text()
    assert "ID accuracy: 71.25%" in md
    assert "Positive class: ID" in md
    assert "## MCM" in md and "## GL-MCM" in md
    assert "| OOD set | FPR95 ↓ | AUROC ↑ | AUPR ↑ |" in md
    assert "| iNaturalist | 30.00 | 90.00 | 95.00 |" in md
    assert "| Average | 40.00 | 85.00 | 90.00 |" in md


def test_env_is_collected_and_accuracy_may_sit_in_results(tmp_path):
    res = dict(RESULTS, id_accuracy=0.5)
    doc = json.loads(write_results(tmp_path, res, {"config": {}})["json"].read_text())
    assert doc["id_accuracy"] == pytest.approx(50.0)
    env = doc["meta"]["env"]
    for key in ("python", "torch", "torchvision", "numpy", "sklearn", "locoop", "device"):
        assert env[key]


def test_extra_metric_keys_go_to_csv_and_json(tmp_path):
    res = {"MCM": {"SUN": {"fpr95": 0.1, "auroc": 0.9, "aupr": 0.8, "fpr95_openood": 0.05}}}
    paths = write_results(tmp_path, res, {"env": {}})
    rows = list(csv.DictReader(paths["csv"].open()))
    assert float(rows[0]["fpr95_openood"]) == pytest.approx(5.0)
    assert json.loads(paths["json"].read_text())["scores"]["MCM"]["Average"]["fpr95_openood"] == pytest.approx(5.0)


@pytest.mark.parametrize("bad, match", [
    ({"MCM": {"SUN": {"fpr95": 30.0, "auroc": 0.9, "aupr": 0.9}}}, "outside \\[0, 1\\]; pass fractions"),
    ({"MCM": {"SUN": {"auroc": 0.9, "aupr": 0.9}}}, "lacks \\['fpr95'\\]"),
    ({"MCM": {"Average": {"fpr95": 0.1, "auroc": 0.9, "aupr": 0.9}}}, "reserved"),
    ({"MCM": {"SUN": {"fpr95": math.nan, "auroc": 0.9, "aupr": 0.9}}}, "not a finite number"),
    ({}, "non-empty"),
])
def test_bad_results_rejected_before_writing(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        write_results(tmp_path / "out", bad, {"env": {}})
    assert not (tmp_path / "out").exists()


def test_format_table():
    text = format_table(RESULTS, id_accuracy=0.7125)
    lines = text.splitlines()
    assert lines[0] == "ID accuracy: 71.25%"
    assert "[GL-MCM]" in lines
    avg_line = [ln for ln in lines if ln.startswith("Average")][0]  # MCM comes first
    assert avg_line.split()[1:] == ["40.00", "85.00", "90.00"]


def test_histograms_and_roc_are_valid_pngs(tmp_path):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    idv = rng.normal(1.0, 0.2, 50)
    sets = {"iNaturalist": rng.normal(0.5, 0.2, 30), "Places 365/x": rng.normal(0.7, 0.3, 20)}
    open_before = plt.get_fignums()
    paths = plot_score_histograms(idv, sets, "GL-MCM", tmp_path / "hist")
    assert [p.name for p in paths] == ["hist_GL-MCM_iNaturalist.png", "hist_GL-MCM_Places_365_x.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    roc = plot_roc(idv, sets, "MCM", tmp_path / "roc.png")
    with Image.open(roc) as im:
        assert im.format == "PNG"
    assert plt.get_fignums() == open_before  # nothing left open in pyplot
    # All-equal scores still give a histogram; empty or NaN input is refused.
    assert plot_score_histograms([1.0, 1.0], {"x": [1.0]}, "MCM", tmp_path)[0].is_file()
    with pytest.raises(ValueError, match="empty"):
        plot_score_histograms(idv, {"x": []}, "MCM", tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        plot_score_histograms([np.nan], {"x": [1.0]}, "MCM", tmp_path)


def _seed_run(root, seed, fpr_inat, acc):
    res = {
        "MCM": {
            "iNaturalist": {"fpr95": fpr_inat, "auroc": 0.90, "aupr": 0.95},
            "Texture": {"fpr95": 0.50, "auroc": 0.80, "aupr": 0.85},
        },
    }
    write_results(root / f"seed{seed}", res, {"env": {}}, id_accuracy=acc)
    return root / f"seed{seed}"


def test_summarize_three_seeds(tmp_path):
    runs = [_seed_run(tmp_path, s, f, a) for s, f, a in ((1, 0.30, 0.70), (2, 0.33, 0.71), (3, 0.36, 0.72))]
    out = tmp_path / "summary"
    summary = summarize_runs(runs, output_dir=out)
    assert summary["n_runs"] == 3 and summary["std"] == "population (ddof=0)"
    inat = summary["scores"]["MCM"]["iNaturalist"]["fpr95"]
    # 30, 33, 36 -> mean 33, population std sqrt((9 + 0 + 9) / 3) = sqrt(6)
    assert inat["mean"] == pytest.approx(33.0) and inat["std"] == pytest.approx(math.sqrt(6))
    assert inat["values"] == pytest.approx([30.0, 33.0, 36.0])
    # Average fpr per seed: (30+50)/2=40, (33+50)/2=41.5, (36+50)/2=43 -> mean 41.5, std sqrt(1.5)
    avg = summary["scores"]["MCM"]["Average"]["fpr95"]
    assert avg["mean"] == pytest.approx(41.5) and avg["std"] == pytest.approx(math.sqrt(1.5))
    tex = summary["scores"]["MCM"]["Texture"]["auroc"]
    assert tex["mean"] == pytest.approx(80.0) and tex["std"] == pytest.approx(0.0, abs=1e-12)
    # accuracy 70, 71, 72 -> 71 +- sqrt(2/3)
    assert summary["id_accuracy"]["mean"] == pytest.approx(71.0)
    assert summary["id_accuracy"]["std"] == pytest.approx(math.sqrt(2 / 3))

    doc = json.loads((out / "summary.json").read_text())
    assert doc["scores"]["MCM"]["iNaturalist"]["fpr95"]["mean"] == pytest.approx(33.0)
    md = (out / "summary.md").read_text()
    assert "| iNaturalist | 33.00 ± 2.45 | 90.00 ± 0.00 | 95.00 ± 0.00 |" in md
    assert "| Average | 41.50 ± 1.22 | 85.00 ± 0.00 | 90.00 ± 0.00 |" in md

    # Sample std: 30, 33, 36 -> 3.
    assert summarize_runs(runs, ddof=1)["scores"]["MCM"]["iNaturalist"]["fpr95"]["std"] == pytest.approx(3.0)


def test_summarize_rejects_mismatched_runs(tmp_path):
    a = _seed_run(tmp_path, 1, 0.3, 0.7)
    b = tmp_path / "other"
    write_results(b, {"MCM": {"iNaturalist": {"fpr95": 0.3, "auroc": 0.9, "aupr": 0.9}}}, {"env": {}}, id_accuracy=0.7)
    with pytest.raises(ValueError, match="OOD sets differ.*extra \\['Texture'\\]"):
        summarize_runs([a, b])
    c = tmp_path / "scores"
    write_results(c, {"GL-MCM": {"iNaturalist": {"fpr95": 0.3, "auroc": 0.9, "aupr": 0.9},
                                 "Texture": {"fpr95": 0.3, "auroc": 0.9, "aupr": 0.9}}}, {"env": {}}, id_accuracy=0.7)
    with pytest.raises(ValueError, match="has scores \\['GL-MCM'\\] but .* has \\['MCM'\\]"):
        summarize_runs([a, c])
    with pytest.raises(FileNotFoundError, match="no ood_results.json at"):
        summarize_runs([tmp_path / "missing"])


def test_summarize_command(tmp_path, capsys):
    for s, f in ((1, 0.30), (2, 0.33), (3, 0.36)):
        _seed_run(tmp_path / "exp", s, f, 0.7)
    # Two explicit runs plus a glob that also matches them again: duplicates are counted once.
    rc = cli_main(["summarize", str(tmp_path / "exp" / "seed1"), str(tmp_path / "exp" / "seed2"),
                   "--glob", str(tmp_path / "exp" / "seed*")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 runs" in out
    doc = json.loads((tmp_path / "exp" / "summary.json").read_text())  # default: the runs' parent
    assert doc["n_runs"] == 3
    assert doc["scores"]["MCM"]["iNaturalist"]["fpr95"]["mean"] == pytest.approx(33.0)

    rc = cli_main(["summarize", "--glob", str(tmp_path / "exp" / "**" / "ood_results.json"),
                   "--output", str(tmp_path / "o")])
    assert rc == 0 and (tmp_path / "o" / "summary.md").is_file()

    assert cli_main(["summarize", str(tmp_path / "nope")]) == 2
    assert "no ood_results.json" in capsys.readouterr().err
    assert cli_main(["summarize"]) == 2
