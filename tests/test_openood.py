"""OpenOOD v1.5 image lists: parsing, the ImageNet benchmark, the dataset, the layout check, the
generated test data, near / far grouping of results, and the benchmark config file."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from locoop.config import get_cfg_default
from locoop.data.check_openood import check_openood_data
from locoop.data.datasets.openood import (OPENOOD_V15_IMAGENET, OpenOODImageNet, build_openood_ood_sets,
                                          get_openood_benchmark, parse_imglist, read_imglist)
from locoop.data.image_io import read_image
from locoop.data.synthetic import corrupt_image
from locoop.data.synthetic_openood import make_openood_imagenet
from locoop.ood.groups import (format_grouped_markdown, format_grouped_table, group_averages, grouped_json,
                               grouped_rows, table_metrics)

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_lists_as_openood_lays_them_out():
    b = get_openood_benchmark("openood_v1.5_imagenet")
    assert b is OPENOOD_V15_IMAGENET and b.fpr_convention == "openood" and b.num_classes == 1000
    assert b.id_test.imglist == "benchmark_imglist/imagenet/test_imagenet.txt"
    assert b.id_test.data_dir == "images_largescale/"
    assert [(x.name, x.imglist.rsplit("/", 1)[1], x.data_dir, x.group) for x in b.ood] == [
        ("SSB-hard", "test_ssb_hard.txt", "images_largescale/", "near"),
        ("NINCO", "test_ninco.txt", "images_largescale/", "near"),
        ("iNaturalist", "test_inaturalist.txt", "images_largescale/", "far"),
        ("Textures", "test_textures.txt", "images_classic/", "far"),
        ("OpenImage-O", "test_openimage_o.txt", "images_largescale/", "far")]
    assert b.groups() == {"near": ["SSB-hard", "NINCO"], "far": ["iNaturalist", "Textures", "OpenImage-O"]}
    assert b.resolve(["openimage_o", "ssb_hard", "textures"]) == ["SSB-hard", "Textures", "OpenImage-O"]
    assert b.groups(["ninco", "iNaturalist"]) == {"near": ["NINCO"], "far": ["iNaturalist"]}
    with pytest.raises(ValueError, match="choose from SSB-hard"):
        b.resolve(["Places"])
    with pytest.raises(ValueError, match="openood_v1.5_imagenet"):
        get_openood_benchmark("openood_v1.0_cifar")


def test_parse_imglist_lines(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("a/b c.jpg 3\n\nx/y.png -1\nz.jpg {'label': 2, 'extra': 1}\nlast.JPEG 0")
    # split at the first space, as OpenOOD: 'a/b' is the path, 'c.jpg 3' is not a label
    with pytest.raises(ValueError, match="line 1"):
        parse_imglist(str(f))
    f.write_text("a/b.jpg 3\n\nx/y.png -1\nz.jpg {'label': 2}\nlast.JPEG 0")
    assert parse_imglist(str(f)) == [(1, "a/b.jpg", 3), (3, "x/y.png", -1), (4, "z.jpg", None), (5, "last.JPEG", 0)]
    for bad, msg in (("/abs/p.jpg 1\n", "absolute"), ("nolabel.jpg\n", "expected"), ("p.jpg cat\n", "neither"),
                     ("p.jpg 1.5\n", "neither")):
        f.write_text(bad)
        with pytest.raises(ValueError, match=msg):
            parse_imglist(str(f))
    with pytest.raises(FileNotFoundError, match="download.py"):
        parse_imglist(str(tmp_path / "missing.txt"))


def test_generated_root_reads_back(tmp_path):
    info = make_openood_imagenet(tmp_path, num_classes=3, test_per_class=2, ood_per_set=3, train_per_class=2)
    root = str(tmp_path)
    assert info["counts"] == {"ImageNet": 6, "ImageNet-val": 3, "ImageNet-train": 6, "SSB-hard": 3, "NINCO": 3,
                              "iNaturalist": 3, "Textures": 3, "OpenImage-O": 3}
    lines = Path(info["lists"]["ImageNet"]).read_text().splitlines()
    assert lines[0] == "imagenet_1k/val/ILSVRC2012_val_00000001.JPEG 0" and lines[-1].endswith(" 2")
    tex = Path(info["lists"]["Textures"]).read_text().splitlines()[0]
    assert tex.startswith("texture/banded/") and tex.endswith(" -1")
    assert (tmp_path / "images_classic" / tex.split(" ")[0]).is_file()  # Textures live in images_classic/
    ood = build_openood_ood_sets(root, names=["openimage_o", "SSB-hard"])
    assert list(ood) == ["SSB-hard", "OpenImage-O"]
    assert all(d.label == -1 and d.classname == "SSB-hard" and os.path.isfile(d.impath) for d in ood["SSB-hard"])
    read_image(ood["OpenImage-O"][0].impath)  # a real JPEG
    ids = read_imglist(root, OPENOOD_V15_IMAGENET.id_test, info["classnames"])
    assert [d.label for d in ids] == [0, 0, 1, 1, 2, 2] and ids[2].classname == info["classnames"][1]
    with pytest.raises(ValueError, match=r"not a class index in \[0, 2\)"):
        read_imglist(root, OPENOOD_V15_IMAGENET.id_test, info["classnames"][:2])
    os.remove(info["lists"]["NINCO"])
    with pytest.raises(FileNotFoundError, match="test_ninco.txt"):
        build_openood_ood_sets(root)


def _cfg(root, shots=-1):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NAME = "OpenOODImageNet"
    cfg.DATASET.NUM_SHOTS = shots
    cfg.SEED = 1
    return cfg


def test_dataset_splits_classnames_and_fewshot(tmp_path):
    info = make_openood_imagenet(tmp_path, num_classes=3, test_per_class=2, val_per_class=1, train_per_class=3)
    ds = OpenOODImageNet(_cfg(tmp_path), need_train=False)
    assert ds.num_classes == 3 and ds.classnames == info["classnames"] and ds.train_x == []
    assert len(ds.test) == 6 and len(ds.val) == 3
    assert ds.classnames_file.endswith(os.path.join("imagenet_1k", "classnames.txt"))
    assert ds.imglist_file.endswith("test_imagenet.txt") and len(ds.imglist_hash) == 64
    shots = OpenOODImageNet(_cfg(tmp_path, shots=2), need_train=True)
    assert len(shots.train_x) == 6 and sorted({d.label for d in shots.train_x}) == [0, 1, 2]
    assert os.path.isfile(shots.split_file) and "imagenet_1k" in shots.split_file
    again = OpenOODImageNet(_cfg(tmp_path, shots=2), need_train=True)
    assert [d.impath for d in again.train_x] == [d.impath for d in shots.train_x]
    # without a class-name file the shipped 1000 CLIP names apply (labels index them)
    os.remove(tmp_path / "images_largescale" / "imagenet_1k" / "classnames.txt")
    shipped = OpenOODImageNet(_cfg(tmp_path), need_train=False)
    assert shipped.num_classes == 1000 and shipped.classnames[0] == "tench"
    os.remove(info["lists"]["ImageNet-train"])
    with pytest.raises(FileNotFoundError, match="train_imagenet.txt"):
        OpenOODImageNet(_cfg(tmp_path, shots=2), need_train=True)
    with pytest.raises(ValueError, match="DATASET.ROOT is empty"):
        OpenOODImageNet(_cfg(""), need_train=False)


def test_check_reports_counts_problems_and_fixes(tmp_path):
    info = make_openood_imagenet(tmp_path, num_classes=3, test_per_class=2, ood_per_set=4)
    report = check_openood_data(str(tmp_path))
    text = report.render()
    assert report.ok, text
    assert "SSB-hard (near-OOD): 4 images" in text and "Textures (far-OOD): 4 images" in text
    assert "ImageNet (ID): 6 images" in text and "train_imagenet.txt not found (only needed for training)" in text
    assert "near-OOD SSB-hard, NINCO; far-OOD iNaturalist, Textures, OpenImage-O" in text

    ninco = Path(info["lists"]["NINCO"])
    first = ninco.read_text().splitlines()[0].split(" ")[0]
    os.remove(tmp_path / "images_largescale" / first)
    with open(info["lists"]["SSB-hard"], "a") as f:
        f.write(Path(info["lists"]["SSB-hard"]).read_text().splitlines()[0] + "\n")
    with open(info["lists"]["ImageNet"], "a") as f:
        f.write("imagenet_1k/val/ILSVRC2012_val_00000001.JPEG 7\n")
    os.remove(info["lists"]["OpenImage-O"])
    tex = (tmp_path / "images_classic" / Path(info["lists"]["Textures"]).read_text().split(" ")[0])
    corrupt_image(str(tex))
    report = check_openood_data(str(tmp_path), need_train=True, verify_images=True)
    text = report.render()
    assert not report.ok
    assert "NINCO (near-OOD): 1 of 4 images listed in benchmark_imglist/imagenet/test_ninco.txt are missing" in text
    assert "listed more than once" in text and "labels are not class indices in [0, 3)" in text
    assert "OpenImage-O: list benchmark_imglist/imagenet/test_openimage_o.txt not found" in text
    assert "ImageNet-train: list benchmark_imglist/imagenet/train_imagenet.txt not found" in text
    assert "Textures: 1 of 4 images cannot be read" in text
    assert text.count("fix:") >= 5 and "download.py" in text
    only = check_openood_data(str(tmp_path), sets=["ssb_hard"]).render()
    assert "NINCO" not in only and "SSB-hard" in only
    assert not check_openood_data(str(tmp_path / "nope")).ok
    (tmp_path / "empty").mkdir()
    assert "benchmark_imglist not found" in check_openood_data(str(tmp_path / "empty")).render()


RESULTS = {
    "MCM": {"SSB-hard": {"fpr95": 0.8, "auroc": 0.6, "aupr": 0.5}, "NINCO": {"fpr95": 0.6, "auroc": 0.7, "aupr": 0.6},
            "iNaturalist": {"fpr95": 0.3, "auroc": 0.9, "aupr": 0.9},
            "Textures": {"fpr95": 0.5, "auroc": 0.8, "aupr": 0.7},
            "OpenImage-O": {"fpr95": 0.4, "auroc": 0.85, "aupr": 0.8}},
}
GROUPS = {"near": ["SSB-hard", "NINCO"], "far": ["iNaturalist", "Textures", "OpenImage-O"]}


def test_group_averages_hand_values():
    avg = group_averages(RESULTS, GROUPS)["MCM"]
    assert avg["near"] == pytest.approx({"fpr95": 0.7, "auroc": 0.65, "aupr": 0.55})
    assert avg["far"] == pytest.approx({"fpr95": 0.4, "auroc": 0.85, "aupr": 0.8})
    rows = grouped_rows(RESULTS, GROUPS, overall=True)["MCM"]
    assert [(n, k) for n, k, _ in rows] == [("SSB-hard", "set"), ("NINCO", "set"), ("Near-OOD", "group"),
                                           ("iNaturalist", "set"), ("Textures", "set"), ("OpenImage-O", "set"),
                                           ("Far-OOD", "group"), ("Average", "overall")]
    assert rows[-1][2]["fpr95"] == pytest.approx(0.52)
    sub = {"MCM": {k: RESULTS["MCM"][k] for k in ("NINCO", "Textures")}}  # a subset of the sets
    assert group_averages(sub, GROUPS)["MCM"] == {"near": RESULTS["MCM"]["NINCO"], "far": RESULTS["MCM"]["Textures"]}
    js = grouped_json(RESULTS, GROUPS)
    assert js["groups"] == GROUPS and js["scores"]["MCM"]["Near-OOD"]["fpr95"] == pytest.approx(70.0)
    with pytest.raises(ValueError, match="belong to no group"):
        group_averages(RESULTS, {"near": ["SSB-hard", "NINCO"]})
    with pytest.raises(ValueError, match="in groups"):
        group_averages(RESULTS, {"near": ["SSB-hard", "NINCO"], "far": ["NINCO", "iNaturalist", "Textures",
                                                                       "OpenImage-O"]})


def test_grouped_tables():
    md = format_grouped_markdown(RESULTS, GROUPS, id_accuracy=0.7)
    assert "| **Near-OOD** | **70.00** | **65.00** | **55.00** |" in md and "ID accuracy: 70.00%" in md
    assert "FPR95 positive class: ID" in md
    txt = format_grouped_table(RESULTS, GROUPS)
    assert "= Far-OOD" in txt and "40.00" in txt
    oo = {"MCM": {s: dict(m, fpr95_openood=0.5, auroc_openood=m["auroc"], aupr_in=0.6, aupr_out=0.4)
                  for s, m in RESULTS["MCM"].items()}}
    assert table_metrics(oo) == ["fpr95_openood", "auroc_openood", "aupr_in", "aupr_out"]
    assert table_metrics(RESULTS) == ["fpr95", "auroc", "aupr"]
    md = format_grouped_markdown(oo, GROUPS)
    assert "AUPR-Out" in md and "FPR95 positive class: OOD" in md


def test_benchmark_config_file_names_the_benchmark():
    doc = yaml.safe_load((REPO / "configs" / "benchmarks" / "openood_v1.5_imagenet.yaml").read_text())
    assert doc["DATASET"]["NAME"] == "OpenOODImageNet"
    bench = get_openood_benchmark(doc["OOD"]["BENCHMARK"])
    assert bench.resolve(doc["OOD"]["DATASETS"]) == bench.ood_names == doc["OOD"]["DATASETS"]
    assert doc["OOD"]["FPR_CONVENTION"] == bench.fpr_convention
    # every key of the file is one the config system knows, and its values pass the checks
    cfg = get_cfg_default()
    for section, keys in doc.items():
        for k in keys:
            assert k in cfg[section], (section, k)
    from locoop.config import merge_from_file
    from locoop.config.checks import validate_cfg

    validate_cfg(merge_from_file(cfg, str(REPO / "configs" / "benchmarks" / "openood_v1.5_imagenet.yaml")))


def test_generated_scores_flow_into_metrics_and_groups(tmp_path):
    """The lists' OOD sets, scored, give a results dict the grouping functions accept."""
    from locoop.ood.metrics import ood_metrics

    make_openood_imagenet(tmp_path, num_classes=2, test_per_class=3, ood_per_set=4)
    ood = build_openood_ood_sets(str(tmp_path))
    rng = np.random.default_rng(0)
    id_scores = rng.normal(1, 1, 6)
    results = {"MCM": {name: ood_metrics(id_scores, rng.normal(0, 1, len(items)), include_openood=True)
                       for name, items in ood.items()}}
    rows = grouped_rows(results, OPENOOD_V15_IMAGENET.groups(list(ood)))["MCM"]
    assert [r[0] for r in rows if r[1] == "group"] == ["Near-OOD", "Far-OOD"]


def test_build_dataset_by_name(tmp_path):
    from locoop.data import build_dataset

    make_openood_imagenet(tmp_path, num_classes=2, test_per_class=1)
    cfg = _cfg(tmp_path)
    cfg.VERBOSE = False
    ds = build_dataset(cfg, need_train=False)
    assert type(ds).__name__ == "OpenOODImageNet" and len(ds.test) == 2


def test_neglabel_on_generated_openood_lists(tmp_path, tiny_vit_path):
    """Zero-shot NegLabel end to end on the generated lists with a tiny lexicon and a tiny CLIP:
    images encoded once, negative labels mined, scores, OpenOOD metrics, near / far rows."""
    import clip
    from locoop.data import build_data_loader
    from locoop.ood.features import extract_features
    from locoop.ood.lexicon import read_lexicon
    from locoop.ood.metrics import ood_metrics
    from locoop.ood.neglabel import NegLabelParams, build_negative_bank, recipe_id_text_features, score_feature_batches

    info = make_openood_imagenet(tmp_path / "data", num_classes=3, test_per_class=2, ood_per_set=2)
    (tmp_path / "words.txt").write_text("\n".join(["tractor", "violin", "cloud", "river", "hammer", "kettle",
                                                   "lamp", "rocket", "tulip", "moss"]) + "\n")
    model, preprocess = clip.load(tiny_vit_path, device="cpu")
    model.eval()
    root = str(tmp_path / "data")
    ids_items = read_imglist(root, OPENOOD_V15_IMAGENET.id_test, info["classnames"])
    sets = {"ID": ids_items, **build_openood_ood_sets(root)}
    params = NegLabelParams(ngroup=2, ratio=0.6)
    id_text = recipe_id_text_features(model, info["classnames"], params)
    bank = build_negative_bank(model, id_text, read_lexicon(tmp_path / "words.txt"), params,
                               cache_dir=tmp_path / "cache", device="cpu", verbose=False)
    scores = {}
    for name, items in sets.items():
        loader = build_data_loader(items, 4, preprocess, is_train=False)
        feats = extract_features(model, loader, "cpu", with_local=False)
        scores[name] = score_feature_batches([feats], id_text, bank).numpy()
        assert scores[name].shape == (len(items),) and np.all((scores[name] > 0) & (scores[name] < 1))
    results = {"NegLabel": {n: ood_metrics(scores["ID"], v, include_openood=True)
                            for n, v in scores.items() if n != "ID"}}
    md = format_grouped_markdown(results, OPENOOD_V15_IMAGENET.groups())
    assert "**Near-OOD**" in md and "**Far-OOD**" in md and "AUPR-Out" in md


# ------------------------------------------------------------------------------------ end to end
def _cli(args, capsys):
    from locoop.cli import main as cli_main

    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_on_generated_lists_end_to_end(tmp_path, tiny_vit_path, capsys):
    """``python -m locoop eval`` with the shipped benchmark config on generated lists: the lists are read
    (not folders), the OpenOOD metrics are the default, the tables are grouped near / far everywhere,
    a NegLabel score runs on the same lists, and the feature cache keeps the lists' sets apart."""
    from locoop.ood.metrics import ood_metrics

    info = make_openood_imagenet(tmp_path / "data", num_classes=3, test_per_class=3, ood_per_set=3,
                                 image_size=(40, 40))
    (tmp_path / "words.txt").write_text("tractor\nviolin\ncloud\nriver\nhammer\nkettle\nlamp\nrocket\n")
    out = tmp_path / "run"
    common = ["--root", tmp_path / "data",
              "--dataset-config-file", REPO / "configs/benchmarks/openood_v1.5_imagenet.yaml",
              "--config-file", REPO / "configs/trainers/LoCoOp/vit_b16_ep50.yaml"]
    opts = ["MODEL.BACKBONE.NAME", tiny_vit_path, "INPUT.SIZE", "(32,32)", "DATALOADER.NUM_WORKERS", "0",
            "TRAINER.LOCOOP.PREC", "fp32", "OOD.PLOT", "False", "VERBOSE", "False", "OOD.CACHE_DIR", tmp_path / "cache"]
    rc, stdout, err = _cli(["eval", "--trainer", "ZeroshotCLIP", "--output-dir", out] + common + opts + [
        "OOD.SCORES", "['MCM', 'GL-MCM', 'NegLabel']", "OOD.NEGLABEL.LEXICON", tmp_path / "words.txt",
        "OOD.NEGLABEL.NGROUP", "2", "OOD.NEGLABEL.RATIO", "0.5"], capsys)
    assert rc == 0, err
    doc = json.loads((out / "ood_results.json").read_text())
    names = ["SSB-hard", "NINCO", "iNaturalist", "Textures", "OpenImage-O"]
    assert list(doc["scores"]["MCM"]) == names + ["Average"]
    meta = doc["meta"]
    assert meta["benchmark"] == "openood_v1.5_imagenet" and meta["id_dataset"] == "OpenOODImageNet"
    assert meta["num_images"] == {"ID": 9, **{n: 3 for n in names}}
    assert meta["ood_groups"] == GROUPS and set(meta["ood_lists"]) == set(names)
    assert meta["ood_lists"]["Textures"]["file"] == info["lists"]["Textures"]
    assert meta["openood_metrics_included"] is True
    assert set(doc["scores"]["MCM"]["NINCO"]) == {"fpr95", "auroc", "aupr", "fpr95_openood", "auroc_openood",
                                                  "aupr_in", "aupr_out"}
    # group rows: the mean of the group's sets, in the JSON, ood_results.md and the console
    assert doc["groups"]["groups"] == GROUPS
    for score in ("MCM", "GL-MCM", "NegLabel"):
        for group, title in (("near", "Near-OOD"), ("far", "Far-OOD")):
            for k in ("fpr95_openood", "auroc_openood", "aupr_in", "aupr_out"):
                want = np.mean([doc["scores"][score][n][k] for n in GROUPS[group]])
                assert doc["groups"]["scores"][score][title][k] == pytest.approx(want)
    md = (out / "ood_results.md").read_text()
    near = doc["groups"]["scores"]["NegLabel"]["Near-OOD"]
    assert "## Near-OOD / far-OOD" in md and "FPR95 positive class: OOD" in md and "AUPR-Out" in md
    assert (f"| **Near-OOD** | **{near['fpr95_openood']:.2f}** | **{near['auroc_openood']:.2f}** | "
            f"**{near['aupr_in']:.2f}** | **{near['aupr_out']:.2f}** |") in md
    assert "openood_v1.5_imagenet: near / far OOD" in stdout and "= Far-OOD" in stdout
    # the numbers are the OpenOOD metrics of the recorded per-image scores
    npz = np.load(out / "ood_scores.npz")
    m = ood_metrics(npz["ID/MCM"], npz["Textures/MCM"], include_openood=True)
    assert doc["scores"]["MCM"]["Textures"]["fpr95_openood"] == pytest.approx(100 * m["fpr95_openood"])
    assert len(npz["Textures/NegLabel"]) == 3 and len(npz["ID/NegLabel"]) == 9

    # extract then eval again: every list's features come from the cache, under the benchmark's names
    rc, _, err = _cli(["extract"] + common + opts, capsys)
    assert rc == 0, err
    cached = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir() if p.name != "neglabel")
    assert cached == sorted(["ID-OpenOODImageNet"] + [f"openood_v1.5_imagenet-{n}" for n in names])
    rc, stdout, err = _cli(["eval", "--trainer", "ZeroshotCLIP", "--output-dir", tmp_path / "again"] + common + opts
                           + ["VERBOSE", "True", "OOD.SCORES", "['MCM', 'GL-MCM']"], capsys)
    assert rc == 0, err
    assert stdout.count("using cached features") == 6
    again = json.loads((tmp_path / "again" / "ood_results.json").read_text())
    assert again["scores"]["MCM"] == doc["scores"]["MCM"]

    # a missing list stops the evaluation before any model is loaded, naming the list and the download
    os.remove(info["lists"]["NINCO"])
    rc, _, err = _cli(["eval", "--trainer", "ZeroshotCLIP", "--output-dir", tmp_path / "x"] + common + opts, capsys)
    assert rc == 2 and "test_ninco.txt" in err and "download.py" in err
    rc, _, err = _cli(["eval", "--trainer", "ZeroshotCLIP", "--output-dir", tmp_path / "x"] + common + opts
                      + ["OOD.DATASETS", "['Places']"], capsys)
    assert rc == 2 and "OOD.DATASETS: unknown OOD set(s) ['Places']" in err


def test_check_data_knows_the_openood_layout(tmp_path, capsys):
    info = make_openood_imagenet(tmp_path, num_classes=3, test_per_class=2, ood_per_set=2)
    rc, out, _ = _cli(["check-data", "--root", tmp_path, "--dataset", "openood"], capsys)
    assert rc == 0, out
    assert "ImageNet (ID): 6 images" in out and "OpenImage-O (far-OOD): 2 images" in out and "RESULT: OK" in out
    assert "train_imagenet.txt not found (only needed for training)" in out
    rc, out, _ = _cli(["check-data", "--root", tmp_path, "--dataset", "openood", "--ood", "ninco"], capsys)
    assert rc == 0 and "NINCO" in out and "SSB-hard" not in out
    rc, out, _ = _cli(["check-data", "--root", tmp_path, "--dataset", "openood", "--num-shots", "2"], capsys)
    assert rc == 1 and "[ERROR] ImageNet-train: list benchmark_imglist/imagenet/train_imagenet.txt not found" in out
    os.remove(info["lists"]["SSB-hard"])
    rc, out, _ = _cli(["check-data", "--root", tmp_path, "--dataset", "openood"], capsys)
    assert rc == 1 and "test_ssb_hard.txt not found" in out and "fix:" in out
