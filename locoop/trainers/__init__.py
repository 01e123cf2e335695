"""Trainers (registered in ``TRAINER_REGISTRY`` on import): LoCoOp, CoOp, ZeroshotCLIP, SeTARZeroshotCLIP,
SeTARSwin (a Swin-V2 classifier, no text side).

Reusable pieces: :func:`locoop_loss` / :func:`select_ood_patches` (loss.py), :class:`PromptLearner`
(prompt_learner.py), :class:`TextEncoder` with the exact shared-prefix encoder (text_encoder.py),
:func:`load_clip` (clip_backbone.py); features, logits and accuracy come from the CLIP head
(:mod:`locoop.models.head`, also :func:`zero_shot_text_features`).
"""
from .base import PromptTrainer
from .clip_backbone import load_clip, load_clip_to_cpu, resolve_precision
from .locoop import CoOp, CustomCLIP, LoCoOp
from .loss import entropy, locoop_loss, ood_entropy_loss, select_ood_patches
from .prompt_learner import PromptLearner, zero_shot_text_features
from .text_encoder import TextEncoder, encode_text_naive, encode_text_shared_prefix, encode_text_truncated
from .swin import SeTARSwin
from .zsclip import SeTARZeroshotCLIP, ZeroshotCLIP

__all__ = [
    "CoOp", "CustomCLIP", "LoCoOp", "PromptLearner", "PromptTrainer", "SeTARSwin", "SeTARZeroshotCLIP", "TextEncoder",
    "ZeroshotCLIP", "encode_text_naive", "encode_text_shared_prefix", "encode_text_truncated", "entropy", "load_clip",
    "load_clip_to_cpu", "locoop_loss", "ood_entropy_loss", "resolve_precision", "select_ood_patches",
    "zero_shot_text_features",
]
