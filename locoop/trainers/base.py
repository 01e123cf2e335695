"""Base class of trainers that classify with the text features of class prompts."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from locoop.engine.trainer import TrainerX


class PromptTrainer(TrainerX):
    """A trainer whose classifier is ``text_features()`` (normalised ``[C, D]``).

    The text features do not depend on the images, so a test pass computes them once and
    ``model_inference`` reads them from ``self._eval_text_features`` instead of once per batch.

    Subclasses also expose ``clip_model`` and, where the prompts are fixed inputs of the text
    tower, ``class_prompts()`` (a :class:`locoop.models.head.ClassPrompts`): what SeTAR's search
    encodes through the pruned text tower.
    """

    _eval_text_features: Optional[Tensor] = None

    def text_features(self) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement text_features()")

    def class_prompts(self, chunk_size: Optional[int] = None):
        raise NotImplementedError(f"{type(self).__name__} has no fixed class prompts (class_prompts())")

    @torch.no_grad()
    def test(self, split: Optional[str] = None) -> float:
        self._eval_text_features = self.text_features()
        try:
            return super().test(split)
        finally:
            self._eval_text_features = None


class NothingToTrain:
    """Mixin of the trainers that evaluate a fixed model (zero-shot CLIP, a Swin-V2 classifier).

    ``train`` / ``forward_backward`` refuse with :attr:`RUN_HINT`; ``load_model`` ignores a
    ``--model-dir`` with a note (there are no learned weights to load).
    """

    #: What to run instead, in the refusal.
    RUN_HINT = "run it with --eval-only"

    def train(self) -> None:  # type: ignore[override]
        raise ValueError(f"{type(self).__name__} has nothing to train; {self.RUN_HINT}")

    def forward_backward(self, batch: dict) -> dict:
        raise ValueError(f"{type(self).__name__} has nothing to train; {self.RUN_HINT}")

    def load_model(self, directory: str, epoch: Optional[int] = None, strict: bool = True) -> None:
        if directory and self.cfg.VERBOSE:
            print(f"Note: {type(self).__name__} has no learned weights; ignoring --model-dir {directory}")
