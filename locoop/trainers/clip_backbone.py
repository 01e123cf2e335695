"""Loading the CLIP backbone of a trainer: name or path from ``MODEL.BACKBONE.NAME``, device, precision.

Precision (``TRAINER.LOCOOP.PREC``, as CoOp/LoCoOp):

* ``fp16``: CLIP's weights in half precision as shipped (LayerNorms compute in fp32); the learned
  context is fp16 too. CUDA only: on a CPU the model stays fp32 (half-precision matmuls there are
  slow), with a note.
* ``fp32``: everything in fp32.
* ``amp``: fp32 weights, forward under ``torch.autocast`` (fp16) with a GradScaler; on CPU plain fp32.

The test suite runs the fp16 / amp code on a CPU too, with ``LOCOOP_HALF_ON_CPU=1``
(:mod:`locoop.engine.precision`, which owns the precision rules).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from locoop.engine.precision import PRECISIONS, resolve_precision

__all__ = ["PRECISIONS", "load_clip_to_cpu", "resolve_precision", "load_clip", "backbone_name"]


def backbone_name(cfg: Any) -> str:
    """``MODEL.BACKBONE.NAME``, checked to be set.

    Raises:
        ConfigError (a ValueError): empty name (lists the available model names).
    """
    from locoop.config.checks import check_sections

    check_sections(cfg, ("MODEL.BACKBONE",))
    return str(cfg.MODEL.BACKBONE.NAME).strip()


def load_clip_to_cpu(cfg: Any, download_root: Optional[str] = None) -> nn.Module:
    """Load the fp32 CLIP model named by ``cfg.MODEL.BACKBONE.NAME`` on the CPU (the reference's name).

    A model name is downloaded once (checksum-verified) into the cache; a path may be a TorchScript
    archive, a state dict or a Hugging Face CLIP folder (see :func:`clip.load`).
    """
    import clip

    name = backbone_name(cfg)
    model, _ = clip.load(name, device="cpu", download_root=download_root)
    return model


def load_clip(cfg: Any, device: Union[str, torch.device], prec: Optional[str] = None,
              verbose: bool = True) -> tuple[nn.Module, str]:
    """Load the backbone, move it to ``device`` and set its precision.

    Args:
        cfg: config (``MODEL.BACKBONE.NAME``; ``TRAINER.LOCOOP.PREC`` when ``prec`` is None).
        device: target device.
        prec: "fp16", "fp32" or "amp".
        verbose: print what is loaded and any precision fallback.

    Returns:
        ``(clip_model in eval mode, precision used)``.
    """
    from clip.model import convert_weights_fp16

    prec = prec if prec is not None else cfg.TRAINER.LOCOOP.PREC
    used = resolve_precision(prec, device)
    if verbose:
        print(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
        if used != prec:
            print(f"Note: PREC={prec!r} needs CUDA; running in fp32 on {device}")
        elif used != "fp32" and torch.device(device).type != "cuda":
            print(f"Note: PREC={prec!r} on {device} (fp16-on-CPU test mode)")
    model = load_clip_to_cpu(cfg).float()
    model = model.to(device)
    if used == "fp16":
        convert_weights_fp16(model)
    return model.eval(), used
