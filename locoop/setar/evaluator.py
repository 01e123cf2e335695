"""What SeTAR's greedy loop asks of a search mode: the criterion of a candidate, and commits.

An :class:`Evaluator` answers two questions for :func:`locoop.setar.search.run_search`:

* :meth:`Evaluator.evaluate` -- the criterion parts of candidate ``(step, ratio)``: the model with
  every committed ratio applied plus ``ratio`` at ``step`` (ratio 0 = the committed model itself),
  and whether the value was reused from an identical earlier evaluation instead of computed;
* :meth:`Evaluator.commit` -- make a candidate part of the model.

Two modes implement it, and both select the same settings with the same criteria (tested):

* ``fast`` (:mod:`locoop.setar.fast_evaluator`): cached block inputs, the other tower's
  features reused, ratio 0 and unchanged candidates never recomputed;
* ``naive`` (:mod:`locoop.setar.naive_evaluator`): everything recomputed for every candidate,
  through paths that share nothing with the fast one (the reference's cost and arithmetic).

Both count transformer-block forward passes per sample (an image or a prompt going through one
block) in a shared :class:`Counter`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from locoop.models.head import ClassPrompts

from .criterion import Criterion
from .lowrank import LowRankEditor
from .searchers import Step

Tensor = torch.Tensor
Parts = Dict[str, float]  # {"criterion": value, "loss": ..., ...}

__all__ = ["SearchData", "Counter", "Evaluator", "EVALUATORS", "register_evaluator", "list_modes", "build_evaluator"]


@dataclass
class SearchData:
    """Validation data of one search.

    Attributes:
        id_batches: ``[(images [B, 3, H, W], labels [B]), ...]`` preprocessed ID validation images.
        text: the class prompts (:class:`~locoop.models.head.ClassPrompts`); None for a classifier
            whose outputs are its class logits (a Swin-V2, :func:`locoop.setar.lowrank.is_block_model`).
        ood_batches: ``[images, ...]`` OOD validation images (metric criteria only).
        reload: optional ``() -> (id_batches, ood_batches)`` that decodes the images again;
            the naive mode calls it for every candidate, like the reference does. It must give
            the same batches as ``id_batches`` / ``ood_batches``.
    """

    id_batches: List[Tuple[Tensor, Tensor]]
    text: Optional[ClassPrompts]
    ood_batches: List[Tensor] = field(default_factory=list)
    reload: Optional[Callable[[], Tuple[list, list]]] = None

    def __post_init__(self) -> None:
        if not self.id_batches:
            raise ValueError("SearchData needs at least one batch of ID validation images")
        for images, labels in self.id_batches:
            if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
                raise ValueError("SearchData.id_batches must hold (images [B, 3, H, W], labels [B]) pairs")
        if self.text is not None and not isinstance(self.text, ClassPrompts):
            raise ValueError("SearchData.text must be ClassPrompts (tokens, or prompt-learner embeddings), or None "
                             "for a classifier without a text side (Swin-V2)")

    @property
    def num_id(self) -> int:
        return sum(int(lbl.shape[0]) for _, lbl in self.id_batches)

    @property
    def num_ood(self) -> int:
        return sum(int(im.shape[0]) for im in self.ood_batches)


class Counter(dict):
    """Named counts (block passes per sample, candidates evaluated / reused)."""

    def add(self, key: str, n: int) -> None:
        self[key] = self.get(key, 0) + int(n)


class Evaluator(ABC):
    """Criterion of candidates on a model whose committed settings grow step by step.

    Args:
        model: the :class:`clip.model.CLIP` being searched (edited in place through ``editor``).
        data: validation images and class prompts.
        editor: the :class:`LowRankEditor` of ``model``.
        criterion: turns image and text features into criterion parts.
        device: where to compute.
        counter: shared counts of block passes.
        cache_bytes: memory budget of cached hidden states (modes that cache).
    """

    def __init__(self, model: nn.Module, data: SearchData, editor: LowRankEditor, criterion: Criterion,
                 device: torch.device, counter: Counter, cache_bytes: float = 8 * 2 ** 30) -> None:
        self.model, self.data, self.editor, self.criterion = model, data, editor, criterion
        self.device, self.counter, self.cache_bytes = device, counter, float(cache_bytes)

    @abstractmethod
    def evaluate(self, step: Step, ratio: float) -> Tuple[Parts, bool]:
        """``(criterion parts, reused)`` of the committed model with ``ratio`` at ``step``.

        The model is left as it was (the candidate is reverted).
        """

    @abstractmethod
    def commit(self, step: Step, ratio: float, parts: Parts) -> None:
        """Apply ``ratio`` at ``step`` for good; ``parts`` is what :meth:`evaluate` gave for it."""

    def restore(self, settings: Sequence[Tuple[Step, float]], known: Mapping[Tuple[Step, float], Parts],
                incumbent: Optional[Parts]) -> None:
        """Bring a fresh evaluator to the state after ``settings`` were committed (a resumed search).

        Args:
            settings: the committed ``(step, ratio)`` pairs, in order.
            known: criterion parts of candidates evaluated on the model as it is now (after the
                last non-zero commit); an evaluator may reuse them.
            incumbent: the criterion parts of the committed model (None before the first step).
        """
        for step, ratio in settings:
            self.editor.apply(step.tower, step.weight_type, step.layer, ratio)


EVALUATORS: Dict[str, Type[Evaluator]] = {}


def register_evaluator(mode: str) -> Callable[[Type[Evaluator]], Type[Evaluator]]:
    """Class decorator registering an :class:`Evaluator` as search mode ``mode``."""

    def deco(cls: Type[Evaluator]) -> Type[Evaluator]:
        if mode in EVALUATORS and EVALUATORS[mode] is not cls:
            raise KeyError(f"search mode {mode!r} is already registered by {EVALUATORS[mode].__name__}")
        EVALUATORS[mode] = cls
        return cls

    return deco


def list_modes() -> Tuple[str, ...]:
    """Registered search modes (``fast``, ``naive``, ...)."""
    from . import fast_evaluator, naive_evaluator  # noqa: F401  (register the built-in modes)

    return tuple(EVALUATORS)


def build_evaluator(mode: str, *args, **kwargs) -> Evaluator:
    """The evaluator of search mode ``mode`` (arguments as :class:`Evaluator`).

    Raises:
        ValueError: unknown mode (lists the valid ones).
    """
    modes = list_modes()
    if mode not in modes:
        raise ValueError(f"unknown search mode {mode!r}; valid modes: {', '.join(modes)}")
    return EVALUATORS[mode](*args, **kwargs)
