"""Zero-shot CLIP: one hand-written prompt per class (``TRAINER.ZSCLIP.PROMPT_TEMPLATE``), no training.

The default ``"a photo of a {}."`` is CoOp's ZeroshotCLIP template for ImageNet; the MCM / GL-MCM
evaluation uses ``"a photo of a {}"`` (no full stop): ``configs/zeroshot/{MCM,GL-MCM}.yaml`` set it.

:class:`SeTARZeroshotCLIP` is the same model with SeTAR's prompt (``SETAR.PROMPT_TEMPLATE``): the
model ``setar-search`` prunes when no prompt-learning run is given.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from locoop.engine.registry import TRAINER_REGISTRY
from locoop.models.head import DEFAULT_TEXT_CHUNK, CLIPHead, ClassPrompts, zero_shot_prompts

from .base import NothingToTrain, PromptTrainer
from .clip_backbone import load_clip

Tensor = torch.Tensor

__all__ = ["ZeroshotCLIP", "SeTARZeroshotCLIP", "ZS_TEMPLATE"]

ZS_TEMPLATE = "a photo of a {}."


@TRAINER_REGISTRY.register("ZeroshotCLIP")
class ZeroshotCLIP(NothingToTrain, PromptTrainer):
    """CLIP with hand-written prompts; evaluation only (``--eval-only``).

    Same interface as the prompt-learning trainers: ``clip_model``, ``text_features()`` and
    ``class_prompts()``. The text features are computed from the current weights at every call
    (once per test pass, see :class:`PromptTrainer`), so a pruned or adapted text tower is seen.
    The prompt is ``TRAINER.ZSCLIP.PROMPT_TEMPLATE`` (:meth:`prompt_template`).
    """

    template = ZS_TEMPLATE
    NEEDS_CHECKPOINT = False

    #: Checked when the trainer is created (locoop/config/checks.py).
    CFG_SECTIONS = ("MODEL.BACKBONE", "TRAINER.LOCOOP", "TRAINER.ZSCLIP")

    def prompt_template(self) -> str:
        """The class-prompt template: the one place it is chosen."""
        return str(self.cfg.TRAINER.ZSCLIP.PROMPT_TEMPLATE)

    def build_model(self) -> None:
        cfg = self.cfg
        self.template = self.prompt_template()
        # amp makes no sense without training: fp16 on CUDA as CLIP ships, fp32 elsewhere.
        prec = "fp16" if cfg.TRAINER.LOCOOP.PREC == "amp" else cfg.TRAINER.LOCOOP.PREC
        self.clip_model, self.precision = load_clip(cfg, self.device, prec, verbose=bool(cfg.VERBOSE))
        for p in self.clip_model.parameters():
            p.requires_grad_(False)
        self.head = CLIPHead(self.clip_model)
        if cfg.VERBOSE:
            print(f"Prompt template: {self.prompt_template()!r} ({len(self.dm.dataset.classnames)} classes)")

    def class_prompts(self, chunk_size: Optional[int] = None) -> ClassPrompts:
        """The tokenized prompts ``prompt_template().format(<class>)``."""
        return zero_shot_prompts(list(self.dm.dataset.classnames), self.prompt_template(),
                                 int(self.clip_model.context_length), chunk_size=chunk_size or DEFAULT_TEXT_CHUNK)

    @torch.no_grad()
    def text_features(self) -> Tensor:
        """Normalised float32 text features ``[C, D]`` of the class prompts."""
        return self.head.text_features(self.class_prompts())

    @torch.no_grad()
    def model_inference(self, input: Tensor, return_local: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Logits ``logit_scale.exp() * cos``: global ``[B, C]`` (and local ``[B, P, C]``)."""
        text = self._eval_text_features if self._eval_text_features is not None else self.text_features()
        return self.head(input, text, return_local)



@TRAINER_REGISTRY.register("SeTARZeroshotCLIP")
class SeTARZeroshotCLIP(ZeroshotCLIP):
    """Zero-shot CLIP with SeTAR's class prompt ``SETAR.PROMPT_TEMPLATE`` (what ``setar-search`` prunes)."""

    def prompt_template(self) -> str:
        return str(self.cfg.SETAR.PROMPT_TEMPLATE)
