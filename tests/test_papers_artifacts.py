"""What the papers' LoCoOp / CoOp training writes is used as it is: a run folder with Dassl checkpoints
(eval, eval.sh, visualize, setar-search --model-dir, refused for resume) and Dassl split pickles (train);
malicious pickles are refused without running, damaged files are called damaged."""
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, _LRScheduler

import clip
from locoop.cli import main as cli_main
from locoop.data.synthetic import make_imagenet_like, make_ood_sets
from locoop.engine.checkpoint import is_dassl_checkpoint, load_checkpoint, save_checkpoint
from locoop.engine.safe_load import ForeignObject
from locoop.trainers.prompt_learner import PromptLearner

REPO = Path(__file__).resolve().parents[1]
DS_CFG = str(REPO / "configs/datasets/imagenet.yaml")
METHOD_CFG = str(REPO / "configs/trainers/LoCoOp/vit_b16_ep50.yaml")
SMALL = ["INPUT.SIZE", "(32,32)", "TRAINER.LOCOOP.TOPK", "2",  # 3 classes: K < C (TOPK >= C is refused)
          "DATALOADER.NUM_WORKERS", "0", "TRAINER.LOCOOP.PREC", "fp32",
         "TRAINER.LOCOOP.N_CTX", "4", "OOD.PLOT", "False", "OOD.SCORES", "['MCM','GL-MCM']"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("papers_data")
    info = make_imagenet_like(str(root), num_classes=3, train_per_class=4, val_per_class=3, image_size=(40, 40))
    make_ood_sets(str(root), per_set=3, image_size=(40, 40), seed=1)
    return root, info


@pytest.fixture
def dassl_scheduler_module(monkeypatch):
    """A stand-in ``dassl.optim.lr_scheduler`` with Dassl's constant warm-up scheduler, which keeps its
    successor (a real CosineAnnealingLR, itself holding the optimiser) in its state."""
    mod = types.ModuleType("dassl.optim.lr_scheduler")

    class ConstantWarmupScheduler(_LRScheduler):
        def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
            self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
            super().__init__(optimizer, last_epoch)

        def get_lr(self):
            if self.last_epoch >= self.warmup_epoch:
                return self.successor.get_last_lr()
            return [self.cons_lr for _ in self.base_lrs]

        def step(self, epoch=None):
            if self.last_epoch >= self.warmup_epoch:
                self.successor.step(epoch)
                self._last_lr = self.successor.get_last_lr()
            else:
                super().step(epoch)

    ConstantWarmupScheduler.__module__, ConstantWarmupScheduler.__qualname__ = mod.__name__, "ConstantWarmupScheduler"
    mod.ConstantWarmupScheduler = ConstantWarmupScheduler
    for name in ("dassl", "dassl.optim"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


def _dassl_state(classnames, model_path, sched_module, dtype=torch.float16):
    """A prompt learner's checkpoint exactly as Dassl's save_model/save_checkpoint writes it after training."""
    model = clip.load(model_path, device="cpu")[0]
    buffers = PromptLearner(classnames, model, n_ctx=4)
    ctx = nn.Parameter((torch.randn(4, buffers.ctx.shape[1]) * 0.02).to(dtype))
    optim = torch.optim.SGD([ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    sched = sched_module.ConstantWarmupScheduler(optim, CosineAnnealingLR(optim, 50.0), 1, 1e-5)
    for _ in range(3):
        ctx.grad = torch.full_like(ctx, 0.5)
        optim.step()
        sched.step()
    state_dict = OrderedDict(ctx=ctx.detach(), token_prefix=buffers.token_prefix.to(dtype),
                             token_suffix=buffers.token_suffix.to(dtype))
    return {"state_dict": state_dict, "epoch": 50, "optimizer": optim.state_dict(),
            "scheduler": sched.state_dict(), "val_result": None}


def _write_run(run, state):
    folder = run / "prompt_learner"
    folder.mkdir(parents=True)
    torch.save(state, folder / "model.pth.tar-50")
    (folder / "checkpoint").write_text("model.pth.tar-50\n")
    return run


def cli(args, capsys):
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _eval_args(root, model_path, run):
    return ["eval", "--root", root, "--trainer", "LoCoOp", "--dataset-config-file", DS_CFG, "--config-file",
            METHOD_CFG, "--model-dir", run, "--load-epoch", 50, "MODEL.BACKBONE.NAME", model_path] + SMALL


class _WritesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dassl_checkpoint_loads_with_inert_scheduler_objects(tmp_path, data_root, tiny_vit_path,
                                                             dassl_scheduler_module):
    root, info = data_root
    state = _dassl_state(info["classnames"], tiny_vit_path, dassl_scheduler_module)
    with pytest.raises(Exception):  # what torch alone does with such a file
        torch.save(state, tmp_path / "f.pth")
        torch.load(tmp_path / "f.pth", weights_only=True)
    ckpt = load_checkpoint(str(tmp_path / "f.pth"))
    assert is_dassl_checkpoint(ckpt) and ckpt["epoch"] == 50
    assert torch.equal(ckpt["state_dict"]["ctx"], state["state_dict"]["ctx"])
    successor = ckpt["scheduler"]["successor"]
    assert isinstance(successor, ForeignObject) and successor.source_class.endswith("CosineAnnealingLR")
    assert successor["T_max"] == 50.0 and successor["optimizer"].source_class == "torch.optim.sgd.SGD"
    assert ckpt["optimizer"]["state"][0]["momentum_buffer"].shape == (4, state["state_dict"]["ctx"].shape[1])
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    legacy = load_checkpoint(str(tmp_path / "legacy.pth"))
    assert torch.equal(legacy["state_dict"]["ctx"], state["state_dict"]["ctx"])
    assert legacy["scheduler"]["successor"]["T_max"] == 50.0
    with pytest.raises(TypeError):  # a stand-in never goes into one of our checkpoints
        save_checkpoint({"state_dict": {}, "epoch": 1, "scheduler": ckpt["scheduler"]}, str(tmp_path / "ours"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_papers_run_folder_evaluates_like_the_same_context_saved_our_way(tmp_path, data_root, tiny_vit_path,
                                                                         dassl_scheduler_module, capsys, dtype):
    root, info = data_root
    state = _dassl_state(info["classnames"], tiny_vit_path, dassl_scheduler_module, dtype)
    papers = _write_run(tmp_path / "papers_run", state)
    ours = tmp_path / "our_run"
    save_checkpoint({"state_dict": {"ctx": state["state_dict"]["ctx"].float()}, "epoch": 50, "trainer": "LoCoOp"},
                    str(ours / "prompt_learner"))
    rc, out, err = cli(_eval_args(root, tiny_vit_path, papers), capsys)
    assert rc == 0, err
    assert "written by the papers' Dassl training (epoch 50)" in out
    rc, _, err = cli(_eval_args(root, tiny_vit_path, ours), capsys)
    assert rc == 0, err
    a, b = np.load(papers / "ood_scores.npz"), np.load(ours / "ood_scores.npz")
    assert sorted(a.files) == sorted(b.files) and "ID/GL-MCM" in a.files
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])

    # setar-search --model-dir reads the same learned prompts from both folders (unpruned: --settings none)
    setar_cfg = REPO / "configs/setar/imagenet/Vanilla_GL_MCM.yaml"
    for run in (papers, ours):
        rc, _, err = cli(["setar-search", "--root", root, "--dataset-config-file", DS_CFG, "--config-file", setar_cfg,
                          "--output-dir", tmp_path / f"setar_{run.name}", "--model-dir", run, "--load-epoch", 50,
                          "--settings", "none", "MODEL.BACKBONE.NAME", tiny_vit_path] + SMALL, capsys)
        assert rc == 0, err
    a, b = np.load(tmp_path / "setar_papers_run" / "ood_scores.npz"), np.load(tmp_path / "setar_our_run" / "ood_scores.npz")
    assert sorted(a.files) == sorted(b.files) and a.files
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow
def test_papers_run_folder_through_eval_sh_and_visualize(tmp_path, data_root, tiny_vit_path,
                                                         dassl_scheduler_module, capsys):
    root, info = data_root
    papers = _write_run(tmp_path / "seed1", _dassl_state(info["classnames"], tiny_vit_path, dassl_scheduler_module))
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", BACKBONE=tiny_vit_path, NCTX="4",
               EXTRA_OPTS=" ".join(SMALL))
    p = subprocess.run(["bash", str(REPO / "scripts/locoop/eval.sh"), str(root), "imagenet", "vit_b16_ep50", "1",
                        str(papers)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (papers / "ood_results.json").is_file() and "[GL-MCM]" in p.stdout

    image = sorted((root / "imagenet/images/val").glob("*/*.JPEG"))[0]
    rc, out, err = cli(["visualize", "--root", root, "--trainer", "LoCoOp", "--dataset-config-file", DS_CFG,
                        "--config-file", METHOD_CFG, "--model-dir", papers, "--load-epoch", 50, "--image_path", image,
                        "--label", 0, "MODEL.BACKBONE.NAME", tiny_vit_path] + SMALL, capsys)
    assert rc == 0, err
    assert (papers / "visualization" / image.relative_to(root).with_suffix(".png")).is_file()


@pytest.mark.parametrize("payload_cls, refused", [(_WritesFile, "io.open"), (_RunsShell, "system")])
def test_malicious_checkpoint_in_a_run_folder_is_refused_and_never_runs(tmp_path, data_root, tiny_vit_path,
                                                                        dassl_scheduler_module, capsys, payload_cls,
                                                                        refused):
    root, info = data_root
    marker = tmp_path / "pwned"
    state = _dassl_state(info["classnames"], tiny_vit_path, dassl_scheduler_module)
    state["scheduler"]["successor"] = payload_cls(str(marker))
    run = _write_run(tmp_path / "evil_run", state)
    rc, _, err = cli(_eval_args(root, tiny_vit_path, run), capsys)
    assert rc == 2
    assert f"'{refused}" in err or f".{refused}'" in err
    assert "nothing in it was executed" in err
    assert "\x1b" not in err and "damaged" not in err
    assert not marker.exists()


def test_damaged_checkpoint_is_called_damaged(tmp_path, data_root, tiny_vit_path, dassl_scheduler_module, capsys):
    root, info = data_root
    run = _write_run(tmp_path / "cut_run", _dassl_state(info["classnames"], tiny_vit_path, dassl_scheduler_module))
    path = run / "prompt_learner" / "model.pth.tar-50"
    path.write_bytes(path.read_bytes()[:300])
    rc, _, err = cli(_eval_args(root, tiny_vit_path, run), capsys)
    assert rc == 2 and "damaged" in err and "cut short" in err and "\x1b" not in err
    path.write_text("not a checkpoint at all\n")
    rc, _, err = cli(_eval_args(root, tiny_vit_path, run), capsys)
    assert rc == 2 and "damaged or not a checkpoint" in err and "neither a zip archive" in err


def test_papers_checkpoint_is_not_resumed(tmp_path, data_root, tiny_vit_path, dassl_scheduler_module, capsys):
    root, info = data_root
    run = _write_run(tmp_path / "resume_run", _dassl_state(info["classnames"], tiny_vit_path, dassl_scheduler_module))
    rc, _, err = cli(["train", "--root", root, "--trainer", "LoCoOp", "--dataset-config-file", DS_CFG,
                      "--config-file", METHOD_CFG, "--output-dir", run, "--seed", 1, "MODEL.BACKBONE.NAME",
                      tiny_vit_path, "DATASET.NUM_SHOTS", 2, "OPTIM.MAX_EPOCH", 51] + SMALL, capsys)
    assert rc == 2 and "not resumed" in err and "MODEL.INIT_WEIGHTS" in err
    init = str(run / "prompt_learner" / "model.pth.tar-50")
    rc, out, err = cli(["train", "--root", root, "--trainer", "LoCoOp", "--dataset-config-file", DS_CFG,
                        "--config-file", METHOD_CFG, "--output-dir", tmp_path / "new_run", "--seed", 1, "--no-train",
                        "MODEL.BACKBONE.NAME", tiny_vit_path, "DATASET.NUM_SHOTS", 2, "MODEL.INIT_WEIGHTS", init]
                       + SMALL, capsys)
    assert rc == 0, err
    assert f"Initialised the prompt learner from {init}" in out


def test_train_uses_the_papers_split_pickle(tmp_path, tiny_vit_path, capsys, monkeypatch):
    info = make_imagenet_like(str(tmp_path), num_classes=3, train_per_class=4, val_per_class=1, image_size=(40, 40))
    mod = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = mod.__name__, "Datum"
    mod.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    old = "/mnt/authors/data/imagenet/images/train"
    records = [Datum(f"{old}/{w}/{w}_{j}.JPEG", c, 0, info["classnames"][c])
               for c, w in enumerate(info["wnids"]) for j in (2, 0)]
    split = Path(info["dataset_dir"]) / "split_fewshot" / "shot_2-seed_1.pkl"
    split.parent.mkdir()
    with open(split, "wb") as f:
        pickle.dump({"train": records}, f, protocol=pickle.HIGHEST_PROTOCOL)
    rc, out, err = cli(["train", "--root", tmp_path, "--trainer", "LoCoOp", "--dataset-config-file", DS_CFG,
                        "--config-file", METHOD_CFG, "--output-dir", tmp_path / "run", "--seed", 1, "--no-train",
                        "MODEL.BACKBONE.NAME", tiny_vit_path, "DATASET.NUM_SHOTS", 2] + SMALL, capsys)
    assert rc == 0, err
    assert "written by CoOp/LoCoOp" in out and "/mnt/authors/data/imagenet" in out
    import json

    info_json = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info_json["split_file"] == str(split) and len(info_json["split_hash"]) == 64
