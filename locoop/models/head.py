"""The CLIP head: what every method computes on top of a :class:`clip.model.CLIP`.

LoCoOp/CoOp (``CustomCLIP``), zero-shot CLIP, SeTAR's search criterion, SeTAR+FT and the region
visualisation all classify the same way, so it is written once here:

* image features: the global ``[B, D]`` and local ``[B, P, D]`` features, L2-normalised in
  float32 whatever precision the model runs in (fp16 norms of 512-d vectors lose digits that the
  scores can see). No autograd graph is built unless an image-tower parameter is trainable;
* text features of the class prompts: :class:`ClassPrompts` (tokens, or prompt-learner token
  embeddings) through CLIP's exact truncated encoders, or a prompt learner through
  :class:`~locoop.trainers.text_encoder.TextEncoder` (shared-prefix encoding), L2-normalised in
  float32;
* logits ``logit_scale.exp() * cos`` and top-1 accuracy (:func:`accuracy`).

The "images -> (global logits [B, C], local logits [B, P, C])" part is the interface
:class:`ImageClassifier`: LoCoOp's loss, the SeTAR criterion and the region visualisation need
nothing else, so a vision-only backbone with a linear classifier (no text tower) can implement it
too. A CLIP model becomes one with :meth:`CLIPHead.classifier` (text features as the classifier
weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
Features = Union[Tensor, Tuple[Tensor, Tensor]]

__all__ = ["DEFAULT_TEXT_CHUNK", "ClassPrompts", "zero_shot_prompts", "l2_normalize", "class_logits", "num_correct",
           "accuracy", "ImageClassifier", "CLIPHead", "CLIPClassifier", "zero_shot_text_features"]

DEFAULT_TEXT_CHUNK = 256  # prompts per text forward pass


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of unit L2 norm, in float32."""
    return F.normalize(x.float(), dim=-1)


def class_logits(features: Tensor, text: Tensor, scale: Union[float, Tensor]) -> Tensor:
    """``scale * cos``: logits of normalised features ``[..., D]`` against normalised class text ``[C, D]``."""
    return scale * features @ text.t()


def num_correct(logits: Tensor, labels: Tensor) -> int:
    """Number of rows whose top-1 class (first index on ties) is the label."""
    return int((logits.argmax(dim=-1) == labels.to(logits.device)).sum())


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    n = int(labels.shape[0])
    return 100.0 * num_correct(logits, labels) / n if n else 0.0


# ============================================================================ class prompts
@dataclass
class ClassPrompts:
    """The class prompts of a classifier, as tokens (hand-written) or prompt-learner embeddings.

    Exactly one of ``tokens`` or ``embeddings`` is given.

    Attributes:
        tokens: ``[C, 77]`` tokenized prompts (e.g. ``"a photo of a <class>."``).
        embeddings: ``[C, L, W]`` token embeddings *without* positional embedding, as a prompt
            learner builds them (learned context + class-name tokens).
        eot_idx: ``[C]`` EOT positions of ``embeddings``.
        chunk_size: prompts encoded per forward pass.
    """

    tokens: Optional[Tensor] = None
    embeddings: Optional[Tensor] = None
    eot_idx: Optional[Tensor] = None
    chunk_size: int = DEFAULT_TEXT_CHUNK

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.embeddings is None):
            raise ValueError("ClassPrompts needs exactly one of tokens [C, 77] or embeddings [C, L, W] (+ eot_idx)")
        if self.embeddings is not None and (self.eot_idx is None or self.eot_idx.shape[0] != self.embeddings.shape[0]):
            raise ValueError("ClassPrompts.embeddings needs eot_idx with one EOT position per prompt")
        if int(self.chunk_size) < 1:
            raise ValueError(f"ClassPrompts.chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def num_classes(self) -> int:
        return int((self.tokens if self.tokens is not None else self.embeddings).shape[0])

    def chunks(self) -> List[slice]:
        """The prompt slices encoded together."""
        n, k = self.num_classes, int(self.chunk_size)
        return [slice(i, min(n, i + k)) for i in range(0, n, k)]

    def chunk(self, sl: slice, device: Union[str, torch.device]) -> Tuple[Tensor, Tensor]:
        """``(token embeddings or tokens, EOT positions)`` of one slice on ``device``.

        Tokens are returned as tokens (``[c, 77]`` long); embeddings as embeddings.
        """
        if self.tokens is not None:
            tokens = self.tokens[sl].to(device)
            return tokens, tokens.argmax(dim=-1)
        return self.embeddings[sl].to(device), self.eot_idx[sl].to(device)


def zero_shot_prompts(classnames: Sequence[str], template: str, context_length: int = 77,
                      chunk_size: int = DEFAULT_TEXT_CHUNK) -> ClassPrompts:
    """Hand-written prompts ``template.format(name)`` per class ('_' in a name read as a space).

    Raises:
        ValueError: a template without exactly one ``{}``, or a prompt longer than the context.
    """
    import clip

    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"a prompt template must contain '{{}}' once for the class name, got {template!r}")
    names = [c.replace("_", " ") for c in classnames]
    try:
        tokens = clip.tokenize([template.format(n) for n in names], context_length=int(context_length))
    except RuntimeError as e:
        raise ValueError(f"a class prompt is longer than CLIP's {context_length} tokens ({e})") from None
    return ClassPrompts(tokens=tokens, chunk_size=chunk_size)


# ============================================================================ classifiers
class ImageClassifier(nn.Module):
    """Interface: images ``[B, 3, H, W]`` -> ``(global logits [B, C], local logits [B, P, C])``.

    ``forward(images, return_local=False)`` returns the global logits only. What LoCoOp's loss, the
    SeTAR criterion and the region visualisation consume; implemented by CLIP with class prompts
    (:class:`CLIPClassifier`, LoCoOp's ``CustomCLIP``) and open to vision-only backbones.
    """

    def forward(self, images: Tensor, return_local: bool = True) -> Features:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement forward(images, return_local)")


class CLIPHead(nn.Module):
    """Normalised image and text features and logits of a CLIP model (not copied; a submodule).

    Args:
        clip_model: a :class:`clip.model.CLIP` (or anything with its ``encode_image``,
            ``encode_text``, ``encode_text_embeddings`` and ``logit_scale``).
        text_mode: how a prompt learner's prompts are encoded (see
            :class:`~locoop.trainers.text_encoder.TextEncoder`; "auto" = shared prefix when possible).
    """

    def __init__(self, clip_model: nn.Module, text_mode: str = "auto"):
        super().__init__()
        from locoop.trainers.text_encoder import TextEncoder  # here: locoop.trainers imports this module

        self.clip_model = clip_model
        self.text_encoder = TextEncoder(clip_model, text_mode)

    @property
    def dtype(self) -> torch.dtype:
        return self.clip_model.dtype

    @property
    def device(self) -> torch.device:
        return self.clip_model.logit_scale.device

    @property
    def logit_scale(self) -> Tensor:
        """``logit_scale.exp()``: the multiplier of the cosine similarities (CLIP's 100)."""
        return self.clip_model.logit_scale.exp()

    # ------------------------------------------------------------------ features
    def encode_image(self, images: Tensor, return_local: bool = True) -> Features:
        """Normalised float32 global ``[B, D]`` (and local ``[B, P, D]``) image features.

        Computed without a graph unless some image-tower parameter is trainable (LoRA adapters):
        a frozen tower needs no activations kept for the backward pass.
        """
        visual = self.clip_model.visual
        track = torch.is_grad_enabled() and any(p.requires_grad for p in visual.parameters())
        with torch.set_grad_enabled(track):
            out = self.clip_model.encode_image(images.to(self.dtype), return_local=return_local)
        if not return_local:
            return l2_normalize(out)
        glob, local = out
        return l2_normalize(glob), l2_normalize(local)

    def text_features(self, prompts: Any, device: Optional[Union[str, torch.device]] = None) -> Tensor:
        """Normalised float32 features ``[C, D]`` of the class prompts (differentiable).

        Args:
            prompts: :class:`ClassPrompts` (encoded chunk by chunk with CLIP's exact truncated
                encoders), or a prompt learner (encoded by the head's ``TextEncoder``).
            device: where to compute (default: the model's device).
        """
        if not isinstance(prompts, ClassPrompts):
            return l2_normalize(self.text_encoder(prompts))
        device = torch.device(device) if device is not None else self.device
        model = self.clip_model
        feats = []
        for sl in prompts.chunks():
            x, eot = prompts.chunk(sl, device)
            f = model.encode_text(x) if prompts.tokens is not None else model.encode_text_embeddings(x, eot)
            feats.append(l2_normalize(f))
        return torch.cat(feats)

    # ------------------------------------------------------------------ logits
    def logits(self, features: Tensor, text: Tensor, scale: Optional[Union[float, Tensor]] = None) -> Tensor:
        """``scale * cos``: logits of normalised features ``[..., D]`` against normalised text ``[C, D]``.

        ``scale`` defaults to :attr:`logit_scale`.
        """
        return class_logits(features, text, self.logit_scale if scale is None else scale)

    def forward(self, images: Tensor, text: Tensor, return_local: bool = True) -> Features:
        """Logits of ``images`` against normalised class text features ``text`` ``[C, D]``:
        ``(global [B, C], local [B, P, C])``, or global only."""
        feats = self.encode_image(images, return_local)
        if not return_local:
            return self.logits(feats, text)
        glob, local = feats
        return self.logits(glob, text), self.logits(local, text)

    def classifier(self, text: Tensor) -> "CLIPClassifier":
        """An :class:`ImageClassifier` with ``text`` (normalised ``[C, D]``) as class weights."""
        return CLIPClassifier(self, text)


class CLIPClassifier(ImageClassifier):
    """A CLIP model with fixed class text features as an :class:`ImageClassifier`."""

    def __init__(self, head: CLIPHead, text: Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("text", text.detach(), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.text.shape[0])

    def forward(self, images: Tensor, return_local: bool = True) -> Features:
        return self.head(images, self.text, return_local)


@torch.no_grad()
def zero_shot_text_features(clip_model: nn.Module, classnames: Sequence[str],
                            template: Union[str, Sequence[str]] = "a photo of a {}.",
                            device: Optional[Union[str, torch.device]] = None,
                            batch_size: int = DEFAULT_TEXT_CHUNK) -> Tensor:
    """Normalised float32 text features ``[C, D]`` of hand-written prompts.

    Args:
        clip_model: CLIP model.
        classnames: class names ('_' read as a space).
        template: a format string with one ``{}``, or several (their normalised features are
            averaged, then normalised again, as CLIP's prompt ensembling).
        device: where to compute (default: the model's device).
        batch_size: prompts per forward pass.
    """
    templates = [template] if isinstance(template, str) else list(template)
    if not templates:
        raise ValueError(f"template must contain '{{}}' for the class name, got {template!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    head = CLIPHead(clip_model)
    total = None
    for t in templates:
        prompts = zero_shot_prompts(classnames, t, int(clip_model.context_length), chunk_size=batch_size)
        f = head.text_features(prompts, device=device)
        total = f if total is None else total + f
    return l2_normalize(total) if len(templates) > 1 else total
