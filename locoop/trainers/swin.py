"""Zero-shot Swin-V2 classifier (SeTAR's vision-only backbone): no prompts, no training.

:class:`SeTARSwin` loads ``MODEL.BACKBONE.NAME`` -- a local Hugging Face snapshot of a
``Swinv2ForImageClassification`` (SeTAR: ``microsoft/swinv2-base-patch4-window16-256``), see
:func:`locoop.models.swinv2.load_swinv2` -- in float32 (SeTAR runs Swin-V2 in float32) on the shared
device choice (:func:`locoop.engine.trainer.select_device`). Its data pipelines are SeTAR's Swin ones
(:func:`locoop.data.transforms.build_transform` picks them for a Swin-V2 backbone, at ``INPUT.SIZE``:
256 in SeTAR's configs).

Interface shared with the CLIP trainers, so ``eval`` and ``setar-search`` take it unchanged:
``clip_model`` is the evaluated model (here the :class:`~locoop.models.swinv2.SwinV2Classifier`; the
name is the one every command reads), ``text_features()`` is None -- the classifier's logits are the
class similarities (:mod:`locoop.ood.heads`) -- and ``model_inference`` gives the logits.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from locoop.engine.registry import TRAINER_REGISTRY
from locoop.engine.trainer import TrainerX
from locoop.trainers.base import NothingToTrain

Tensor = torch.Tensor

__all__ = ["SeTARSwin"]


@TRAINER_REGISTRY.register("SeTARSwin")
class SeTARSwin(NothingToTrain, TrainerX):
    """A Swin-V2 image classifier evaluated zero-shot (``eval``) or pruned by SeTAR (``setar-search``)."""

    NEEDS_CHECKPOINT = False
    RUN_HINT = "run eval or setar-search"

    #: No text side and no class prompts: ``setar-search`` searches it without prompts (and no --model-dir).
    VISION_ONLY = True
    CFG_SECTIONS = ("MODEL.BACKBONE",)
    #: The precision the classifier runs at (SeTAR: float32), recorded in the results.
    precision = "fp32"

    def check_cfg(self, cfg) -> None:
        from locoop.models.swinv2 import is_swinv2_backbone

        super().check_cfg(cfg)
        if not is_swinv2_backbone(str(cfg.MODEL.BACKBONE.NAME)):
            raise ValueError(f"TRAINER.NAME SeTARSwin needs a Swin-V2 snapshot in MODEL.BACKBONE.NAME, got "
                             f"{cfg.MODEL.BACKBONE.NAME!r}; pass e.g. MODEL.BACKBONE.NAME "
                             "microsoft/swinv2-base-patch4-window16-256 (from the local Hugging Face cache) or a "
                             "snapshot folder")

    def build_model(self) -> None:
        from locoop.models.swinv2 import load_swinv2

        model = load_swinv2(str(self.cfg.MODEL.BACKBONE.NAME), device=self.device, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        if model.num_classes != self.num_classes:
            raise ValueError(f"the Swin-V2 classifier {model.source} has {model.num_classes} classes but the dataset "
                             f"{self.cfg.DATASET.NAME} has {self.num_classes}; use a classifier trained on it")
        self.model = model
        self.register_model("model", model)
        if self.cfg.VERBOSE:
            print(f"Swin-V2 classifier: {model.extra_repr()}")

    @property
    def clip_model(self) -> torch.nn.Module:
        """The evaluated model (the name every command reads; a classifier here, see :mod:`locoop.ood.heads`)."""
        return self.model

    def text_features(self) -> None:
        """None: the classifier has no text side; its logits are the class similarities."""
        return None

    def class_prompts(self, chunk_size: Optional[int] = None):
        raise ValueError(f"{type(self).__name__} is a vision-only classifier; it has no class prompts")

    @torch.no_grad()
    def model_inference(self, input: Tensor, return_local: bool = False) -> Union[Tensor, tuple]:
        """Logits ``[B, K]`` (and local logits ``[B, N, K]``)."""
        return self.model(input, return_local)

