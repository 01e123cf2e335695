"""The shipped published results and ``summarize --paper``: a run's (or several seeds') table next to a row."""
import json
import re

import numpy as np
import pytest

from locoop.cli import main as cli_main
from locoop.data.datasets.ood import OOD_LAYOUT
from locoop.ood.results import write_results
from locoop.ood.summarize import (PAPER_RESULTS, compare_with_paper, get_paper_row, list_paper_rows,
                                  summarize_runs)


def test_every_row_names_its_source_and_is_consistent():
    rows = list_paper_rows()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) and "setar-gl-imagenet" in ids
    for r in rows:
        src = r["source"]
        assert src["paper"] and src["repository"] and re.fullmatch(r"[0-9a-f]{40}", src["commit"]), r["id"]
        # SeTAR's result files, or the table of GalLoP's README (LoCoOp / CoOp / zero-shot CLIP, to 0.1)
        assert src["file"].endswith(".csv") or (src["file"] == "README.md" and src["table"]), r["id"]
        assert r["score"] in ("MCM", "GL-MCM", "energy") and r["id_dataset"] in ("ImageNet", "PascalVOC")
        assert r["backbone"] in ("ViT-B/16", "ViT-L/14", "microsoft/swinv2-base-patch4-window16-256"), r["id"]
        assert set(r["ood"]) <= set(OOD_LAYOUT), r["id"]
        expected_sets = {"ImageNet": 4, "PascalVOC": 6}[r["id_dataset"]]
        assert len(r["ood"]) == expected_sets, r["id"]
        metrics = ("fpr95", "auroc", "aupr") if src["file"].endswith(".csv") else ("fpr95", "auroc")
        for m in list(r["ood"].values()) + [r["average"]]:
            assert set(m) == set(metrics) and all(0 <= v <= 100 for v in m.values())
        step = 10.0 ** -r.get("decimals", 2)
        for k in metrics:  # the published average is the mean of the published sets (both rounded)
            assert r["average"][k] == pytest.approx(np.mean([m[k] for m in r["ood"].values()]),
                                                    abs=step + 0.001), r["id"]
    row = get_paper_row("setar-gl-imagenet")  # spot check against the file it was copied from
    assert row["ood"]["iNaturalist"] == {"fpr95": 13.36, "auroc": 96.92, "aupr": 99.28}
    assert row["average"] == {"fpr95": 33.12, "auroc": 91.32, "aupr": 98.18} and row["id_accuracy"] == 63.966
    swin = get_paper_row("setar-energy-imagenet-swinv2b")  # SeTAR's Swin-V2 rows, from their files too
    assert swin["ood"]["Texture"] == {"fpr95": 45.37, "auroc": 84.76, "aupr": 96.99}
    assert swin["average"] == {"fpr95": 51.61, "auroc": 84.42, "aupr": 95.53} and swin["id_accuracy"] == 84.154
    assert get_paper_row("lora-gl-imagenet-swinv2b")["ood"]["Places"]["fpr95"] == 74.96
    locoop = get_paper_row("locoop-gl-16shot")  # GalLoP's README table, row "LoCoOp (GL-MCM)"
    assert locoop["ood"]["SUN"] == {"fpr95": 23.4, "auroc": 95.1} and locoop["average"] == {"fpr95": 28.7, "auroc": 93.5}
    assert locoop["id_accuracy"] == 71.5 and locoop["decimals"] == 1 and locoop["source"]["repository"] == "MarcLafon/gallop"
    assert get_paper_row("clip-mcm-zeroshot")["ood"]["Texture"] == {"fpr95": 57.9, "auroc": 86.1}
    with pytest.raises(ValueError, match="did you mean setar-gl-imagenet"):
        get_paper_row("setar-gl-imagnet")


def test_a_row_computed_with_another_lambda_local_says_so(tmp_path):
    """The GalLoP-table GL-MCM rows add L-MCM with weight 1; configs/zeroshot/GL-MCM.yaml uses 0.5."""
    def run(folder, lam):
        results = {"GL-MCM": {o: {"fpr95": 0.3, "auroc": 0.9, "aupr": 0.9}
                               for o in ("iNaturalist", "SUN", "Places", "Texture")}}
        write_results(folder, results, meta={"env": {}, "id_dataset": "ImageNet", "backbone": "ViT-B/16",
                                             "config": {"OOD": {"LAMBDA_LOCAL": lam, "T": 1.0}}}, id_accuracy=0.66)
        return folder
    notes = summarize_runs([run(tmp_path / "half", 0.5)], paper="clip-gl-zeroshot")["paper_comparison"]["notes"]
    assert any("computed with OOD.LAMBDA_LOCAL 1.0, the runs' with 0.5" in n for n in notes), notes
    notes = summarize_runs([run(tmp_path / "one", 1.0)], paper="clip-gl-zeroshot")["paper_comparison"]["notes"]
    assert not any("LAMBDA_LOCAL" in n for n in notes), notes
    # LoCoOp's shipped method config evaluates GL-MCM as its row was computed
    from locoop.config import merge_from_file
    from locoop.config.defaults import get_cfg_default

    cfg = merge_from_file(get_cfg_default(), str(PAPER_RESULTS.parents[2] / "configs/trainers/LoCoOp/vit_b16_ep50.yaml"))
    assert cfg.OOD.LAMBDA_LOCAL == get_paper_row("locoop-gl-16shot")["config"]["OOD.LAMBDA_LOCAL"]


def _own_rows(tmp_path, **change):
    """A user's paper-results file: one row typed in from a paper's table (values made up for the test)."""
    row = {"id": "my-table-row", "method": "LoCoOp", "score": "GL-MCM", "id_dataset": "ImageNet",
           "backbone": "ViT-B/16", "setting": "16-shot", "source": {"paper": "a paper", "table": "Table 1"},
           "ood": {o: {"fpr95": 20.0, "auroc": 95.0} for o in ("iNaturalist", "SUN", "Places", "Texture")},
           "average": {"fpr95": 20.0, "auroc": 95.0}}
    row.update(change)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"format_version": 1, "rows": [row]}))
    return path


def test_summarize_paper_file_compares_with_a_users_row(tmp_path, capsys):
    runs = _runs(tmp_path, [0.25])
    own = _own_rows(tmp_path)
    comp = summarize_runs(runs, paper="my-table-row", paper_file=own)["paper_comparison"]
    assert comp["sets"]["SUN"]["fpr95"]["diff"] == pytest.approx(5.0) and comp["notes"] == []
    assert comp["sets"]["Average"]["auroc"]["diff"] == pytest.approx(-5.0) and "aupr" not in comp["sets"]["SUN"]
    rc = cli_main(["summarize", str(runs[0]), "--paper", "my-table-row", "--paper-file", str(own), "--bootstrap", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Paper row my-table-row" in out and "a paper; source: Table 1" in out and "+5.00" in out
    assert cli_main(["summarize", "--paper", "list", "--paper-file", str(own)]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("1 published rows") and "my-table-row" in listing and "Table 1" in listing
    assert "setar-gl-imagenet" not in listing
    typo = _own_rows(tmp_path, ood={"Textures": {"fpr95": 20.0}, "SUN": {"fpr95": 20.0}})
    notes = summarize_runs(runs, paper="my-table-row", paper_file=typo)["paper_comparison"]["notes"]
    assert len(notes) == 2 and "no results for ['Textures']" in notes[0]
    assert "the runs' 'Texture' for the row's 'Textures'?" in notes[0]
    assert cli_main(["summarize", str(runs[0]), "--paper-file", str(own)]) == 2
    assert "needs --paper ROW" in capsys.readouterr().err
    assert cli_main(["summarize", str(runs[0]), "--paper", "setar-gl-imagenet", "--paper-file", str(own)]) == 2
    assert f"no published row 'setar-gl-imagenet' in {own}" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"score": "GL_MCM"}, "unknown score 'GL_MCM' \\(did you mean 'GL-MCM'\\?\\)"),
    ({"source": {"table": "Table 1"}}, "needs \"source\": {\"paper\""),
    ({"ood": {"SUN": {"fpr95": 0.2, "auroc": 0.95}}}, "ood.SUN.auroc = 0.95: values are in percent"),
    ({"ood": {"SUN": {"fpr": 20.0}}}, "unknown metric\\(s\\) \\['fpr'\\]"),
    ({"ood": {"SUN": {"fpr95": "20"}}}, "ood.SUN.fpr95 = '20': values are numbers in percent"),
    ({"ood": {}}, "needs \"ood\""),
    ({"backbone": ""}, "needs a non-empty text 'backbone'"),
    ({"id_accuracy": 120}, "id_accuracy = 120"),
    ({"decimals": 1.5}, "decimals = 1.5"),
    ({"config": {"LAMBDA_LOCAL": 1.0}}, "config must map dotted config keys"),
])
def test_a_bad_paper_file_is_refused_before_any_run_is_read(tmp_path, capsys, change, message):
    own = _own_rows(tmp_path, **change)
    rc = cli_main(["summarize", str(tmp_path / "no-such-run"), "--paper", "my-table-row", "--paper-file", str(own)])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert "row 'my-table-row'" in err or "row 0" in err
    assert "no-such-run" not in err  # the file was refused first


def test_paper_file_that_is_not_json_or_not_the_format(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format_version": 1, "rows": [}')
    with pytest.raises(ValueError, match="bad.json is not valid JSON \\(line 1"):
        list_paper_rows(bad)
    bad.write_text(json.dumps([{"id": "x"}]))
    with pytest.raises(ValueError, match="is not a paper-results file"):
        list_paper_rows(bad)
    row = json.loads(_own_rows(tmp_path).read_text())["rows"][0]
    bad.write_text(json.dumps({"format_version": 1, "rows": [row, row]}))
    with pytest.raises(ValueError, match="appears twice"):
        list_paper_rows(bad)


def _shipped_config_of(row):
    """The shipped config that reproduces a SeTAR-repository row (None where none ships for its setting)."""
    parts = row["source"]["file"].split("/")  # results/<kind>/<model>/ID_<set>/<method>/metrics_*.csv
    kind, model, id_set, method = parts[1], parts[2], parts[3], parts[4]
    sub = {"clip_base": "", "clip_large": "clip_large/", "swin_base": "swin_base/"}[model]
    data = {"ID_ImageNet1K": "imagenet", "ID_VOC": "voc"}[id_set]
    path = (PAPER_RESULTS.parents[2] / "configs" / "setar" / ("finetune/" if kind == "finetune" else "")
            / data / f"{sub}{method}.yaml")
    return path if path.is_file() else None


def test_shipped_setar_configs_evaluate_as_their_rows_were():
    """Each SeTAR row records the temperature (and GL-MCM weight) of the config next to its metrics file;
    the shipped config for that setting resolves to the same values and scores the row's score."""
    from locoop.config import merge_from_file
    from locoop.config.defaults import get_cfg_default

    checked = 0
    for row in list_paper_rows():
        if row["source"]["repository"] != "X1AOX1A/SeTAR":
            continue
        assert row["source"]["config_file"].rsplit("/", 1)[0] == row["source"]["file"].rsplit("/", 1)[0]
        path = _shipped_config_of(row)
        if path is None:  # e.g. ViT-L/14 on VOC: the ViT-B/16 VOC config with another MODEL.BACKBONE.NAME
            continue
        cfg = merge_from_file(get_cfg_default(), str(path))
        assert row["score"] in cfg.OOD.SCORES, (row["id"], str(path))
        for key, value in row["config"].items():
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value, (row["id"], str(path), key)
        checked += 1
    assert checked >= 28


def test_paper_results_ship_as_package_data():
    text = (PAPER_RESULTS.parents[2] / "pyproject.toml").read_text()
    assert '"data/*.json"' in text and PAPER_RESULTS.name == "paper_results.json"


def _runs(tmp_path, fprs, score="GL-MCM", sets=("iNaturalist", "SUN", "Places", "Texture")):
    paths = []
    for seed, f in enumerate(fprs, start=1):
        results = {score: {o: {"fpr95": f, "auroc": 0.9, "aupr": 0.95} for o in sets}}
        run = tmp_path / "runs" / f"seed{seed}"
        write_results(run, results, meta={"env": {}, "id_dataset": "ImageNet", "backbone": "ViT-B/16"},
                      id_accuracy=0.6)
        paths.append(run)
    return paths


def test_comparison_is_run_mean_minus_paper(tmp_path):
    runs = _runs(tmp_path, [0.20, 0.30])
    summary = summarize_runs(runs, output_dir=tmp_path / "out", paper="setar-gl-imagenet")
    comp = summary["paper_comparison"]
    row = get_paper_row("setar-gl-imagenet")
    inat = comp["sets"]["iNaturalist"]["fpr95"]
    assert inat["run"] == pytest.approx(25.0) and inat["std"] == pytest.approx(5.0)
    assert inat["paper"] == 13.36 and inat["diff"] == pytest.approx(25.0 - 13.36)
    assert comp["sets"]["Average"]["auroc"]["diff"] == pytest.approx(90.0 - row["average"]["auroc"])
    assert comp["id_accuracy"]["diff"] == pytest.approx(60.0 - 63.966) and comp["notes"] == []
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["paper_comparison"]["sets"]["SUN"]["fpr95"]["paper"] == row["ood"]["SUN"]["fpr95"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Compared with the paper: setar-gl-imagenet" in md and "X1AOX1A/SeTAR" in md and "+11.64" in md


def test_comparison_over_the_rows_sets_and_with_notes(tmp_path):
    runs = _runs(tmp_path, [0.5], sets=("iNaturalist", "SUN", "Places", "Texture", "COCO"))
    comp = compare_with_paper(summarize_runs(runs), get_paper_row("setar-gl-voc-vitl14"))
    assert comp["sets"]["Average"]["fpr95"]["run"] is None  # ImageNet-22K is missing from the run
    assert any("ImageNet-22K" in n for n in comp["notes"]) and any("PascalVOC" in n for n in comp["notes"])
    with pytest.raises(ValueError, match="no 'MCM' results"):
        compare_with_paper(summarize_runs(_runs(tmp_path / "b", [0.5])), get_paper_row("setar-mcm-imagenet"))
    extra = compare_with_paper(summarize_runs(runs), get_paper_row("setar-gl-imagenet"))
    assert extra["sets"]["Average"]["fpr95"]["run"] == pytest.approx(50.0)  # over the row's four sets
    assert any("COCO" in n for n in extra["notes"])


def test_summarize_paper_via_cli(tmp_path, capsys):
    runs = _runs(tmp_path, [0.20, 0.30, 0.25])
    rc = cli_main(["summarize"] + [str(r) for r in runs] + ["--paper", "setar-gl-imagenet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Paper row setar-gl-imagenet" in out and "13.36" in out and "+11.64" in out
    assert "results/training-free/clip_base/ID_ImageNet1K/SeTAR/metrics_gl_mcm_score_test.csv" in out
    assert "paper_comparison" in json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert cli_main(["summarize", "--paper", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(r["id"] in listing for r in list_paper_rows())
    rc = cli_main(["summarize"] + [str(r) for r in runs] + ["--paper", "locoop-gl-16shot", "--bootstrap", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "Paper row locoop-gl-16shot" in out and "MarcLafon/gallop" in out
    assert "given to 0.1 (rounded)" in out and "AUPR" not in out.split("Paper row")[1]
    rc = cli_main(["summarize"] + [str(r) for r in runs] + ["--paper", "locoop-gl-1shot"])
    assert rc == 2 and "no published row 'locoop-gl-1shot'; did you mean locoop-gl-16shot" in capsys.readouterr().err
