"""SeTAR's greedy low-rank search, in a fast exact mode and a naive reference mode.

The search (Li et al., NeurIPS 2024; X1AOX1A/SeTAR ``svd_ood/searchers.py``) visits weight
matrices in a searcher's order (:mod:`locoop.setar.searchers`). At each step it tries every
candidate ratio on the current model -- the previous steps' best ratios applied -- and keeps the
best one. Selection follows SeTAR exactly: the incumbent is the current model (ratio 0) with its
criterion, candidates are tried in ascending ratio order, and a candidate replaces the incumbent
only if it is *strictly* better; so ties go to the smallest ratio and a step whose candidates all
do worse keeps ratio 0. Ratio 0 is always a candidate (added if the list lacks it), so the first
step starts from the unpruned model's criterion instead of SeTAR's "+inf" placeholder.

Criteria (``criterion``):

* ``loss`` (default; also ``loss_id`` / ``loss_ood``) -- the LoCoOp loss on the ID validation
  images with the class prompts, lower is better. Logits are ``logit_scale.exp() * cos`` of the
  L2-normalised global and local image features and the class text features; the loss is computed
  per image batch and averaged with the batch sizes as weights, as SeTAR does (its per-batch means
  are repeated ``len(batch)`` times before the mean).
* ``auroc`` / ``aupr`` (higher is better), ``fpr95`` (lower is better) -- metrics of ``score``
  (e.g. GL-MCM) with the ID validation images as positives and OOD validation images as
  negatives (``locoop.ood.metrics.ood_metrics``, MCM's definitions). Needs OOD validation images.

Modes (both select the same settings and report the same criteria; tested):

* ``naive`` -- what the reference does: every candidate re-encodes every image and every prompt
  from scratch (optionally re-decoding the images, via ``SearchData.reload``), with the local
  features computed as SeTAR's model computes them (the value path in every block, see
  :func:`reference_encode_image`); ratio 0 is evaluated again at every step.
* ``fast`` (default), exact:

  - images are decoded and preprocessed once; the patch embedding ("stem") runs once;
  - per tower, the hidden states *entering* block ``l`` under the committed weights are cached
    (:class:`_PrefixCache`). A candidate at block ``l`` only reruns blocks ``l .. L-1``. A cached
    state stays valid until a non-zero ratio is committed *below* it; with the top-to-bottom
    orders every state is computed once from the unmodified prefix, and ``layer_exhaustive``
    recomputes only what a commit below invalidated. With a memory budget, only every
    ``stride``-th state is kept and the rest are recomputed from the nearest kept one;
  - ``W_p`` candidates reuse the cached pre-projection features and only redo the projection;
  - while one tower is searched the other tower's features are fixed and reused (image
    features during text steps, text features during visual steps);
  - ratio 0 equals the incumbent and is not rerun; ``layer_exhaustive`` reuses a round's
    results when the previous round committed nothing.

Both modes count transformer-block forward passes per sample (an image or a prompt going through
one block) in :attr:`SearchResult.counters`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from locoop.engine.fileio import atomic_write_text

from .lowrank import LowRankEditor, get_linear, n_removed, num_layers
from .searchers import Step, build_steps, get_searcher
from .settings import save_settings

__all__ = [
    "DEFAULT_RATIOS",
    "CRITERIA",
    "MODES",
    "TextInputs",
    "SearchData",
    "SearchResult",
    "check_ratios",
    "reference_encode_image",
    "run_search",
    "write_search_outputs",
]

DEFAULT_RATIOS: Tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40)
# criterion -> True if higher is better
CRITERIA: Dict[str, bool] = {"loss": False, "loss_id": False, "loss_ood": False,
                             "auroc": True, "aupr": True, "fpr95": False}
MODES: Tuple[str, ...] = ("fast", "naive")
_LOSS_CRITERIA = ("loss", "loss_id", "loss_ood")

Tensor = torch.Tensor


# ============================================================================ inputs / outputs
@dataclass
class TextInputs:
    """The class prompts, as tokens (zero-shot) or as prompt-learner embeddings.

    Exactly one of ``tokens`` or ``embeddings`` is given.

    Attributes:
        tokens: ``[C, 77]`` tokenized prompts (e.g. ``"a photo of a <class>."``).
        embeddings: ``[C, L, W]`` token embeddings *without* positional embedding, as a
            prompt learner builds them (learned context + class-name tokens).
        eot_idx: ``[C]`` EOT positions of ``embeddings``.
        chunk_size: prompts encoded per forward pass (same in both modes, so results match bit for bit).
    """

    tokens: Optional[Tensor] = None
    embeddings: Optional[Tensor] = None
    eot_idx: Optional[Tensor] = None
    chunk_size: int = 1000

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.embeddings is None):
            raise ValueError("TextInputs needs exactly one of tokens [C, 77] or embeddings [C, L, W] (+ eot_idx)")
        if self.embeddings is not None and (self.eot_idx is None or self.eot_idx.shape[0] != self.embeddings.shape[0]):
            raise ValueError("TextInputs.embeddings needs eot_idx with one EOT position per prompt")
        if self.chunk_size < 1:
            raise ValueError(f"TextInputs.chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def num_classes(self) -> int:
        return int((self.tokens if self.tokens is not None else self.embeddings).shape[0])

    def chunks(self) -> List[slice]:
        n = self.num_classes
        return [slice(i, min(n, i + self.chunk_size)) for i in range(0, n, self.chunk_size)]


@dataclass
class SearchData:
    """Validation data of one search.

    Attributes:
        id_batches: ``[(images [B, 3, H, W], labels [B]), ...]`` preprocessed ID validation images.
        text: the class prompts (:class:`TextInputs`).
        ood_batches: ``[images, ...]`` OOD validation images (metric criteria only).
        reload: optional ``() -> (id_batches, ood_batches)`` that decodes the images again;
            the naive mode calls it for every candidate, like the reference does. It must give
            the same batches as ``id_batches`` / ``ood_batches``.
    """

    id_batches: List[Tuple[Tensor, Tensor]]
    text: TextInputs
    ood_batches: List[Tensor] = field(default_factory=list)
    reload: Optional[Callable[[], Tuple[list, list]]] = None

    def __post_init__(self) -> None:
        if not self.id_batches:
            raise ValueError("SearchData needs at least one batch of ID validation images")
        for images, labels in self.id_batches:
            if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
                raise ValueError("SearchData.id_batches must hold (images [B, 3, H, W], labels [B]) pairs")

    @property
    def num_id(self) -> int:
        return sum(int(lbl.shape[0]) for _, lbl in self.id_batches)


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        settings: ``[[tower, weight_type, layer, ratio], ...]`` in visiting order, zeros included.
        log: one dict per candidate (see :func:`write_search_outputs` for the columns).
        baseline: criterion of the unpruned model.
        final: criterion of the model with ``settings`` applied.
        counters: block forward passes per sample (``visual_layer_passes``, ``text_layer_passes``)
            and ``candidates_evaluated`` / ``candidates_reused``.
        seconds: wall time of the search.
        mode, criterion, higher_is_better: how it was run.
    """

    settings: List[list]
    log: List[dict]
    baseline: float
    final: float
    counters: Dict[str, int]
    seconds: float
    mode: str
    criterion: str
    higher_is_better: bool


# ============================================================================ criterion
def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


class _Criterion:
    """Computes one candidate's criterion from per-batch image features and text features."""

    def __init__(self, name: str, lam: float, top_k: int, score: str, T: float, logit_scale: float,
                 id_labels: List[Tensor]) -> None:
        self.name = name
        self.higher_is_better = CRITERIA[name]
        self.lam = float(lam)
        self.top_k = int(top_k)
        self.score = score
        self.T = float(T)
        self.logit_scale = logit_scale
        self.id_labels = id_labels
        if name in _LOSS_CRITERIA:
            from locoop.trainers.loss import locoop_loss  # the one LoCoOp loss of the project
            self._loss = locoop_loss

    def better(self, a: float, b: float) -> bool:
        """Strictly better (SeTAR's ``is_better``)."""
        return a > b if self.higher_is_better else a < b

    @property
    def worst(self) -> float:
        return -math.inf if self.higher_is_better else math.inf

    @torch.no_grad()
    def __call__(self, id_feats: List[Tuple[Tensor, Tensor]], ood_feats: List[Tuple[Tensor, Tensor]],
                 text: Tensor) -> Dict[str, float]:
        if self.name in _LOSS_CRITERIA:
            return self._loss_parts(id_feats, text)
        return self._metric_parts(id_feats, ood_feats, text)

    def _loss_parts(self, id_feats, text) -> Dict[str, float]:
        total = loss_id = loss_ood = 0.0
        correct = n = 0
        for (g, loc), labels in zip(id_feats, self.id_labels):
            labels = labels.to(g.device)
            logits_g = self.logit_scale * g @ text.t()
            logits_l = self.logit_scale * loc @ text.t()
            t, i, o = self._loss(logits_g, logits_l, labels, self.lam, self.top_k)
            b = int(labels.shape[0])
            # SeTAR weights each batch's mean by the batch size.
            total += float(t) * b
            loss_id += float(i) * b
            loss_ood += float(o) * b
            correct += int((logits_g.argmax(dim=-1) == labels).sum())
            n += b
        parts = {"loss": total / n, "loss_id": loss_id / n, "loss_ood": loss_ood / n, "acc": 100.0 * correct / n}
        for k, v in parts.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"search criterion part {k!r} is {v}; check the model precision (fp16 "
                                         "overflow) and the validation images")
        return {"criterion": parts[self.name], **parts}

    def _metric_parts(self, id_feats, ood_feats, text) -> Dict[str, float]:
        from locoop.ood.metrics import ood_metrics
        from locoop.ood.scores import compute_scores

        def scores(feats):
            # one score requested: take the only entry (its key is the canonical name)
            out = [next(iter(compute_scores(g @ text.t(), loc @ text.t(), names=[self.score], T=self.T).values()))
                   for g, loc in feats]
            return np.concatenate(out)

        id_s, ood_s = scores(id_feats), scores(ood_feats)
        m = ood_metrics(id_s, ood_s)
        parts = {"auroc": m["auroc"], "aupr": m["aupr"], "fpr95": m["fpr95"]}
        return {"criterion": parts[self.name], **parts}


# ============================================================================ towers
class _Counter(dict):
    def add(self, key: str, n: int) -> None:
        self[key] = self.get(key, 0) + int(n)


class _Visual:
    """Block-level access to the ViT image tower (mirrors ``VisionTransformer.forward_from``)."""

    name = "visual"

    def __init__(self, model: nn.Module, counter: _Counter) -> None:
        self.model = model
        self.v = model.visual
        self.n_layers = len(self.v.transformer.resblocks)
        self.counter = counter

    def stem(self, images: Tensor) -> Tensor:
        return self.v.stem(images.to(self.model.dtype))

    def run_blocks(self, h: Tensor, start: int, end: int, chunk: int) -> Tensor:
        self.counter.add("visual_layer_passes", (end - start) * h.shape[0])
        return self.v.transformer(h, start=start, end=end)

    def finish(self, h: Tensor, start: int, chunk: int) -> Tuple[Tensor, Tensor]:
        self.counter.add("visual_layer_passes", (self.n_layers - start) * h.shape[0])
        g, loc = self.v.forward_from(h, start, return_local=True)
        return _normalize(g.float()), _normalize(loc.float())

    def finish_pre(self, h: Tensor, start: int, chunk: int) -> Tuple[Tensor, Tensor]:
        """Features after ``ln_post``, before ``proj`` (same operations as ``forward_from``)."""
        self.counter.add("visual_layer_passes", (self.n_layers - start) * h.shape[0])
        last = self.n_layers - 1
        x = self.v.transformer(h, start=start, end=last)
        cls, local = self.v.transformer.resblocks[last].forward_cls_and_local(x, True)
        return self.v.ln_post(cls[:, 0]), self.v.ln_post(local)

    def project(self, pre: Tuple[Tensor, Tensor], chunk: int) -> Tuple[Tensor, Tensor]:
        return _normalize(self.v.proj(pre[0]).float()), _normalize(self.v.proj(pre[1]).float())


class _Text:
    """Block-level access to the text tower (mirrors ``CLIP.text_forward_from``)."""

    name = "text"

    def __init__(self, model: nn.Module, text: TextInputs, device: torch.device, counter: _Counter) -> None:
        self.model = model
        self.text = text
        self.device = device
        self.n_layers = len(model.transformer.resblocks)
        self.counter = counter
        self._eot: List[Tensor] = []

    def inputs(self) -> List[Tensor]:
        """Hidden states entering block 0, per prompt chunk (as ``encode_text*`` build them)."""
        out, self._eot = [], []
        m = self.model
        for sl in self.text.chunks():
            if self.text.tokens is not None:
                h, eot = m.text_embed(self.text.tokens[sl].to(self.device))
            else:
                x, eot = self.text.embeddings[sl].to(self.device), self.text.eot_idx[sl].to(self.device)
                length = int(eot.max()) + 1
                h = x[:, :length].to(m.dtype) + m.positional_embedding[:length].to(m.dtype)
            out.append(h)
            self._eot.append(eot)
        return out

    def run_blocks(self, h: Tensor, start: int, end: int, chunk: int) -> Tensor:
        self.counter.add("text_layer_passes", (end - start) * h.shape[0])
        return self.model.transformer(h, is_causal=True, start=start, end=end)

    def finish(self, h: Tensor, start: int, chunk: int) -> Tensor:
        self.counter.add("text_layer_passes", (self.n_layers - start) * h.shape[0])
        return _normalize(self.model.text_forward_from(h, start, self._eot[chunk]).float())

    def finish_pre(self, h: Tensor, start: int, chunk: int) -> Tensor:
        self.counter.add("text_layer_passes", (self.n_layers - start) * h.shape[0])
        h = self.model.transformer(h, is_causal=True, start=start)
        eot = h[torch.arange(h.shape[0], device=h.device), self._eot[chunk]]
        return self.model.ln_final(eot)

    def project(self, pre: Tensor, chunk: int) -> Tensor:
        return _normalize(self.model.text_projection(pre).float())

    def naive(self) -> Tensor:
        """All class features from scratch, through the model's public encoders."""
        m, feats = self.model, []
        for sl in self.text.chunks():
            if self.text.tokens is not None:
                f = m.encode_text(self.text.tokens[sl].to(self.device))
            else:
                f = m.encode_text_embeddings(self.text.embeddings[sl].to(self.device),
                                             self.text.eot_idx[sl].to(self.device))
            self.counter.add("text_layer_passes", self.n_layers * f.shape[0])
            feats.append(_normalize(f.float()))
        return torch.cat(feats)


class _PrefixCache:
    """Hidden states entering each block of a tower, per chunk, under the committed weights.

    Entry 0 (the stem output / text embeddings) never changes. Entry ``l`` is valid until a
    non-zero ratio is committed in a block below ``l``. Only entries at multiples of ``stride``
    (and the one most recently asked for) are kept; others are recomputed from the nearest kept
    entry below, with the committed weights -- exact, since nothing below it changed.
    """

    def __init__(self, tower, inputs: List[Tensor], stride: int = 1) -> None:
        self.tower = tower
        self.stride = max(1, int(stride))
        self.entries: Dict[int, List[Tensor]] = {0: inputs}
        self.working: Optional[int] = None

    def get(self, layer: int) -> List[Tensor]:
        if layer in self.entries:
            return self.entries[layer]
        base = max(k for k in self.entries if k < layer)
        keep = {k for k in range(base + 1, layer) if k % self.stride == 0}
        stored: Dict[int, List[Tensor]] = {k: [] for k in keep}
        out = []
        for i, h in enumerate(self.entries[base]):
            start = base
            for k in sorted(keep):
                h = self.tower.run_blocks(h, start, k, i)
                stored[k].append(h)
                start = k
            out.append(self.tower.run_blocks(h, start, layer, i))
        self.entries.update(stored)
        if self.working is not None and self.working % self.stride and self.working in self.entries:
            del self.entries[self.working]
        self.entries[layer] = out
        self.working = layer
        return out

    def invalidate_above(self, layer: int) -> None:
        """A block ``layer`` changed: states entering blocks above it are stale."""
        for k in [k for k in self.entries if k > layer]:
            del self.entries[k]
        if self.working is not None and self.working > layer:
            self.working = None


# ============================================================================ evaluators
@torch.no_grad()
def reference_encode_image(model: nn.Module, images: Tensor) -> Tuple[Tensor, Tensor]:
    """Global and local image features computed the way SeTAR's reference model does.

    SeTAR's CLIP (``enable_local_feat``) runs every ViT block in full on all tokens *and* the
    value path (``v_proj``, ``out_proj``, MLP) of every block, keeping only the last block's
    value path as local features. The result equals :meth:`clip.model.CLIP.encode_image` up to
    float rounding; the naive mode uses it so that it costs what the reference costs.
    """
    v = model.visual
    if not hasattr(v, "transformer"):
        return model.encode_image(images, return_local=True)
    x = v.stem(images.to(model.dtype))
    local = x
    for block in v.transformer.resblocks:
        local = block.value_path(x)
        x = block(x)
    return v.head(x[:, 0]), v.head(local[:, 1:])


class _NaiveEvaluator:
    """Re-encodes everything for every candidate, like the reference implementation."""

    reuses_incumbent = False

    def __init__(self, model, data: SearchData, editor: LowRankEditor, criterion: _Criterion,
                 device: torch.device, counter: _Counter) -> None:
        self.model, self.data, self.editor, self.criterion = model, data, editor, criterion
        self.device, self.counter = device, counter
        self.text = _Text(model, data.text, device, counter)
        self.n_visual = len(model.visual.transformer.resblocks) if hasattr(model.visual, "transformer") else 0

    def _image_feats(self, batches) -> List[Tuple[Tensor, Tensor]]:
        out = []
        for images in batches:
            g, loc = reference_encode_image(self.model, images.to(self.device))
            self.counter.add("visual_layer_passes", self.n_visual * images.shape[0])
            # the reference's extra value path in every block (see reference_encode_image)
            self.counter.add("visual_value_paths", self.n_visual * images.shape[0])
            out.append((_normalize(g.float()), _normalize(loc.float())))
        return out

    def evaluate(self, step: Step, ratio: float) -> Dict[str, float]:
        self.editor.apply(step.tower, step.weight_type, step.layer, ratio)
        try:
            if self.data.reload is not None:
                id_batches, ood_batches = self.data.reload()
            else:
                id_batches, ood_batches = self.data.id_batches, self.data.ood_batches
            id_feats = self._image_feats([im for im, _ in id_batches])
            ood_feats = self._image_feats(ood_batches) if self.criterion.name not in _LOSS_CRITERIA else []
            text = self.text.naive()
            return self.criterion(id_feats, ood_feats, text)
        finally:
            self.editor.revert(step.tower, step.weight_type, step.layer)

    def commit(self, step: Step, ratio: float) -> None:
        self.editor.apply(step.tower, step.weight_type, step.layer, ratio)


class _FastEvaluator:
    """Cached prefixes, fixed other-tower features, projection-only ``W_p`` candidates."""

    reuses_incumbent = True

    def __init__(self, model, data: SearchData, editor: LowRankEditor, criterion: _Criterion,
                 device: torch.device, counter: _Counter, cache_bytes: float) -> None:
        self.model, self.data, self.editor, self.criterion = model, data, editor, criterion
        self.device, self.counter = device, counter
        self.cache_bytes = cache_bytes
        use_ood = criterion.name not in _LOSS_CRITERIA
        # Images: decoded once (by the caller), moved to the device once per use.
        self.image_batches = [im for im, _ in data.id_batches] + (list(data.ood_batches) if use_ood else [])
        self.n_id_chunks = len(data.id_batches)
        self.is_vit = hasattr(model.visual, "transformer")
        self.visual = _Visual(model, counter) if self.is_vit else None
        self.text = _Text(model, data.text, device, counter)
        self._vis_prefix: Optional[_PrefixCache] = None
        self._txt_prefix: Optional[_PrefixCache] = None
        self._vis_pre: Optional[list] = None
        self._txt_pre: Optional[list] = None
        self._image_feats: Optional[List[Tuple[Tensor, Tensor]]] = None
        self._text_feats: Optional[Tensor] = None
        self._last_feats = None  # features of the most recently evaluated candidate

    # ------------------------------------------------------------------ caches
    def _stride(self, entries: List[Tensor], n_layers: int) -> int:
        per_layer = sum(t.numel() * t.element_size() for t in entries)
        if per_layer == 0 or self.cache_bytes <= 0:
            return n_layers
        return max(1, math.ceil(n_layers * per_layer / self.cache_bytes))

    def vis_prefix(self) -> _PrefixCache:
        if self._vis_prefix is None:
            inputs = [self.visual.stem(im.to(self.device)) for im in self.image_batches]
            self._vis_prefix = _PrefixCache(self.visual, inputs, self._stride(inputs, self.visual.n_layers))
            self.image_batches = None  # the stem never changes: the pixels are not needed any more
        return self._vis_prefix

    def txt_prefix(self) -> _PrefixCache:
        if self._txt_prefix is None:
            inputs = self.text.inputs()
            self._txt_prefix = _PrefixCache(self.text, inputs, self._stride(inputs, self.text.n_layers))
        return self._txt_prefix

    def image_feats(self) -> List[Tuple[Tensor, Tensor]]:
        """Normalised image features of the committed model (fixed during text steps)."""
        if self._image_feats is None:
            if self.is_vit:
                if self._vis_pre is not None:
                    self._image_feats = [self.visual.project(p, i) for i, p in enumerate(self._vis_pre)]
                else:
                    top = self.visual.n_layers - 1
                    hs = self.vis_prefix().get(top)
                    self._image_feats = [self.visual.finish(h, top, i) for i, h in enumerate(hs)]
            else:  # ResNet image tower: never searched, encoded once
                feats = []
                for im in self.image_batches:
                    g, loc = self.model.encode_image(im.to(self.device), return_local=True)
                    feats.append((_normalize(g.float()), _normalize(loc.float())))
                self._image_feats = feats
        return self._image_feats

    def text_feats(self) -> Tensor:
        """Normalised class features of the committed model (fixed during visual steps)."""
        if self._text_feats is None:
            if self._txt_pre is not None:
                self._text_feats = torch.cat([self.text.project(p, i) for i, p in enumerate(self._txt_pre)])
            else:
                top = self.text.n_layers - 1
                hs = self.txt_prefix().get(top)
                self._text_feats = torch.cat([self.text.finish(h, top, i) for i, h in enumerate(hs)])
        return self._text_feats

    def _pre(self, tower) -> list:
        prefix = self.vis_prefix() if tower is self.visual else self.txt_prefix()
        top = tower.n_layers - 1
        return [tower.finish_pre(h, top, i) for i, h in enumerate(prefix.get(top))]

    # ------------------------------------------------------------------ search API
    def evaluate(self, step: Step, ratio: float) -> Dict[str, float]:
        tower = self.visual if step.tower == "visual" else self.text
        other = self.text_feats() if step.tower == "visual" else self.image_feats()
        if step.weight_type == "W_p":
            if step.tower == "visual":
                self._vis_pre = self._vis_pre if self._vis_pre is not None else self._pre(tower)
                pre = self._vis_pre
            else:
                self._txt_pre = self._txt_pre if self._txt_pre is not None else self._pre(tower)
                pre = self._txt_pre
            hs = None
        else:
            hs = (self.vis_prefix() if step.tower == "visual" else self.txt_prefix()).get(step.layer)
        # Everything above was computed with the committed weights; only now the candidate goes in.
        self.editor.apply(step.tower, step.weight_type, step.layer, ratio)
        try:
            if hs is None:
                feats = [tower.project(p, i) for i, p in enumerate(pre)]
            else:
                feats = [tower.finish(h, step.layer, i) for i, h in enumerate(hs)]
        finally:
            self.editor.revert(step.tower, step.weight_type, step.layer)
        if step.tower == "visual":
            result = self.criterion(feats[:self.n_id_chunks], feats[self.n_id_chunks:], other)
        else:
            text = torch.cat(feats)
            feats = text
            result = self.criterion(other[:self.n_id_chunks], other[self.n_id_chunks:], text)
        self._last_feats = (step, ratio, feats)
        return result

    def keep_features(self) -> object:
        """A handle to the last evaluated candidate's features (kept for the best candidate)."""
        return self._last_feats

    def baseline(self) -> Dict[str, float]:
        """Criterion of the committed model."""
        text = self.text_feats()
        feats = self.image_feats()
        return self.criterion(feats[:self.n_id_chunks], feats[self.n_id_chunks:], text)

    def commit(self, step: Step, ratio: float, kept: object = None) -> None:
        self.editor.apply(step.tower, step.weight_type, step.layer, ratio)
        if ratio == 0:
            return
        feats = None
        if kept is not None and kept[0] == step and kept[1] == ratio:
            feats = kept[2]
        if step.tower == "visual":
            self._image_feats = feats
            if step.weight_type != "W_p":
                if self._vis_prefix is not None:
                    self._vis_prefix.invalidate_above(step.layer)
                self._vis_pre = None
        else:
            self._text_feats = feats
            if step.weight_type != "W_p":
                if self._txt_prefix is not None:
                    self._txt_prefix.invalidate_above(step.layer)
                self._txt_pre = None


# ============================================================================ search
def check_ratios(ratios: Sequence[float]) -> List[float]:
    """Validate candidate ratios; returns them sorted ascending, unique, with 0 included.

    Raises:
        ValueError: a ratio outside [0, 1) or an empty list.
    """
    if isinstance(ratios, (int, float)):
        ratios = [ratios]
    ratios = list(ratios)
    if not ratios:
        raise ValueError("no candidate ratio given; e.g. SETAR.RATIOS [0.0, 0.05, 0.1, ..., 0.4]")
    out = set()
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
            raise ValueError(f"candidate ratio {r!r} is not in [0, 1) (the fraction of singular components "
                             f"removed); got SETAR.RATIOS {ratios}")
        out.add(float(r))
    out.add(0.0)
    return sorted(out)


def _layer_num(model: nn.Module) -> Dict[str, int]:
    out = {"text": num_layers(model, "text")}
    if hasattr(model.visual, "transformer"):
        out["visual"] = num_layers(model, "visual")
    return out


def _describe(step: Step) -> str:
    return f"{step.tower} {step.weight_type}" + ("" if step.layer is None else f" {step.layer}")


def run_search(
    model: nn.Module,
    data: SearchData,
    searcher: str = "visual_text",
    weight_types: Sequence[str] = ("W_up",),
    ratios: Sequence[float] = DEFAULT_RATIOS,
    prune_type: str = "small",
    seed: int = 0,
    freeze_proj: bool = True,
    criterion: str = "loss",
    lam: float = 0.10,
    top_k: int = 300,
    score: str = "GL-MCM",
    T: float = 1.0,
    mode: str = "fast",
    device: Optional[Union[str, torch.device]] = None,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    verbose: bool = True,
    cache_gib: float = 8.0,
    editor: Optional[LowRankEditor] = None,
) -> SearchResult:
    """Greedy SeTAR search; leaves ``model`` with the best settings applied.

    Args:
        model: a :class:`clip.model.CLIP` in eval mode (edited in place).
        data: validation images and class prompts (:class:`SearchData`).
        searcher: visiting order (:func:`locoop.setar.searchers.list_searchers`).
        weight_types: per-layer matrices searched (SeTAR: ``["W_up"]``).
        ratios: candidate ratios (0 is always added; sorted ascending).
        prune_type: ``small`` (SeTAR), ``large`` or ``random``; ``seed`` seeds ``random``.
        freeze_proj: False also searches the towers' projections ``W_p``.
        criterion: ``loss`` / ``loss_id`` / ``loss_ood`` (ID data only) or ``auroc`` / ``aupr`` /
            ``fpr95`` (needs ``data.ood_batches``).
        lam, top_k: the LoCoOp loss's lambda and top-K (SeTAR ImageNet 0.10 / 300, VOC 0.05 / 4).
        score, T: OOD score and its temperature for metric criteria.
        mode: ``fast`` (cached, exact) or ``naive`` (recompute everything per candidate).
        device: where to compute (default: the model's device).
        output_dir: if given, the log and settings are written there after every step.
        verbose: tqdm bar per step.
        cache_gib: memory budget of the fast mode's cached hidden states (GiB); above it, only
            every k-th block's input is kept.
        editor: an existing :class:`LowRankEditor` of ``model`` (default: a new one).

    Returns:
        :class:`SearchResult`.

    Raises:
        ValueError: bad searcher, weight type, prune type, ratio, criterion, mode or top-K, or a
            ratio that would remove every component of a searched matrix -- all checked before
            any forward pass.
    """
    # ---------------------------------------------------------------- checks before any work
    if mode not in MODES:
        raise ValueError(f"unknown search mode {mode!r}; valid modes: {', '.join(MODES)}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown search criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)} "
                         "(loss* on ID validation data; auroc/aupr/fpr95 need OOD validation data)")
    if criterion not in _LOSS_CRITERIA and not data.ood_batches:
        raise ValueError(f"criterion {criterion!r} needs OOD validation images (SETAR.OOD_VAL_DATASETS); "
                         "use criterion 'loss' to search on ID data only")
    spec = get_searcher(searcher)
    ratios = check_ratios(ratios)
    editor = editor if editor is not None else LowRankEditor(model, prune_type=prune_type, seed=seed)
    if editor.model is not model:
        raise ValueError("the editor belongs to another model")
    layer_num = _layer_num(model)
    if "visual" not in layer_num and searcher != "text_only":
        num_layers(model, "visual")  # raises the explanation for a ResNet image tower
    steps = build_steps(searcher, layer_num, weight_types, freeze_proj)
    for s in steps:
        lin = get_linear(model, *s)
        n_removed(ratios[-1], tuple(lin.weight.shape), _describe(s))
    n_classes = data.text.num_classes
    if criterion in _LOSS_CRITERIA and not 1 <= int(top_k) <= n_classes:
        raise ValueError(f"top-K {top_k} of the LoCoOp criterion must be in 1..{n_classes} (the number of classes); "
                         "set SETAR.TOPK (SeTAR: 300 for ImageNet-1K, 4 for VOC)")
    for _, labels in data.id_batches:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise ValueError(f"ID validation labels must be in 0..{n_classes - 1} (one per class prompt), "
                             f"got labels in {int(labels.min())}..{int(labels.max())}")
    device = torch.device(device) if device is not None else next(model.parameters()).device

    counter = _Counter(visual_layer_passes=0, text_layer_passes=0, candidates_evaluated=0, candidates_reused=0)
    crit = _Criterion(criterion, lam, top_k, score, T, float(model.logit_scale.detach().exp()),
                      [lbl for _, lbl in data.id_batches])
    if mode == "fast":
        ev = _FastEvaluator(model, data, editor, crit, device, counter, cache_gib * 2 ** 30)
    else:
        ev = _NaiveEvaluator(model, data, editor, crit, device, counter)

    t0 = time.perf_counter()
    log: List[dict] = []
    settings: List[list] = []
    incumbent: Optional[Dict[str, float]] = None
    baseline: Optional[float] = None
    pool = list(steps)
    round_cache: Dict[Tuple[Step, float], Dict[str, float]] = {}  # layer_exhaustive, fast: unchanged model
    step_idx = 0
    n_rounds = len(steps)

    def record(step_i, s, r, res, reused) -> dict:
        row = {"step": step_i, "tower": s.tower, "weight_type": s.weight_type, "layer": s.layer, "ratio": r,
               "n_removed": editor.n_removed(s.tower, s.weight_type, s.layer, r), **res,
               "chosen": False, "reused": reused}
        log.append(row)
        return row

    with torch.no_grad():
        while pool:
            group = pool if spec.exhaustive else [pool[0]]
            candidates = [(s, r) for s in group for r in ratios]
            best_val = incumbent["criterion"] if incumbent is not None else crit.worst
            best_step, best_ratio, best_row, kept = group[0], 0.0, None, None
            bar = tqdm(total=len(candidates), disable=not verbose, leave=False,
                       desc=f"SeTAR [{step_idx + 1}/{n_rounds}] " + (_describe(group[0]) if len(group) == 1
                                                                   else f"{len(group)} matrices"))
            for s, r in candidates:
                if r == 0 and incumbent is not None and ev.reuses_incumbent:
                    res, reused = dict(incumbent), True
                elif (s, r) in round_cache:
                    res, reused = round_cache[(s, r)], True
                elif r == 0 and mode == "fast":
                    res, reused = ev.baseline(), False
                else:
                    res, reused = ev.evaluate(s, r), False
                counter.add("candidates_reused" if reused else "candidates_evaluated", 1)
                if mode == "fast" and spec.exhaustive and r > 0:
                    round_cache[(s, r)] = res
                row = record(step_idx, s, r, res, reused)
                if baseline is None and r == 0:
                    baseline = res["criterion"]
                if crit.better(res["criterion"], best_val):
                    best_val, best_step, best_ratio, best_row = res["criterion"], s, r, row
                    kept = ev.keep_features() if (mode == "fast" and not reused and r > 0) else None
                bar.update(1)
                bar.set_postfix_str(f"r={r:.2f} {criterion}={res['criterion']:.4f} best={best_val:.4f}")
            bar.close()
            if best_row is None:  # nothing beat the incumbent: ratio 0 for the first matrix of the group
                best_row = next(row for row in log[::-1] if row["step"] == step_idx and row["ratio"] == 0
                                and (row["tower"], row["weight_type"], row["layer"]) == tuple(best_step))
            best_row["chosen"] = True
            if mode == "fast":
                # kept is None when the best result was reused: its features are recomputed lazily.
                ev.commit(best_step, best_ratio, kept)
                if best_ratio > 0:
                    round_cache.clear()
                else:
                    for r in ratios:
                        round_cache.pop((best_step, r), None)
            else:
                ev.commit(best_step, best_ratio)
            incumbent = {k: v for k, v in best_row.items()
                         if k not in ("step", "tower", "weight_type", "layer", "ratio", "n_removed", "chosen",
                                      "reused")}
            settings.append([best_step.tower, best_step.weight_type, best_step.layer, best_ratio])
            pool.remove(best_step)
            step_idx += 1
            if output_dir is not None:
                write_search_outputs(output_dir, log, settings)
            if verbose:
                tqdm.write(f"SeTAR step {step_idx}/{n_rounds}: {_describe(best_step)} -> ratio {best_ratio:g} "
                           f"({criterion} {best_val:.6g})")

    seconds = time.perf_counter() - t0
    result = SearchResult(settings=settings, log=log, baseline=float(baseline), final=float(incumbent["criterion"]),
                          counters=dict(counter), seconds=seconds, mode=mode, criterion=criterion,
                          higher_is_better=crit.higher_is_better)
    if output_dir is not None:
        write_search_outputs(output_dir, log, settings, result)
    return result


# ============================================================================ outputs
LOG_COLUMNS = ("step", "tower", "weight_type", "layer", "ratio", "n_removed", "criterion", "loss", "loss_id",
               "loss_ood", "acc", "auroc", "aupr", "fpr95", "chosen", "reused")


def write_search_outputs(output_dir: Union[str, os.PathLike], log: Sequence[dict], settings: Sequence[Sequence],
                         result: Optional[SearchResult] = None) -> Dict[str, Path]:
    """Write ``search_log.csv``, ``search_log.json``, ``best_settings.json`` (and ``search_summary.json``).

    Log columns: step, tower, weight_type, layer (empty for W_p), ratio, n_removed (singular
    components removed), criterion (the selected one's value), the parts (loss, loss_id, loss_ood,
    acc for loss criteria; auroc, aupr, fpr95 for metric criteria; empty otherwise), chosen (the
    step's selected candidate), reused (value taken from an identical earlier evaluation, not
    recomputed -- fast mode).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "search_log.csv", "json": out / "search_log.json", "settings": out / "best_settings.json"}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in log:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_COLUMNS})
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["json"], json.dumps(list(log), indent=1))
    save_settings(paths["settings"], settings)
    if result is not None:
        paths["summary"] = out / "search_summary.json"
        summary = {"mode": result.mode, "criterion": result.criterion, "higher_is_better": result.higher_is_better,
                   "baseline": result.baseline, "final": result.final, "seconds": result.seconds,
                   "counters": result.counters, "settings": [list(s) for s in result.settings],
                   "num_candidates": len(result.log)}
        atomic_write_text(paths["summary"], json.dumps(summary, indent=2))
    return paths
