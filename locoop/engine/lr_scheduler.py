"""Learning-rate schedulers from the OPTIM config keys, with Dassl's warm-up semantics.

Schedulers step once per epoch. With ``WARMUP_EPOCH = W > 0`` the main schedule (the *successor*)
is wrapped:

- ``constant``: epochs ``0..W-1`` use ``WARMUP_CONS_LR``; epoch ``W`` uses the base LR; from then on
  the successor steps (with ``WARMUP_RECOUNT`` True it counts from 0 after the warm-up).
- ``linear``: epoch 0 uses ``WARMUP_MIN_LR``, epoch ``e < W`` uses ``LR * e / W``, then the successor.

E.g. the LoCoOp config (cosine, 50 epochs, 1 constant warm-up epoch at 1e-5, LR 0.002) gives
epoch 0: 1e-5, epoch 1: 0.002, epoch ``k >= 1``: ``0.001 * (1 + cos(pi * (k - 1) / 50))``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, MultiStepLR, StepLR

__all__ = [
    "AVAILABLE_SCHEDULERS",
    "ConstantWarmupScheduler",
    "LinearWarmupScheduler",
    "build_lr_scheduler",
]

AVAILABLE_SCHEDULERS = ("single_step", "multi_step", "cosine")
AVAILABLE_WARMUPS = ("constant", "linear")


class _BaseWarmupScheduler(LRScheduler):
    """Runs its own LR for ``warmup_epoch`` epochs, then delegates to ``successor``."""

    def __init__(self, optimizer: torch.optim.Optimizer, successor: LRScheduler, warmup_epoch: int,
                 last_epoch: int = -1):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        super().__init__(optimizer, last_epoch)

    def _warmup_lr(self) -> list:
        raise NotImplementedError

    def get_lr(self) -> list:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return self._warmup_lr()

    def step(self, epoch: Any = None) -> None:
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def state_dict(self) -> dict:
        """Own state plus the successor's state (plain values only, checkpoint-safe)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "successor")}
        state["successor"] = self.successor.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        successor = state.pop("successor", None)
        self.__dict__.update(state)
        if successor is not None:
            self.successor.load_state_dict(successor)


class ConstantWarmupScheduler(_BaseWarmupScheduler):
    """Constant ``cons_lr`` during warm-up (Dassl)."""

    def __init__(self, optimizer: torch.optim.Optimizer, successor: LRScheduler, warmup_epoch: int,
                 cons_lr: float, last_epoch: int = -1):
        self.cons_lr = cons_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def _warmup_lr(self) -> list:
        return [self.cons_lr for _ in self.base_lrs]


class LinearWarmupScheduler(_BaseWarmupScheduler):
    """``min_lr`` at epoch 0, then ``base_lr * epoch / warmup_epoch`` (Dassl)."""

    def __init__(self, optimizer: torch.optim.Optimizer, successor: LRScheduler, warmup_epoch: int,
                 min_lr: float, last_epoch: int = -1):
        self.min_lr = min_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def _warmup_lr(self) -> list:
        if self.last_epoch == 0:
            return [self.min_lr for _ in self.base_lrs]
        return [lr * self.last_epoch / self.warmup_epoch for lr in self.base_lrs]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any) -> LRScheduler:
    """Build the scheduler named by ``optim_cfg.LR_SCHEDULER``, wrapped in a warm-up if configured.

    Args:
        optimizer: The optimiser to schedule.
        optim_cfg: The ``cfg.OPTIM`` node (LR_SCHEDULER, STEPSIZE, GAMMA, MAX_EPOCH, WARMUP_*).

    Raises:
        ValueError: unknown scheduler or warm-up type (lists the choices), bad STEPSIZE.
    """
    name = optim_cfg.LR_SCHEDULER
    stepsize = optim_cfg.STEPSIZE
    max_epoch = optim_cfg.MAX_EPOCH
    if name not in AVAILABLE_SCHEDULERS:
        raise ValueError(f"Unknown OPTIM.LR_SCHEDULER={name!r}; choose one of {list(AVAILABLE_SCHEDULERS)}.")
    if name == "single_step":
        if isinstance(stepsize, (list, tuple)):
            if not stepsize:
                raise ValueError("OPTIM.STEPSIZE is empty; give one epoch, e.g. [30], or [-1] for MAX_EPOCH.")
            stepsize = stepsize[-1]
        if not isinstance(stepsize, int):
            raise ValueError(f"OPTIM.STEPSIZE must be an int for single_step, got {stepsize!r}.")
        if stepsize <= 0:
            stepsize = max(max_epoch, 1)
        scheduler: LRScheduler = StepLR(optimizer, step_size=stepsize, gamma=optim_cfg.GAMMA)
    elif name == "multi_step":
        if not isinstance(stepsize, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in stepsize):
            raise ValueError(f"OPTIM.STEPSIZE must be a list of positive epochs for multi_step, got {stepsize!r}.")
        scheduler = MultiStepLR(optimizer, milestones=list(stepsize), gamma=optim_cfg.GAMMA)
    else:
        scheduler = CosineAnnealingLR(optimizer, T_max=float(max(max_epoch, 1)))

    if optim_cfg.WARMUP_EPOCH > 0:
        if not optim_cfg.WARMUP_RECOUNT:
            scheduler.last_epoch = optim_cfg.WARMUP_EPOCH
        if optim_cfg.WARMUP_TYPE == "constant":
            scheduler = ConstantWarmupScheduler(optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_CONS_LR)
        elif optim_cfg.WARMUP_TYPE == "linear":
            scheduler = LinearWarmupScheduler(optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_MIN_LR)
        else:
            raise ValueError(f"Unknown OPTIM.WARMUP_TYPE={optim_cfg.WARMUP_TYPE!r}; "
                             f"choose one of {list(AVAILABLE_WARMUPS)}.")
    return scheduler
