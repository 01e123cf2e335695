"""Precision settings (``fp16``, ``fp32``, ``amp``): what runs where, the autocast context, the grad scaler.

* ``fp16``: half-precision weights (as CLIP ships them on a GPU; LayerNorms compute in fp32).
* ``fp32``: everything in fp32.
* ``amp``: fp32 weights, forward passes under ``torch.autocast`` (fp16) and a ``GradScaler``.

On a CPU ``fp16`` and ``amp`` fall back to ``fp32``: half-precision matmuls there are slow. The
**fp16-on-CPU test mode** (environment variable ``LOCOOP_HALF_ON_CPU=1``) keeps them, so the code
GPU users run by default (``TRAINER.LOCOOP.PREC fp16``, ``amp``) is exercised by the CPU test suite:
fp16 weights, ``torch.autocast("cpu", dtype=torch.float16)`` and ``torch.amp.GradScaler("cpu")``.
It is for tests; it changes no number of a CUDA run.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Optional, Union

import torch

__all__ = ["PRECISIONS", "HALF_ON_CPU_ENV", "half_on_cpu", "half_supported", "resolve_precision", "autocast",
           "grad_scaler"]

PRECISIONS = ("fp16", "fp32", "amp")
HALF_ON_CPU_ENV = "LOCOOP_HALF_ON_CPU"

Device = Union[str, torch.device]


def half_on_cpu() -> bool:
    """True when the fp16-on-CPU test mode is on (``LOCOOP_HALF_ON_CPU`` set to anything but ``""``/``0``)."""
    return os.environ.get(HALF_ON_CPU_ENV, "") not in ("", "0")


def half_supported(device: Device) -> bool:
    """Whether fp16 weights and fp16 autocast run on ``device``: CUDA, or any device in the test mode."""
    return torch.device(device).type == "cuda" or half_on_cpu()


def resolve_precision(prec: str, device: Device, key: str = "TRAINER.LOCOOP.PREC") -> str:
    """The precision actually used: ``fp16`` and ``amp`` need CUDA (or the test mode), else ``fp32``.

    Raises:
        ValueError: unknown precision name (naming ``key`` and the valid ones).
    """
    if prec not in PRECISIONS:
        raise ValueError(f"{key} must be one of {PRECISIONS}, got {prec!r}")
    if prec != "fp32" and not half_supported(device):
        return "fp32"
    return prec


def autocast(device: Device, enabled: bool) -> Any:
    """fp16 autocast on ``device`` when ``enabled`` and supported there, else a no-op context."""
    device = torch.device(device)
    if enabled and half_supported(device):
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


def grad_scaler(device: Device, enabled: bool = True) -> Optional[torch.amp.GradScaler]:
    """A ``GradScaler`` for mixed-precision training on ``device``, or None when AMP is off there."""
    device = torch.device(device)
    if not (enabled and half_supported(device)):
        return None
    return torch.amp.GradScaler(device.type)
