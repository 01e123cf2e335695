"""What the OOD runner asks of a model: per-image class similarities, global ``[n, C]`` and local ``[n, P, C]``.

Two kinds of model plug into the same scores, metrics, feature cache and result files:

* **CLIP (text head)**: the model encodes images (``encode_image(images, return_local=...)``); the
  runner stores the L2-normalised image features and turns them into cosines with the class text
  features (``text_features``, ``[C, D]``). ``logit_scale`` is CLIP's.
* **A classifier (logit head)**: the model itself outputs class logits; it says so by implementing
  ``class_logits(images, return_local) -> logits [B, K] (, local logits [B, P, K])``
  (:class:`locoop.models.swinv2.SwinV2Classifier`). The runner stores the raw logits and uses them
  as the similarities with no text side (``text_features = None``) and a neutral ``logit_scale``
  of 1, so ``MCM = max softmax(logits / T)``, ``energy = T * logsumexp(logits / T)`` and the local
  scores read the local logits -- SeTAR's ``scorers.py`` for its Swin-V2 model.

One rule decides the kind (:func:`outputs_logits`); :func:`encode_batch` and
:func:`locoop.ood.features.iter_similarities` are the only places that act on it. A new backbone
plugs in by implementing ``class_logits`` (a classifier) or ``encode_image`` (an image-text model);
see docs/ARCHITECTURE.md, "How to add a backbone".
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["outputs_logits", "encode_batch", "head_logit_scale", "NEUTRAL_LOGIT_SCALE"]

#: ``logit_scale`` of a logit head: the logits are already the classifier's scale (energy-logit = energy).
NEUTRAL_LOGIT_SCALE = 1.0


def outputs_logits(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a classifier whose outputs are class logits (it implements ``class_logits``)."""
    return callable(getattr(model, "class_logits", None))


def encode_batch(model: torch.nn.Module, images: torch.Tensor,
                 with_local: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What the runner stores per image, in float32: normalised CLIP features, or a classifier's raw logits.

    Returns:
        ``(global [B, D or K], local [B, P, D or K] or None)``.
    """
    if outputs_logits(model):
        out = model.class_logits(images, return_local=with_local)
        glob, loc = out if with_local else (out, None)
        return glob.float(), (loc.float() if loc is not None else None)
    out = model.encode_image(images, return_local=with_local)
    glob, loc = out if with_local else (out, None)
    # Normalise in float32: fp16 norms of 512-d vectors lose digits the scores can see.
    return F.normalize(glob.float(), dim=-1), (F.normalize(loc.float(), dim=-1) if loc is not None else None)


def head_logit_scale(model: torch.nn.Module) -> float:
    """The ``logit_scale`` the scores use: CLIP's ``exp(logit_scale)``, 1 for a classifier, else CLIP's clamp 100."""
    if outputs_logits(model):
        return NEUTRAL_LOGIT_SCALE
    if hasattr(model, "logit_scale"):
        return float(model.logit_scale.exp().item())
    return 100.0
