"""Optimisers, schedulers (hand-computed LR sequences), the toy trainer loop, logging, evaluator, seeds."""
import math
import os
import random
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from locoop.config import get_cfg_default, merge_cfg
from locoop.engine import (
    TRAINER_REGISTRY,
    build_evaluator,
    build_lr_scheduler,
    build_optimizer,
    build_trainer,
    close_logger,
    epoch_seed,
    seed_worker,
    select_device,
    set_random_seed,
    setup_logger,
)
from locoop.engine.seed import get_rng_states, set_rng_states

import toy_trainer  # noqa: F401  (registers ToyTrainer)
from toy_trainer import ToyTrainer, toy_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_YAML = os.path.join(ROOT, "configs", "trainers", "LoCoOp", "vit_b16_ep50.yaml")


@pytest.fixture(autouse=True)
def _restore_stdout():
    torch.set_num_threads(1)
    yield
    close_logger()


def _optim_cfg(**kw):
    c = get_cfg_default().OPTIM
    for k, v in kw.items():
        c[k] = v
    return c


def _lrs(sched, optim, n):
    out = []
    for _ in range(n):
        out.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    return out


# ---------------------------------------------------------------------------- optimisers
def test_build_optimizer_kinds_and_hyper_parameters():
    model = nn.Linear(3, 2)
    sgd = build_optimizer(model, _optim_cfg(NAME="sgd", LR=0.002, SGD_NESTEROV=True, SGD_DAMPNING=0))
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.002, 0.9, 5e-4, True)
    adam = build_optimizer(model.parameters(), _optim_cfg(NAME="adam"))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.9, 0.999)
    assert isinstance(build_optimizer(model, _optim_cfg(NAME="adamw")), torch.optim.AdamW)


def test_build_optimizer_skips_frozen_and_errors():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, _optim_cfg(NAME="sgd"))
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == 2 * 2 + 2
    with pytest.raises(ValueError) as e:
        build_optimizer(model, _optim_cfg(NAME="rmsprop"))
    assert "['sgd', 'adam', 'adamw']" in str(e.value)
    model.requires_grad_(False)
    with pytest.raises(ValueError) as e:
        build_optimizer(model, _optim_cfg(NAME="sgd"))
    assert "requires_grad" in str(e.value)


# ---------------------------------------------------------------------------- schedulers
def test_locoop_schedule_constant_warmup_then_cosine():
    cfg = get_cfg_default()
    merge_cfg(cfg, config_file=VIT_YAML)
    p = nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg.OPTIM)
    sched = build_lr_scheduler(opt, cfg.OPTIM)
    lrs = _lrs(sched, opt, 51)
    # epoch 0: constant 1e-5; epoch 1: base lr; epoch k >= 1: 0.001 * (1 + cos(pi * (k - 1) / 50))
    assert lrs[0] == pytest.approx(1e-5, abs=1e-15)
    assert lrs[1] == pytest.approx(0.002, abs=1e-15)
    assert lrs[2] == pytest.approx(0.0019980267284282716, abs=1e-15)
    assert lrs[26] == pytest.approx(0.001, abs=1e-12)  # half way through the cosine
    assert lrs[50] == pytest.approx(0.001 * (1 + math.cos(math.pi * 49 / 50)), abs=1e-12)
    for k in range(1, 51):
        assert lrs[k] == pytest.approx(0.001 * (1 + math.cos(math.pi * (k - 1) / 50)), abs=1e-12)


def test_linear_warmup_single_and_multi_step():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = build_lr_scheduler(opt, _optim_cfg(LR_SCHEDULER="single_step", STEPSIZE=(2,), GAMMA=0.5,
                                               WARMUP_EPOCH=3, WARMUP_TYPE="linear", WARMUP_MIN_LR=0.01))
    assert _lrs(sched, opt, 7) == pytest.approx([0.01, 0.1, 0.2, 0.3, 0.3, 0.15, 0.15])

    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_lr_scheduler(opt, _optim_cfg(LR_SCHEDULER="multi_step", STEPSIZE=(2, 4), GAMMA=0.1))
    assert _lrs(sched, opt, 6) == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])

    opt = torch.optim.SGD([p], lr=1.0)  # STEPSIZE -1: decay once at MAX_EPOCH
    sched = build_lr_scheduler(opt, _optim_cfg(LR_SCHEDULER="single_step", MAX_EPOCH=3))
    assert _lrs(sched, opt, 5) == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1])


def test_scheduler_errors_list_choices():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError) as e:
        build_lr_scheduler(opt, _optim_cfg(LR_SCHEDULER="poly"))
    assert "cosine" in str(e.value) and "multi_step" in str(e.value)
    with pytest.raises(ValueError) as e:
        build_lr_scheduler(opt, _optim_cfg(WARMUP_EPOCH=1, WARMUP_TYPE="exp"))
    assert "constant" in str(e.value)


def test_scheduler_state_dict_round_trip_through_weights_only(tmp_path):
    cfg = _optim_cfg(NAME="sgd", LR=0.002, MAX_EPOCH=10, LR_SCHEDULER="cosine", WARMUP_EPOCH=2,
                     WARMUP_TYPE="constant")
    p = nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg)
    sched = build_lr_scheduler(opt, cfg)
    _lrs(sched, opt, 4)
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    p2 = nn.Parameter(torch.zeros(1))
    opt2 = build_optimizer([p2], cfg)
    sched2 = build_lr_scheduler(opt2, cfg)
    opt2.load_state_dict(state["o"])
    sched2.load_state_dict(state["s"])
    assert _lrs(sched2, opt2, 6) == _lrs(sched, opt, 6)


# ---------------------------------------------------------------------------- trainer
def _toy(tmp_path, cls=ToyTrainer, epochs=6, **overrides):
    cfg = toy_cfg(str(tmp_path), epochs=epochs, name=cls.__name__)
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = v
    set_random_seed(cfg.SEED)
    return cls(cfg)


def test_toy_trainer_loss_decreases_and_logs_dassl_line(tmp_path, capsys):
    set_random_seed(1)
    cfg = toy_cfg(str(tmp_path), epochs=6)
    cfg.freeze()
    trainer = build_trainer(cfg)
    assert isinstance(trainer, ToyTrainer) and trainer.device == torch.device("cpu")
    trainer.train()
    close_logger()
    losses = trainer.epoch_losses
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0]
    log = (tmp_path / "log.txt").read_text()
    line = re.compile(r"epoch \[3/6\] batch \[4/8\] time \d+\.\d{3} \(\d+\.\d{3}\) data \d+\.\d{3} \(\d+\.\d{3}\) "
                      r"loss \d+\.\d{4} \(\d+\.\d{4}\) lr \d\.\d{4}e-\d\d eta \d+:\d\d:\d\d")
    assert line.search(log), log[:500]
    assert "lr 1.0000e-02" in log  # constant warm-up epoch
    assert "* accuracy:" in log and line.search(capsys.readouterr().out)
    assert sorted(os.listdir(tmp_path / "model")) == ["checkpoint"] + [f"model.pth.tar-{i}" for i in range(1, 7)]


def test_trainer_calling_update_lr_itself_is_not_stepped_twice(tmp_path):
    class ManualLR(ToyTrainer):
        def forward_backward(self, batch):
            out = super().forward_backward(batch)
            if self.batch_idx + 1 == self.num_batches:  # CoOp's style
                self.update_lr()
            return out

    a = _toy(tmp_path / "a", epochs=3, **{"TEST.NO_TEST": True})
    a.train()
    b = _toy(tmp_path / "b", cls=ManualLR, epochs=3, **{"TEST.NO_TEST": True})
    b.train()
    assert a.sched.last_epoch == b.sched.last_epoch == 1  # warm-up counted 1, then cosine stepped
    assert a.sched.successor.last_epoch == b.sched.successor.last_epoch == 2
    # lrs of epochs 1-3 were 0.01, 0.1, 0.05 * (1 + cos(pi / 3)); next: 0.05 * (1 + cos(2 pi / 3)) = 0.025
    assert a.get_current_lr() == b.get_current_lr() == pytest.approx(0.025)


def test_nan_loss_stops_with_epoch_batch_and_precision(tmp_path):
    class NanTrainer(ToyTrainer):
        def forward_backward(self, batch):
            x, y = self.parse_batch_train(batch)
            loss = nn.functional.cross_entropy(self.model(x), y)
            if self.epoch == 1 and self.batch_idx == 2:
                loss = loss * float("nan")
            self.model_backward_and_update(loss)
            return {"loss": loss.item()}

    trainer = _toy(tmp_path, cls=NanTrainer, **{"TRAINER.NAME": "LoCoOp"})
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "NaN" in msg and "epoch 2/6" in msg and "batch 3/8" in msg
    assert "TRAINER.LOCOOP.PREC = 'fp16'" in msg and "amp or fp32" in msg


def test_best_val_saves_best_and_keeps_pointer_on_latest(tmp_path):
    class ValToy(ToyTrainer):
        def build_data_loader(self):
            super().build_data_loader()
            self.val_loader = self.test_loader

    trainer = _toy(tmp_path, cls=ValToy, epochs=3, **{"TEST.FINAL_MODEL": "best_val", "TRAIN.CHECKPOINT_FREQ": 0})
    trainer.train()
    files = sorted(os.listdir(tmp_path / "model"))
    assert files == ["checkpoint", "model-best.pth.tar", "model.pth.tar-3"]
    assert (tmp_path / "model" / "checkpoint").read_text().strip() == "model.pth.tar-3"
    best = torch.load(tmp_path / "model" / "model-best.pth.tar", weights_only=True)
    assert best["val_result"] == pytest.approx(trainer.best_result)


def test_select_device(monkeypatch):
    cfg = get_cfg_default()
    cfg.USE_CUDA = False
    assert select_device(cfg) == torch.device("cpu")
    cfg.MODEL.DEVICE = "cpu"
    assert select_device(cfg) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg.MODEL.DEVICE = "cuda"
    with pytest.raises(ValueError) as e:
        select_device(cfg)
    assert "CUDA is not available" in str(e.value)


def test_tensorboard_missing_gives_clear_error(tmp_path, monkeypatch):
    trainer = _toy(tmp_path, epochs=1, **{"TRAIN.USE_TENSORBOARD": True})
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # simulate "not installed"
    with pytest.raises(ImportError) as e:
        trainer.train()
    assert "pip install tensorboard" in str(e.value)


# ---------------------------------------------------------------------------- evaluator, logger, seeds
def test_classification_evaluator_hand_values():
    cfg = get_cfg_default()
    ev = build_evaluator(cfg, lab2cname={0: "cat", 1: "dog"})
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [0.0, 3.0], [-1.0, 1.0]])  # predictions 0, 1, 1, 1
    ev.process(logits[:2], torch.tensor([0, 0]))
    ev.process(logits[2:], torch.tensor([1, 1]))
    res = ev.evaluate()
    assert res["accuracy"] == pytest.approx(75.0) and res["error"] == pytest.approx(25.0)
    # class 0: P=1, R=1/2, F1=2/3; class 1: P=2/3, R=1, F1=4/5
    assert res["macro_f1"] == pytest.approx(100 * (2 / 3 + 4 / 5) / 2)
    cfg.TEST.EVALUATOR = "Classificaton"
    with pytest.raises(KeyError) as e:
        build_evaluator(cfg)
    assert "did you mean 'Classification'" in str(e.value)


def test_setup_logger_tees_stdout(tmp_path, capsys):
    setup_logger(str(tmp_path))
    print("hello log")
    close_logger()
    print("after close")
    assert "hello log" in (tmp_path / "log.txt").read_text()
    assert "after close" not in (tmp_path / "log.txt").read_text()
    assert "hello log" in capsys.readouterr().out
    setup_logger(str(tmp_path))  # a resumed run appends
    print("second")
    close_logger()
    text = (tmp_path / "log.txt").read_text()
    assert "hello log" in text and "second" in text


def test_rng_states_round_trip(tmp_path):
    set_random_seed(7)
    states = get_rng_states()
    torch.save(states, tmp_path / "rng.pt")
    a = (random.random(), float(np.random.rand()), torch.rand(3), np.random.randn())
    set_random_seed(99)
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (random.random(), float(np.random.rand()), torch.rand(3), np.random.randn())
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3]


def test_seed_worker_and_epoch_seed():
    torch.manual_seed(123)
    seed_worker(0)
    x = np.random.rand()
    np.random.seed(123)
    assert x == np.random.rand()
    assert epoch_seed(1, 1) != epoch_seed(2, 0) and epoch_seed(1, 0) != epoch_seed(1, 1)
    with pytest.raises(ValueError):
        set_random_seed(-1)


def test_registered_toy_names():
    assert {"ToyTrainer", "OtherToyTrainer", "GenToyTrainer"} <= set(TRAINER_REGISTRY.registered_names())
