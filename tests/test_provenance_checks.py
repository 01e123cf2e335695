"""Provenance checks: a prompt checkpoint records its backbone's weight hash and its class-name hash, and is
refused on another backbone or other class names unless MODEL.ALLOW_OTHER_* says so; checkpoints without
the record load with a note; ``summarize`` refuses runs of different methods and counts a run once."""
import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from clip.tiny import make_tiny_checkpoint
from locoop.cli import main as cli_main
from locoop.data.synthetic import make_imagenet_like, make_ood_sets
from locoop.engine.checkpoint import load_checkpoint
from locoop.ood.results import write_results

REPO = Path(__file__).resolve().parents[1]
DS_CFG = str(REPO / "configs/datasets/imagenet.yaml")
METHOD_CFG = str(REPO / "configs/trainers/LoCoOp/vit_b16_ep50.yaml")
SMALL = ["INPUT.SIZE", "(32,32)", "DATALOADER.NUM_WORKERS", "0", "TRAINER.LOCOOP.PREC", "fp32",
         "TRAINER.LOCOOP.N_CTX", "4", "TRAINER.LOCOOP.TOPK", "2", "OOD.PLOT", "False", "OOD.SCORES", "['MCM']"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov_data")
    make_imagenet_like(str(root), num_classes=3, train_per_class=2, val_per_class=2, image_size=(36, 36), seed=0)
    make_ood_sets(str(root), per_set=2, image_size=(36, 36), seed=1)
    return root


@pytest.fixture(scope="module")
def renamed_root(tmp_path_factory, data_root):
    """The same images with other class names (same number of classes: the prompts still fit)."""
    root = tmp_path_factory.mktemp("prov_renamed") / "data"
    shutil.copytree(data_root, root)
    names = root / "imagenet" / "classnames.txt"
    lines = names.read_text().splitlines()
    names.write_text("".join(f"{line.split()[0]} another thing {i}\n" for i, line in enumerate(lines)))
    return root


@pytest.fixture(scope="module")
def other_backbone(checkpoint_dir):
    """tiny-vit with other random weights: the same context width, so its prompts would load silently."""
    path = checkpoint_dir / "tiny-vit-seed1.pt"
    if not path.exists():
        make_tiny_checkpoint(path, like="tiny-vit", fmt="state_dict", seed=1)
    return str(path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_root, tiny_vit_path):
    """A one-epoch LoCoOp run on the tiny ViT."""
    out = tmp_path_factory.mktemp("prov_run") / "run"
    rc = cli_main([str(a) for a in [
        "train", "--root", data_root, "--trainer", "LoCoOp", "--dataset-config-file", DS_CFG, "--config-file",
        METHOD_CFG, "--output-dir", out, "--seed", 1, "MODEL.BACKBONE.NAME", tiny_vit_path, "OPTIM.MAX_EPOCH", 1,
        "DATALOADER.TRAIN_X.BATCH_SIZE", 6, "TEST.NO_TEST", "True"] + SMALL])
    assert rc == 0
    return out


def _eval(capsys, root, model_dir, backbone, out, *opts):
    rc = cli_main([str(a) for a in [
        "eval", "--root", root, "--trainer", "LoCoOp", "--dataset-config-file", DS_CFG, "--config-file", METHOD_CFG,
        "--model-dir", model_dir, "--output-dir", out, "MODEL.BACKBONE.NAME", backbone] + SMALL + list(opts)])
    o, e = capsys.readouterr()
    return rc, o, e


@pytest.fixture
def no_images(monkeypatch):
    """Fail if the evaluation gets as far as scoring images."""
    import locoop.ood.runner as runner

    def boom(*args, **kwargs):
        raise AssertionError("run_ood_benchmark was called: the checkpoint was not refused first")

    monkeypatch.setattr(runner, "run_ood_benchmark", boom)


def test_prompt_checkpoint_records_backbone_and_classnames(trained_run, tiny_vit_path):
    import clip
    from locoop.engine.provenance import backbone_sha256, classnames_sha256, weights_sha256

    ckpt = load_checkpoint(str(trained_run / "prompt_learner" / "model.pth.tar-1"))
    prov = ckpt["provenance"]
    model = clip.load(tiny_vit_path, device="cpu")[0].float()
    # The one weight hash of the project, of the weights rounded to fp16: the fp16 model holds exactly that
    # rounding, so a run trained in fp16 on a GPU is evaluated in fp32 on a CPU, and the reverse.
    assert prov["backbone_sha256"] == weights_sha256(model, float_dtype=torch.float16) == backbone_sha256(model)
    half = copy.deepcopy(model).half()
    assert backbone_sha256(half) == backbone_sha256(model)
    assert weights_sha256(copy.deepcopy(half).float()) != weights_sha256(model)  # why fp32 values would not do
    assert prov["backbone"] == tiny_vit_path and prov["num_classes"] == 3
    from locoop.data.synthetic import synthetic_classname
    assert prov["classnames_sha256"] == classnames_sha256([synthetic_classname(i, 3) for i in range(3)])


def test_other_backbone_refused_before_any_image(tmp_path, capsys, data_root, trained_run, other_backbone,
                                                 tiny_vit_path, no_images):
    rc, out, err = _eval(capsys, data_root, trained_run, other_backbone, tmp_path / "a")
    assert rc == 2, err
    line = err.strip().splitlines()[0]
    assert "another base model" in line and repr(tiny_vit_path) in line and repr(other_backbone) in line
    assert "MODEL.ALLOW_OTHER_BACKBONE True" in line
    assert not (tmp_path / "a" / "ood_results.json").exists()


def test_same_backbone_and_classnames_load_silently(tmp_path, capsys, data_root, trained_run, tiny_vit_path):
    rc, out, err = _eval(capsys, data_root, trained_run, tiny_vit_path, tmp_path / "c",
                         "TRAINER.LOCOOP.LAMBDA", "0.5")  # a key the evaluation does not use
    assert rc == 0, err
    # The results record what the model was trained with (the checkpoint's config), beside this command's.
    meta = json.loads((tmp_path / "c" / "ood_results.json").read_text())["meta"]
    assert meta["config"]["TRAINER"]["LOCOOP"]["LAMBDA"] == 0.5
    trained = meta["training_config"]
    assert trained["TRAINER.LOCOOP.LAMBDA"] == 0.25 and trained["SEED"] == 1 and trained["OPTIM.MAX_EPOCH"] == 1
    assert trained["MODEL.BACKBONE.NAME"] == tiny_vit_path and "OUTPUT_DIR" not in trained
    assert "DATASET.ROOT" not in trained  # where the data lies does not change what is learned
    assert "another base model" not in err and "other class names" not in err and "records no backbone" not in out
    # What the check compared: the checkpoint records the backbone it was learned on.
    ckpt = load_checkpoint(str(trained_run / "prompt_learner" / "model.pth.tar-1"))
    assert ckpt["provenance"]["backbone"] == tiny_vit_path


def test_other_backbone_allowed_with_the_key(tmp_path, capsys, data_root, trained_run, other_backbone):
    rc, out, err = _eval(capsys, data_root, trained_run, other_backbone, tmp_path / "b",
                         "MODEL.ALLOW_OTHER_BACKBONE", "True")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "another base model" in line]
    assert len(warnings) == 1 and warnings[0].startswith("Warning:") and "loaded anyway" in warnings[0]
    assert (tmp_path / "b" / "ood_results.json").is_file()


def test_other_classnames_refused_then_allowed(tmp_path, capsys, renamed_root, trained_run, tiny_vit_path,
                                               monkeypatch):
    import locoop.ood.runner as runner

    real = runner.run_ood_benchmark
    calls = []
    monkeypatch.setattr(runner, "run_ood_benchmark", lambda *a, **k: calls.append(1) or real(*a, **k))
    rc, out, err = _eval(capsys, renamed_root, trained_run, tiny_vit_path, tmp_path / "d")
    assert rc == 2 and not calls, err
    line = err.strip().splitlines()[0]
    assert "other class names" in line and "MODEL.ALLOW_OTHER_CLASSNAMES True" in line
    rc, out, err = _eval(capsys, renamed_root, trained_run, tiny_vit_path, tmp_path / "e",
                         "MODEL.ALLOW_OTHER_CLASSNAMES", "True")
    assert rc == 0 and calls, err
    assert sum("other class names" in line for line in err.splitlines()) == 1


def test_visualize_refuses_prompts_of_another_backbone(tmp_path, capsys, data_root, trained_run, other_backbone):
    image = sorted((data_root / "imagenet/images/train").glob("*/*.JPEG"))[0]
    rc = cli_main([str(a) for a in [
        "visualize", "--root", data_root, "--trainer", "LoCoOp", "--dataset-config-file", DS_CFG, "--config-file",
        METHOD_CFG, "--model-dir", trained_run, "--output-dir", tmp_path / "v", "--image_path", image, "--label", 0,
        "MODEL.BACKBONE.NAME", other_backbone] + SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "another base model" in err, err
    assert not (tmp_path / "v" / "visualization").exists()


def test_setar_search_refuses_prompts_of_another_backbone(tmp_path, capsys, data_root, trained_run, other_backbone,
                                                          monkeypatch):
    from locoop.data.synthetic import make_val_split
    import locoop.setar.search as search

    def boom(*args, **kwargs):
        raise AssertionError("the search ran: the prompts were not refused first")

    monkeypatch.setattr(search, "run_search", boom)
    split = tmp_path / "val_split.json"
    make_val_split(str(split), str(data_root / "imagenet" / "images" / "train"), per_class=1)
    rc = cli_main([str(a) for a in [
        "setar-search", "--root", data_root, "--config-file", REPO / "configs/setar/imagenet/SeTAR.yaml",
        "--output-dir", tmp_path / "s", "--model-dir", trained_run, "MODEL.BACKBONE.NAME", other_backbone,
        "DATASET.VAL_SPLIT_FILE", split, "TRAINER.LOCOOP.N_CTX", 4, "SETAR.TOPK", 2, "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", 0, "OOD.PLOT", "False", "VERBOSE", "False"]])
    err = capsys.readouterr().err
    assert rc == 2 and "another base model" in err and "MODEL.ALLOW_OTHER_BACKBONE" in err, err


def test_checkpoint_without_provenance_loads_with_a_note(tmp_path, capsys, data_root, trained_run, other_backbone):
    old = tmp_path / "old_run"
    shutil.copytree(trained_run / "prompt_learner", old / "prompt_learner")
    path = old / "prompt_learner" / "model.pth.tar-1"
    ckpt = load_checkpoint(str(path))
    ckpt.pop("provenance")
    torch.save(ckpt, path)
    rc, out, err = _eval(capsys, data_root, old, other_backbone, tmp_path / "f")
    assert rc == 0, err
    notes = [line for line in out.splitlines() if "records no backbone or class-name hash" in line]
    assert len(notes) == 1 and notes[0].startswith("Note:")


def test_adapters_and_prompts_share_the_hash(tiny_vit_path):
    # SeTAR+FT's base hash and a prompt checkpoint's backbone hash are the one weight hash: of the exact
    # fp32 weights for adapters (their SVD split depends on every bit), of their fp16 rounding for prompts.
    import clip
    from locoop.engine.provenance import backbone_sha256, weights_sha256
    from locoop.setar.adapters import base_weights_sha256

    model = clip.load(tiny_vit_path, device="cpu")[0].float()
    assert base_weights_sha256(model) == weights_sha256(model)
    assert backbone_sha256(model) == weights_sha256(model, float_dtype=torch.float16)
    # The cache follows in-place changes of the weights.
    before = backbone_sha256(model)
    with torch.no_grad():
        model.ln_final.weight.add_(1.0)
    assert backbone_sha256(model) != before


# ------------------------------------------------------------------------------------ summarize
def _result(folder, trainer="LoCoOp", scores=("MCM",), sets=("SUN", "Texture"), auroc=0.8, **meta):
    results = {s: {d: {"fpr95": 0.5, "auroc": auroc, "aupr": 0.6} for d in sets} for s in scores}
    write_results(folder, results, meta={"env": {}, "trainer": trainer, **meta}, id_accuracy=0.5)


def _summarize(capsys, *folders):
    rc = cli_main(["summarize", "--bootstrap", "0"] + [str(f) for f in folders])
    out, err = capsys.readouterr()
    return rc, out, err


def test_summarize_refuses_mixed_trainers(tmp_path, capsys):
    _result(tmp_path / "a", trainer="LoCoOp")
    _result(tmp_path / "b", trainer="CoOp", auroc=0.7)
    rc, out, err = _summarize(capsys, tmp_path / "a", tmp_path / "b")
    assert rc == 2
    line = err.strip().splitlines()[0]
    assert "trainer" in line and "LoCoOp" in line and "CoOp" in line and "separately" in line
    assert not (tmp_path / "summary.json").exists()


def test_summarize_refuses_other_score_sets_and_ood_sets(tmp_path, capsys):
    _result(tmp_path / "a", scores=("MCM",))
    _result(tmp_path / "b", scores=("MCM", "GL-MCM"))
    rc, out, err = _summarize(capsys, tmp_path / "a", tmp_path / "b")
    assert rc == 2 and "GL-MCM" in err and "separately" in err
    _result(tmp_path / "c", sets=("SUN", "Places"))
    rc, out, err = _summarize(capsys, tmp_path / "a", tmp_path / "c")
    assert rc == 2 and "Places" in err


def test_summarize_refuses_other_method_keys(tmp_path, capsys):
    cfg = {"TRAINER": {"LOCOOP": {"LAMBDA": 0.25, "TOPK": 200}}, "SEED": 1, "OUTPUT_DIR": "x"}
    other = {"TRAINER": {"LOCOOP": {"LAMBDA": 0.5, "TOPK": 200}}, "SEED": 2, "OUTPUT_DIR": "y"}
    _result(tmp_path / "a", config=cfg)
    _result(tmp_path / "b", config=other)
    rc, out, err = _summarize(capsys, tmp_path / "a", tmp_path / "b")
    assert rc == 2 and "TRAINER.LOCOOP.LAMBDA" in err and "0.25" in err and "0.5" in err
    # Seeds and folders differ between runs of one method: they are what is averaged over.
    same = {"TRAINER": {"LOCOOP": {"LAMBDA": 0.25, "TOPK": 200}}, "SEED": 3, "OUTPUT_DIR": "z"}
    _result(tmp_path / "c", config=same, auroc=0.6)
    rc, out, err = _summarize(capsys, tmp_path / "a", tmp_path / "c")
    assert rc == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_runs"] == 2


def test_summarize_refuses_models_trained_with_other_settings(tmp_path, capsys):
    """Evaluated with one config file, but trained with two LAMBDAs: two methods (meta.training_config)."""
    cfg = {"TRAINER": {"LOCOOP": {"LAMBDA": 0.25}}, "SEED": 1}
    _result(tmp_path / "a", config=cfg, training_config={"SEED": 1, "TRAINER.LOCOOP.LAMBDA": 0.25})
    _result(tmp_path / "b", config=cfg, training_config={"SEED": 2, "TRAINER.LOCOOP.LAMBDA": 0.5})
    rc, out, err = _summarize(capsys, tmp_path / "a", tmp_path / "b")
    assert rc == 2 and "training_config.TRAINER.LOCOOP.LAMBDA: 0.25 in" in err and "0.5 in" in err
    assert "SEED" not in err  # the training seed is what a summary averages over
    _result(tmp_path / "c", config=cfg, training_config={"SEED": 3, "TRAINER.LOCOOP.LAMBDA": 0.25}, auroc=0.6)
    _result(tmp_path / "d", config=cfg, auroc=0.7)  # an older results file records no training config
    rc, out, err = _summarize(capsys, tmp_path / "a", tmp_path / "c", tmp_path / "d")
    assert rc == 0, err


def test_summarize_counts_a_run_once(tmp_path, capsys):
    _result(tmp_path / "runs" / "seed1", auroc=0.8)
    _result(tmp_path / "runs" / "seed2", auroc=0.6)
    os.symlink(tmp_path / "runs" / "seed1", tmp_path / "runs" / "link1")
    shutil.copytree(tmp_path / "runs" / "seed1", tmp_path / "runs" / "copy1")
    rc, out, err = _summarize(capsys, tmp_path / "runs" / "seed1", tmp_path / "runs" / "seed1",
                              tmp_path / "runs" / "link1", tmp_path / "runs" / "copy1", tmp_path / "runs" / "seed2")
    assert rc == 0, err
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["n_runs"] == 2
    assert summary["scores"]["MCM"]["SUN"]["auroc"]["values"] == pytest.approx([80.0, 60.0])
    assert sum("counted once" in line for line in out.splitlines()) == 3
