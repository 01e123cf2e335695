"""End to end through the shell scripts and ``python -m locoop``: train -> eval -> visualise, zero-shot
evaluation, the seed summary, and the bad-input errors that must come before any heavy work."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import clip
from locoop.cli import main as cli_main
from locoop.commands._common import check_model_dir, final_checkpoint
from locoop.data.synthetic import make_imagenet_like, make_ood_sets
from locoop.ood.results import write_results

REPO = Path(__file__).resolve().parents[1]
DS_CFG = str(REPO / "configs/datasets/imagenet.yaml")
METHOD_CFG = str(REPO / "configs/trainers/LoCoOp/vit_b16_ep50.yaml")
NUM_CLASSES = 4
EPOCHS = 3
SMALL = ["INPUT.SIZE", "(32,32)", "DATALOADER.NUM_WORKERS", "0", "TRAINER.LOCOOP.PREC", "fp32"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    make_imagenet_like(str(root), num_classes=NUM_CLASSES, train_per_class=8, val_per_class=4, image_size=(40, 40),
                       seed=0)
    make_ood_sets(str(root), per_set=4, image_size=(40, 40), seed=1)
    return root


def run_script(script, args, cwd, **env):
    # One OpenMP thread: tiny matmuls gain nothing from more, and a busy CI machine makes them wait.
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(REPO / "scripts/locoop" / script)] + [str(a) for a in args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=300)


def epoch_losses(log_txt: Path) -> list:
    """Average training loss of every epoch (the running average on its last printed batch)."""
    last = {}
    for line in log_txt.read_text().splitlines():
        m = re.search(r"epoch \[(\d+)/\d+\] batch \[\d+/\d+\].* loss [-\d.]+ \(([-\d.]+)\)", line)
        if m:
            last[int(m.group(1))] = float(m.group(2))
    return [last[e] for e in sorted(last)]


def check_results_file(path: Path, sets) -> dict:
    doc = json.loads(path.read_text())
    assert doc["positive_class"] == "ID" and doc["units"] == "percent"
    npz = np.load(path.parent / "ood_scores.npz")  # the accuracy is that of the recorded predictions
    assert doc["id_accuracy"] == pytest.approx(100.0 * np.mean(npz["id_predictions"] == npz["id_labels"]))
    for rows in doc["scores"].values():
        assert set(rows) == set(sets) | {"Average"}
        for metrics in rows.values():
            assert set(metrics) >= {"fpr95", "auroc", "aupr"}
            assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in metrics.values())
    return doc


@pytest.mark.slow
def test_scripts_train_eval_visualize(tmp_path, data_root, tiny_vit_path):
    env = dict(BACKBONE=tiny_vit_path, EPOCHS=EPOCHS, SEEDS="1", NCTX=4, TOPK=2,
               EXTRA_OPTS=" ".join(SMALL + ["OPTIM.LR", "0.05", "OPTIM.WARMUP_EPOCH", "-1",
                                            "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "TRAIN.PRINT_FREQ", "1",
                                            "OOD.SCORES", "['MCM','GL-MCM']"]))
    # Positional arguments as the paper: DATA DATASET CFG CTP NCTX SHOTS CSC LAMBDA TOPK.
    p = run_script("train.sh", [data_root, "imagenet", "vit_b16_ep50", "end", 4, 4, "False", 0.25, 2], tmp_path, **env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp_path / "output/imagenet/LoCoOp/vit_b16_ep50_4shots/nctx4_cscFalse_ctpend/seed1"
    assert (run / "prompt_learner" / f"model.pth.tar-{EPOCHS}").is_file()
    losses = epoch_losses(run / "log.txt")
    assert len(losses) == EPOCHS and losses[-1] < losses[0], losses
    info = json.loads((run / "run_info.json").read_text())
    assert info["config"]["TRAINER"]["LOCOOP"]["N_CTX"] == 4 and info["config"]["DATASET"]["NUM_SHOTS"] == 4
    assert info["config"]["TRAINER"]["LOCOOP"]["TOPK"] == 2 and len(info["split_hash"]) == 64

    # A finished seed is skipped (no second training in the log).
    p = run_script("train.sh", [data_root, "imagenet", "vit_b16_ep50", "end", 4, 4, "False", 0.25, 2], tmp_path, **env)
    assert p.returncode == 0 and "skipping" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(epoch_losses(run / "log.txt")) == EPOCHS

    # DATA DATASET CFG T MODEL_DIR; results land in MODEL_DIR.
    p = run_script("eval.sh", [data_root, "imagenet", "vit_b16_ep50", 1, run], tmp_path, **env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sets = ["iNaturalist", "SUN", "Places", "Texture"]
    doc = check_results_file(run / "ood_results.json", sets)
    assert set(doc["scores"]) == {"MCM", "GL-MCM"}
    assert doc["meta"]["load_epoch"] == EPOCHS and doc["meta"]["split_hash"] == info["split_hash"]
    assert doc["meta"]["num_images"]["ID"] == NUM_CLASSES * 4
    assert (run / "ood_results.md").is_file() and (run / "ood_results.csv").is_file()
    assert len(list((run / "plots").glob("hist_*.png"))) == 2 * len(sets)
    assert "[GL-MCM]" in p.stdout and "Average" in p.stdout

    # DATA DATASET CFG MODEL_DIR IMAGE_PATH LABEL; a PNG of the model's input size next to the model.
    image = sorted((data_root / "imagenet/images/train").glob("*/*.JPEG"))[0]
    p = run_script("demo_visualization.sh", [data_root, "imagenet", "vit_b16_ep50", run, image, 1], tmp_path, **env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    png = run / "visualization" / image.relative_to(data_root).with_suffix(".png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (32, 32)
    assert png.with_name(png.stem + "_regions.png").is_file()
    assert "regions (4x4 grid) are OOD for label 1" in p.stdout


def cli(args, capsys):
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def base_args(data_root, tiny_vit_path, trainer="ZeroshotCLIP"):
    return ["--root", data_root, "--trainer", trainer, "--dataset-config-file", DS_CFG, "--config-file", METHOD_CFG]


def test_zeroshot_eval_via_cli(tmp_path, data_root, tiny_vit_path, capsys):
    out = tmp_path / "zs"
    rc, stdout, err = cli(["eval"] + base_args(data_root, tiny_vit_path) + [
        "--output-dir", out, "--T", 1, "MODEL.BACKBONE.NAME", tiny_vit_path, "OOD.PLOT", "False",
        "OOD.SCORES", "['MCM', 'GL-MCM', 'energy']"] + SMALL, capsys)
    assert rc == 0, err
    doc = check_results_file(out / "ood_results.json", ["iNaturalist", "SUN", "Places", "Texture"])
    assert doc["meta"]["trainer"] == "ZeroshotCLIP" and doc["meta"]["model_dir"] is None
    # The zero-shot prompts are "a photo of a {}.": recompute the ID accuracy and MCM from them.
    from locoop.data import build_data_loader, build_test_transform, build_dataset
    from locoop.config import get_cfg_default, merge_cfg
    from locoop.ood.features import extract_features, score_features

    cfg = get_cfg_default()
    merge_cfg(cfg, DS_CFG, METHOD_CFG, {"DATASET.ROOT": str(data_root)}, SMALL)
    ds = build_dataset(cfg, need_train=False)
    model = clip.load(tiny_vit_path, device="cpu")[0]
    with torch.no_grad():
        text = model.encode_text(clip.tokenize([f"a photo of a {c}." for c in ds.classnames]))
    feats = extract_features(model, build_data_loader(ds.test, 8, build_test_transform(cfg), is_train=False), "cpu")
    scores, preds = score_features(feats, text, ["MCM"])
    assert doc["id_accuracy"] == pytest.approx(100 * float((preds == feats.labels.numpy()).mean()))
    npz = np.load(out / "ood_scores.npz")
    np.testing.assert_allclose(npz["ID/MCM"], scores["MCM"], rtol=1e-5)
    assert "[MCM]" in stdout and (out / "log.txt").is_file()


def test_summarize_three_seeds_via_cli(tmp_path, capsys):
    # Three seeds' result files with known numbers (fractions); the summary is their mean and population std.
    auroc = {1: 0.80, 2: 0.90, 3: 0.70}
    for seed, a in auroc.items():
        results = {"MCM": {"SUN": {"fpr95": 0.5, "auroc": a, "aupr": 0.6},
                           "Texture": {"fpr95": 0.3, "auroc": a - 0.1, "aupr": 0.7}}}
        write_results(tmp_path / "runs" / f"seed{seed}", results, meta={"env": {}}, id_accuracy=0.25 * seed)
    rc, out, err = cli(["summarize"] + [tmp_path / "runs" / f"seed{s}" for s in (1, 2, 3)], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "runs/summary.json").read_text())
    assert summary["n_runs"] == 3
    sun = summary["scores"]["MCM"]["SUN"]["auroc"]
    assert sun["mean"] == pytest.approx(80.0) and sun["std"] == pytest.approx(np.std([80.0, 90.0, 70.0]))
    avg = summary["scores"]["MCM"]["Average"]["auroc"]
    assert avg["mean"] == pytest.approx(75.0) and avg["values"] == pytest.approx([75.0, 85.0, 65.0])
    assert summary["id_accuracy"]["mean"] == pytest.approx(50.0)
    assert (tmp_path / "runs/summary.md").is_file() and "80.00 ±" in out


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if a command gets as far as building a trainer or loading CLIP.

    The stand-ins take exactly the arguments of what they replace (checked), so a call that the
    real function would accept reaches the AssertionError, not a TypeError.
    """
    import inspect

    import clip.pretrained
    import locoop.engine.registry as registry

    def stand_in(real):
        signature = inspect.signature(real)

        def boom(*args, **kwargs):
            signature.bind(*args, **kwargs)
            raise AssertionError(f"{real.__name__} was called: the bad input was not caught early")

        return boom

    load = stand_in(clip.pretrained.load)
    monkeypatch.setattr(registry, "build_trainer", stand_in(registry.build_trainer))
    monkeypatch.setattr(clip.pretrained, "load", load)
    monkeypatch.setattr(clip, "load", load)


def test_no_heavy_work_stand_ins_fail_loudly(no_heavy_work):
    import clip
    from locoop.engine.registry import build_trainer

    with pytest.raises(AssertionError, match="build_trainer was called"):
        build_trainer(object(), need_train=False)  # the call eval makes
    with pytest.raises(AssertionError, match="load was called"):
        clip.load("ViT-B/16", device="cpu")
    with pytest.raises(TypeError):
        build_trainer(object(), unknown=1)


def test_bad_inputs_fail_before_heavy_work(tmp_path, data_root, tiny_vit_path, capsys, no_heavy_work):
    args = base_args(data_root, tiny_vit_path, trainer="LoCoOp")
    rc, _, err = cli(["train", "--root", data_root, "--trainer", "LoCop", "--output-dir", tmp_path / "x"], capsys)
    assert rc == 2 and "unknown trainer 'LoCop'" in err and "LoCoOp" in err and "ZeroshotCLIP" in err

    empty = tmp_path / "empty_run"
    (empty / "prompt_learner").mkdir(parents=True)
    (empty / "log.txt").write_text("")
    rc, _, err = cli(["eval"] + args + ["--model-dir", empty], capsys)
    assert rc == 2 and "no checkpoints in --model-dir" in err and "log.txt" in err and "prompt_learner/" in err

    (empty / "prompt_learner" / "model.pth.tar-2").write_bytes(b"")
    rc, _, err = cli(["eval"] + args + ["--model-dir", empty, "--load-epoch", 50], capsys)
    assert rc == 2 and "no model.pth.tar-50" in err and "epochs [2]" in err

    rc, _, err = cli(["eval"] + args + ["--model-dir", empty, "OOD.SCORES", "['MCM', 'GLMCMX']"], capsys)
    assert rc == 2 and "unknown OOD score 'GLMCMX'" in err and "GL-MCM" in err

    rc, _, err = cli(["eval"] + args + ["--model-dir", empty, "OOD.DATASETS", "['SUN', 'ImageNet-22K', 'COCO']"],
                     capsys)
    assert rc == 2 and "ImageNet-22K" in err and "COCO" in err and "SUN:" not in err

    rc, _, err = cli(["eval"] + args, capsys)
    assert rc == 2 and "--model-dir is required" in err

    rc, _, err = cli(["visualize"] + args + ["--model-dir", empty, "--image_path", tmp_path / "missing.jpg",
                                             "--label", 0], capsys)
    assert rc == 2 and "image not found" in err
    image = sorted((data_root / "imagenet/images/val").glob("*/*.JPEG"))[0]
    rc, _, err = cli(["visualize"] + args + ["--model-dir", empty, "--image_path", image, "--label", -1], capsys)
    assert rc == 2 and "--label -1" in err

    rc, _, err = cli(["train"] + args + ["--output-dir", tmp_path / "y", "OPTIM.LRR", "0.1"], capsys)
    assert rc == 2 and "OPTIM.LR" in err

    rc, _, err = cli(["demo", "--output", tmp_path / "demo", "--epochs", 0], capsys)
    assert rc == 2 and "--epochs must be >= 1" in err and not (tmp_path / "demo").exists()


def test_label_outside_the_classes(tmp_path, data_root, tiny_vit_path, capsys):
    image = sorted((data_root / "imagenet/images/val").glob("*/*.JPEG"))[0]
    rc, _, err = cli(["visualize"] + base_args(data_root, tiny_vit_path) + [
        "--output-dir", tmp_path, "--image_path", image, "--label", NUM_CLASSES, "MODEL.BACKBONE.NAME",
        tiny_vit_path] + SMALL, capsys)
    assert rc == 2 and f"--label {NUM_CLASSES} is outside [0, {NUM_CLASSES})" in err
    assert not (tmp_path / "visualization").exists()


def test_checkpoint_helpers(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_dir(str(tmp_path / "nope"))
    (tmp_path / "prompt_learner").mkdir()
    for name in ("model.pth.tar-1", "model.pth.tar-10", "checkpoint"):
        (tmp_path / "prompt_learner" / name).write_bytes(b"")
    assert check_model_dir(str(tmp_path)) == {"prompt_learner": ["model.pth.tar-1", "model.pth.tar-10"]}
    assert check_model_dir(str(tmp_path), 10)
    assert final_checkpoint(str(tmp_path), 10) == str(tmp_path / "prompt_learner/model.pth.tar-10")
    assert final_checkpoint(str(tmp_path), 50) is None


def test_zeroshot_eval_needs_no_training_folder(tmp_path, data_root, tiny_vit_path, capsys):
    """Evaluation builds the trainer without the training split: a root with only val/ works."""
    import shutil

    root = tmp_path / "valonly"
    shutil.copytree(data_root, root)
    shutil.rmtree(root / "imagenet" / "images" / "train")
    rc, _, err = cli(["eval"] + base_args(root, tiny_vit_path) + [
        "--output-dir", tmp_path / "zs", "MODEL.BACKBONE.NAME", tiny_vit_path, "OOD.PLOT", "False",
        "OOD.SCORES", "['MCM']"] + SMALL, capsys)
    assert rc == 0, err
    assert (tmp_path / "zs" / "ood_results.json").is_file()


def test_setar_finetune_trainers_resolve_by_name():
    from locoop.commands._common import check_trainer

    assert check_trainer("SeTARFT").__name__ == "SeTARFT"
    assert check_trainer("LoRA").__name__ == "LoRA"
    with pytest.raises(ValueError, match="LoCoOp"):
        check_trainer("LoCoOpp")


def test_flags_are_read_anywhere_and_list_flags_stop_at_overrides():
    import argparse
    import importlib

    from locoop.cli import parse_command_args

    def parser(cmd):
        p = argparse.ArgumentParser(prog=cmd)
        importlib.import_module(f"locoop.commands.{cmd}").add_arguments(p)
        return p

    a = parse_command_args(parser("train"), ["--root", "R", "OPTIM.LR", "0.1", "--seed", "-1", "--skip-finished",
                                             "SEED", "3", "--", "OPTIM.MAX_EPOCH", "2"])
    assert (a.root, a.seed, a.skip_finished) == ("R", -1, True)
    assert a.opts == ["OPTIM.LR", "0.1", "SEED", "3", "OPTIM.MAX_EPOCH", "2"]
    a = parse_command_args(parser("extract"), ["--datasets", "ID", "SUN", "OOD.T", "2", "--force", "SEED", "-1"])
    assert a.datasets == ["ID", "SUN"] and a.force and a.opts == ["OOD.T", "2", "SEED", "-1"]
    a = parse_command_args(parser("eval"), ["--root=R", "OOD.T", "2", "-b", "4"])
    assert a.root == "R" and a.batch_size == 4 and a.opts == ["OOD.T", "2"]


def test_unknown_flag_among_overrides_is_refused_with_the_flags(capsys):
    import argparse
    import importlib

    from locoop.cli import parse_command_args

    p = argparse.ArgumentParser(prog="train")
    importlib.import_module("locoop.commands.train").add_arguments(p)
    with pytest.raises(SystemExit) as e:
        parse_command_args(p, ["OPTIM.LR", "1", "--lambda", "0.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown flag --lambda" in err and "--lambda_value" in err
