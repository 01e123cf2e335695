"""The criterion of SeTAR's search: how good the model is with one candidate applied.

* ``loss`` (default; also ``loss_id`` / ``loss_ood``) -- the LoCoOp loss on the ID validation
  images with the class prompts, lower is better. Logits are ``logit_scale.exp() * cos`` of the
  L2-normalised global and local image features and the class text features (the CLIP head's
  :func:`~locoop.models.head.class_logits`); the loss is computed per image batch and averaged
  with the batch sizes as weights, as SeTAR does (its per-batch means are repeated ``len(batch)``
  times before the mean). ``acc`` (top-1 accuracy in percent) is reported alongside. A classifier
  (Swin-V2; no text side, ``text`` None) gives its global and local logits directly, used as they
  are (``logit_scale`` 1: SeTAR's Swin loss takes the raw logits).
* ``auroc`` / ``aupr`` (higher is better), ``fpr95`` (lower is better) -- metrics of ``score``
  (e.g. GL-MCM) with the ID validation images as positives and OOD validation images as
  negatives (:func:`locoop.ood.metrics.ood_metrics`, MCM's definitions). Needs OOD validation images.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from locoop.models.head import class_logits, num_correct

Tensor = torch.Tensor
ImageFeatures = List[Tuple[Tensor, Tensor]]  # per batch: (global [B, D], local [B, P, D]), normalised

__all__ = ["CRITERIA", "LOSS_CRITERIA", "Criterion"]

# criterion -> True if higher is better
CRITERIA: Dict[str, bool] = {"loss": False, "loss_id": False, "loss_ood": False,
                             "auroc": True, "aupr": True, "fpr95": False}
LOSS_CRITERIA: Tuple[str, ...] = ("loss", "loss_id", "loss_ood")


class Criterion:
    """Computes one candidate's criterion from per-batch image features and class text features.

    Args:
        name: one of :data:`CRITERIA`.
        lam, top_k: the LoCoOp loss's lambda and top-K.
        score, T: the OOD score and its temperature (metric criteria).
        logit_scale: the multiplier of the cosine similarities (``logit_scale.exp()``).
        id_labels: labels of the ID validation batches, in batch order.
    """

    def __init__(self, name: str, lam: float, top_k: int, score: str, T: float, logit_scale: float,
                 id_labels: Sequence[Tensor]) -> None:
        self.name = name
        self.higher_is_better = CRITERIA[name]
        self.lam = float(lam)
        self.top_k = int(top_k)
        self.score = score
        self.T = float(T)
        self.logit_scale = logit_scale
        self.id_labels = list(id_labels)
        self.needs_ood = name not in LOSS_CRITERIA

    def better(self, a: float, b: float) -> bool:
        """Strictly better (SeTAR's ``is_better``)."""
        return a > b if self.higher_is_better else a < b

    @property
    def worst(self) -> float:
        return -math.inf if self.higher_is_better else math.inf

    @torch.no_grad()
    def __call__(self, id_feats: ImageFeatures, ood_feats: ImageFeatures, text: Optional[Tensor]) -> Dict[str, float]:
        """``{"criterion": value, <parts>}`` of one candidate (``text`` None: the features are class logits)."""
        if not self.needs_ood:
            return self._loss_parts(id_feats, text)
        return self._metric_parts(id_feats, ood_feats, text)

    def _logits(self, feats: Tensor, text: Optional[Tensor]) -> Tensor:
        """``logit_scale * cos`` for CLIP features; a classifier's features are its logits already (text None)."""
        return feats if text is None else class_logits(feats, text, self.logit_scale)

    def _loss_parts(self, id_feats: ImageFeatures, text: Tensor) -> Dict[str, float]:
        from locoop.trainers.loss import locoop_loss  # the one LoCoOp loss of the project

        total = loss_id = loss_ood = 0.0
        correct = n = 0
        for (g, loc), labels in zip(id_feats, self.id_labels):
            labels = labels.to(g.device)
            logits_g, logits_l = self._logits(g, text), self._logits(loc, text)
            t, i, o = locoop_loss(logits_g, logits_l, labels, self.lam, self.top_k)
            b = int(labels.shape[0])
            # SeTAR weights each batch's mean by the batch size.
            total += float(t) * b
            loss_id += float(i) * b
            loss_ood += float(o) * b
            correct += num_correct(logits_g, labels)
            n += b
        parts = {"loss": total / n, "loss_id": loss_id / n, "loss_ood": loss_ood / n, "acc": 100.0 * correct / n}
        for k, v in parts.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"search criterion part {k!r} is {v}; check the model precision (fp16 "
                                         "overflow) and the validation images")
        return {"criterion": parts[self.name], **parts}

    def _metric_parts(self, id_feats: ImageFeatures, ood_feats: ImageFeatures, text: Tensor) -> Dict[str, float]:
        from locoop.ood.metrics import ood_metrics
        from locoop.ood.scores import compute_scores

        def scores(feats: ImageFeatures) -> np.ndarray:
            # one score requested: take the only entry (its key is the canonical name)
            def sim(x: Tensor) -> Tensor:
                return x if text is None else x @ text.t()

            out = [next(iter(compute_scores(sim(g), sim(loc), names=[self.score], T=self.T).values()))
                   for g, loc in feats]
            return np.concatenate(out)

        m = ood_metrics(scores(id_feats), scores(ood_feats))
        parts = {"auroc": m["auroc"], "aupr": m["aupr"], "fpr95": m["fpr95"]}
        return {"criterion": parts[self.name], **parts}
