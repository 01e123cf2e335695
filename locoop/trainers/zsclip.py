"""Zero-shot CLIP: one hand-written prompt per class (``TRAINER.ZSCLIP.PROMPT_TEMPLATE``), no training.

The default ``"a photo of a {}."`` is CoOp's ZeroshotCLIP template for ImageNet; the MCM / GL-MCM
evaluation uses ``"a photo of a {}"`` (no full stop): ``configs/zeroshot/{MCM,GL-MCM}.yaml`` set it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from locoop.engine.registry import TRAINER_REGISTRY
from locoop.engine.trainer import TrainerX

from .clip_backbone import load_clip
from .prompt_learner import zero_shot_text_features

Tensor = torch.Tensor

__all__ = ["ZeroshotCLIP", "ZS_TEMPLATE"]

ZS_TEMPLATE = "a photo of a {}."


@TRAINER_REGISTRY.register("ZeroshotCLIP")
class ZeroshotCLIP(TrainerX):
    """CLIP with hand-written prompts; evaluation only (``--eval-only``).

    Same interface as the prompt-learning trainers: ``clip_model`` and ``text_features()``.
    The prompt is ``TRAINER.ZSCLIP.PROMPT_TEMPLATE`` (``template`` after building).
    """

    template = ZS_TEMPLATE

    #: Checked when the trainer is created (locoop/config/checks.py).
    CFG_SECTIONS = ("MODEL.BACKBONE", "TRAINER.LOCOOP", "TRAINER.ZSCLIP")

    def build_model(self) -> None:
        cfg = self.cfg
        self.template = str(cfg.TRAINER.ZSCLIP.PROMPT_TEMPLATE)
        # amp makes no sense without training: fp16 on CUDA as CLIP ships, fp32 elsewhere.
        prec = "fp16" if cfg.TRAINER.LOCOOP.PREC == "amp" else cfg.TRAINER.LOCOOP.PREC
        self.clip_model, self.precision = load_clip(cfg, self.device, prec, verbose=bool(cfg.VERBOSE))
        for p in self.clip_model.parameters():
            p.requires_grad_(False)
        classnames = list(self.dm.dataset.classnames)
        if cfg.VERBOSE:
            print(f"Prompt template: {self.template!r} ({len(classnames)} classes)")
        self._text_features = zero_shot_text_features(self.clip_model, classnames, self.template, device=self.device)

    def text_features(self) -> Tensor:
        """Normalised text features ``[C, D]`` of the class prompts."""
        return self._text_features

    @torch.no_grad()
    def model_inference(self, input: Tensor, return_local: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Logits ``logit_scale.exp() * cos``: global ``[B, C]`` (and local ``[B, P, C]``)."""
        out = self.clip_model.encode_image(input.to(self.clip_model.dtype), return_local=return_local)
        scale = self.clip_model.logit_scale.exp()
        text = self._text_features
        if not return_local:
            return scale * F.normalize(out, dim=-1) @ text.t()
        glob, local = out
        return scale * F.normalize(glob, dim=-1) @ text.t(), scale * F.normalize(local, dim=-1) @ text.t()

    def train(self) -> None:  # type: ignore[override]
        raise ValueError("ZeroshotCLIP has nothing to train; run it with --eval-only")

    def forward_backward(self, batch: dict) -> dict:
        raise ValueError("ZeroshotCLIP has nothing to train; run it with --eval-only")

    def load_model(self, directory: str, epoch: Optional[int] = None, strict: bool = True) -> None:
        if directory and self.cfg.VERBOSE:
            print(f"Note: ZeroshotCLIP has no learned weights; ignoring --model-dir {directory}")
