"""The LoCoOp loss: cross-entropy on global logits plus entropy maximisation on OOD patches.

Definitions (LoCoOp, NeurIPS 2023, and its reference code ``trainers/locoop.py``):

* Logits are ``logit_scale.exp() * cos(feature, text)`` for the global feature ``[B, C]`` and for
  every local (patch) feature ``[B, P, C]``.
* A patch is treated as OOD when its label is *not* among its top-K classes. The reference ranks
  the softmax probabilities; softmax is monotonic, so ranking the logits selects the same patches
  (we rank logits, in float32). Ties: a class tied with the label does not push the label out,
  i.e. the label is in the top-K iff fewer than K classes have a strictly larger logit. The
  reference leaves ties to ``torch.topk``'s unspecified order; with continuous logits ties do not
  occur. ``top_k`` larger than the number of classes is clamped here (the reference's ``topk`` would
  fail): then no patch is ever selected. The commands refuse ``top_k >= C`` first (:func:`check_top_k`).
* ``entropy(p) = -sum_c p_c * log(p_c + 1e-5)`` per patch (the ``1e-5`` is the reference code's).
* ``L_ood = -mean(entropy)`` over the selected patches of the whole batch (one mean over all
  selected patches, not a per-image mean); ``L_ood = 0`` when no patch is selected.
* ``total = CE(logits_global, labels) + lam * L_ood``; minimising it *maximises* the entropy of
  the OOD patches. ``L_ood`` is what the reference logs as ``loss_en`` (a negative number).

Both parts are computed in float32 whatever the logits' dtype, so fp16 logits neither overflow in
the softmax nor lose the ``1e-5`` guard.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["ENTROPY_EPS", "check_top_k", "select_ood_patches", "entropy", "ood_entropy_loss", "locoop_loss"]

ENTROPY_EPS = 1e-5  # inside the log, as the reference code


def _check_shapes(logits_local: Tensor, labels: Tensor) -> None:
    if logits_local.dim() != 3:
        raise ValueError(f"logits_local must be [B, P, C], got shape {tuple(logits_local.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits_local.shape[0]:
        raise ValueError(f"labels must be [B] with B={logits_local.shape[0]} (the batch of logits_local), "
                         f"got shape {tuple(labels.shape)}")


def check_top_k(key: str, top_k: int, num_classes: int, dataset: str = "", fix: str = "") -> None:
    """Refuse a LoCoOp top-K that selects no patch: ``top_k >= num_classes``.

    The label is always among the top-C classes, so K >= C selects no patch, the OOD loss is 0
    and LoCoOp silently becomes CoOp (the reference's ``torch.topk`` fails for K > C). One check
    for every user of the rule: ``train``, SeTAR+FT, ``setar-search`` and ``visualize``.

    Args:
        key: the config key that set K (named in the message), e.g. ``TRAINER.LOCOOP.TOPK``.
        top_k: K.
        num_classes: the number of classes C of the dataset.
        dataset: the dataset name, for the message.
        fix: how to set the key (e.g. "--topk 4 or TRAINER.LOCOOP.TOPK 4"); default ``KEY N``.

    Raises:
        ValueError: ``top_k >= num_classes`` (or ``top_k < 1``), naming the value, the limit and the fix.
    """
    k, c = int(top_k), int(num_classes)
    if k < 1:
        raise ValueError(f"{key} {k} must be at least 1")
    if k >= c:
        hint = max(1, c - 1)
        where = f" of {dataset}" if dataset else ""
        fix = fix or f"{key} {hint}"
        raise ValueError(f"{key} {k} must be below the {c} classes{where}: with K >= C no region is ever "
                         f"OOD (the label is always in the top-{c}) and the OOD loss is 0; set a smaller K, "
                         f"e.g. {fix} (LoCoOp uses 200 of 1000 classes, SeTAR 300 of 1000 and 4 of 14)")


def select_ood_patches(logits_local: Tensor, labels: Tensor, top_k: int) -> Tensor:
    """Patches whose top-``top_k`` classes do not contain the image's label.

    Args:
        logits_local: ``[B, P, C]`` local logits (or probabilities: the ranking is the same).
        labels: ``[B]`` ground-truth class indices.
        top_k: K; clamped to the number of classes C.

    Returns:
        Bool tensor ``[B, P]``, True where the patch is treated as OOD.

    Raises:
        ValueError: bad shapes, ``top_k < 1`` or a label outside ``0..C-1``.
    """
    _check_shapes(logits_local, labels)
    if int(top_k) < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    num_classes = logits_local.shape[-1]
    labels = labels.to(logits_local.device).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got min {int(labels.min())}, "
                         f"max {int(labels.max())}")
    k = min(int(top_k), num_classes)
    with torch.no_grad():
        logits = logits_local.detach().float()
        index = labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
        label_logit = logits.gather(-1, index)  # [B, P, 1]
        # Rank of the label = number of classes strictly above it; cheaper than topk and tie-stable.
        rank = (logits > label_logit).sum(dim=-1)
    return rank >= k


def entropy(probs: Tensor) -> Tensor:
    """Entropy ``-sum p * log(p + 1e-5)`` over the last dimension (the reference's formula)."""
    return -(probs * torch.log(probs + ENTROPY_EPS)).sum(dim=-1)


def ood_entropy_loss(logits_local: Tensor, mask: Tensor) -> Tensor:
    """``-mean`` entropy of the class softmax over the patches selected by ``mask``.

    Args:
        logits_local: ``[B, P, C]``.
        mask: bool ``[B, P]`` (from :func:`select_ood_patches`).

    Returns:
        Scalar float32 tensor; exactly 0 (with zero gradient, no NaN) when ``mask`` is empty.
    """
    ent = entropy(F.softmax(logits_local.float(), dim=-1))  # [B, P]
    weight = mask.to(ent.dtype)
    # Masked sum over a clamped count: no boolean indexing (no host sync), 0/1 instead of 0/0.
    return -(ent * weight).sum() / weight.sum().clamp_min(1.0)


def locoop_loss(logits_global: Tensor, logits_local: Tensor, labels: Tensor, lam: float,
                top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The LoCoOp training loss.

    Args:
        logits_global: ``[B, C]`` = ``logit_scale.exp() * cos(image, text)``.
        logits_local: ``[B, P, C]``, the same for every patch feature.
        labels: ``[B]`` class indices.
        lam: weight of the OOD term (``TRAINER.LOCOOP.LAMBDA``; 0 gives CoOp's loss).
        top_k: ``TRAINER.LOCOOP.TOPK``.

    Returns:
        ``(total, loss_id, loss_ood)`` with ``total = loss_id + lam * loss_ood``; ``loss_id`` is the
        cross-entropy, ``loss_ood = -mean entropy`` of the selected patches (0 if none).
    """
    if logits_global.dim() != 2 or logits_global.shape[0] != logits_local.shape[0] \
            or logits_global.shape[-1] != logits_local.shape[-1]:
        raise ValueError(f"logits_global must be [B, C] matching logits_local [B, P, C]; got "
                         f"{tuple(logits_global.shape)} and {tuple(logits_local.shape)}")
    mask = select_ood_patches(logits_local, labels, top_k)
    labels = labels.to(logits_global.device).long()
    loss_id = F.cross_entropy(logits_global.float(), labels)
    loss_ood = ood_entropy_loss(logits_local, mask)
    return loss_id + lam * loss_ood, loss_id, loss_ood
