"""A tiny trainer for the engine tests: a small MLP on random tensors, Dassl-style dict batches.

Randomness that a resumed run must reproduce is deliberately present: random shuffling, noise
augmentation drawn from the global torch RNG, NumPy and ``random`` jitter, and dropout.

Run as a script (used by the kill-and-resume test)::

    python tests/toy_trainer.py OUTPUT_DIR [--epochs N] [--seed S] [--generator]

``LOCOOP_TOY_SLEEP`` (seconds) slows every batch down so a test can kill the run mid-epoch.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

if __name__ == "__main__":  # running as a script from anywhere: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locoop.config import get_cfg_default  # noqa: E402
from locoop.engine import TRAINER_REGISTRY, TrainerX, build_lr_scheduler, build_optimizer, seed_worker  # noqa: E402

N_FEAT, N_CLASSES, N_TRAIN, N_TEST = 8, 3, 64, 30


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable-ish data from a fixed teacher; independent of the global RNG."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(N_FEAT, N_CLASSES, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, N_FEAT, generator=g)
    y = (x @ teacher).argmax(dim=1)
    return x, y


class DictDataset(Dataset):
    """Yields Dassl-style dicts; ``augment`` adds noise from the global RNGs (torch, NumPy, random)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool):
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        img = self.x[i]
        if self.augment:
            scale = 1.0 + 0.1 * float(np.random.rand()) + 0.01 * random.random()
            img = img * scale + 0.05 * torch.randn_like(img)
        return {"img": img, "label": self.y[i], "index": i, "impath": f"toy/{i}.jpg"}


def toy_cfg(output_dir: str, epochs: int = 4, seed: int = 1, name: str = "ToyTrainer"):
    cfg = get_cfg_default()
    cfg.OUTPUT_DIR = output_dir
    cfg.SEED = seed
    cfg.USE_CUDA = False
    cfg.VERBOSE = False
    cfg.TRAINER.NAME = name
    cfg.OPTIM.NAME = "sgd"
    cfg.OPTIM.LR = 0.1
    cfg.OPTIM.MAX_EPOCH = epochs
    cfg.OPTIM.LR_SCHEDULER = "cosine"
    cfg.OPTIM.WARMUP_EPOCH = 1
    cfg.OPTIM.WARMUP_TYPE = "constant"
    cfg.OPTIM.WARMUP_CONS_LR = 0.01
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 8
    cfg.DATALOADER.TEST.BATCH_SIZE = 10
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.TRAIN.CHECKPOINT_FREQ = 1
    cfg.TRAIN.PRINT_FREQ = 2
    return cfg


@TRAINER_REGISTRY.register()
class ToyTrainer(TrainerX):
    """MLP with dropout; ``use_generator`` gives the train loader its own torch.Generator."""

    use_generator = False
    num_workers = 0
    persistent_workers = False

    def build_data_loader(self) -> None:
        x, y = make_data(N_TRAIN, seed=0)
        xt, yt = make_data(N_TEST, seed=1)
        gen = torch.Generator() if self.use_generator else None
        self.train_loader_x = DataLoader(DictDataset(x, y, augment=True), batch_size=self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE,
                                         shuffle=True, generator=gen, num_workers=self.num_workers,
                                         worker_init_fn=seed_worker if self.num_workers else None,
                                         persistent_workers=self.persistent_workers)
        self.val_loader = None
        self.test_loader = DataLoader(DictDataset(xt, yt, augment=False), batch_size=self.cfg.DATALOADER.TEST.BATCH_SIZE)
        self.num_classes = N_CLASSES
        self.lab2cname = {i: f"class{i}" for i in range(N_CLASSES)}

    def build_model(self) -> None:
        self.model = nn.Sequential(nn.Linear(N_FEAT, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, N_CLASSES))
        self.model.to(self.device)
        self.optim = build_optimizer(self.model, self.cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, self.cfg.OPTIM)
        self.register_model("model", self.model, self.optim, self.sched)
        self.epoch_losses: list[float] = []

    def before_epoch(self) -> None:
        self._sum, self._n = 0.0, 0

    crash_at = None  # (epoch, batch) at which forward_backward raises, to simulate a crash in-process

    def forward_backward(self, batch: dict) -> dict:
        if self.crash_at == (self.epoch, self.batch_idx):
            raise KeyboardInterrupt(f"simulated crash at epoch {self.epoch} batch {self.batch_idx}")
        sleep = float(os.environ.get("LOCOOP_TOY_SLEEP", "0") or 0)
        if sleep:
            time.sleep(sleep)
        x, y = self.parse_batch_train(batch)
        loss = F.cross_entropy(self.model(x), y)
        self.model_backward_and_update(loss)
        self._sum += loss.item() * len(y)
        self._n += len(y)
        return {"loss": loss.item()}

    def after_epoch(self) -> None:
        if self._n:
            self.epoch_losses.append(self._sum / self._n)
        super().after_epoch()


@TRAINER_REGISTRY.register()
class OtherToyTrainer(ToyTrainer):
    """Same model as ToyTrainer under another name (its checkpoints must be refused by ToyTrainer)."""


@TRAINER_REGISTRY.register()
class GenToyTrainer(ToyTrainer):
    """ToyTrainer whose train loader has its own torch.Generator."""

    use_generator = True


@TRAINER_REGISTRY.register()
class WorkerToyTrainer(GenToyTrainer):
    """Two (non-persistent) loader workers doing the random augmentation."""

    num_workers = 2


def main(argv=None) -> int:
    from locoop.engine import build_trainer, close_logger, set_random_seed

    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trainer", default="ToyTrainer")
    p.add_argument("--no-test", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # identical float results across runs regardless of machine load
    cfg = toy_cfg(args.output_dir, args.epochs, args.seed, args.trainer)
    cfg.TEST.NO_TEST = args.no_test
    cfg.freeze()
    set_random_seed(cfg.SEED)
    trainer = build_trainer(cfg)
    trainer.train()
    close_logger()
    return 0


if __name__ == "__main__":
    sys.exit(main())
