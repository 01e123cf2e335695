"""SeTAR's fast, exact search mode: cached block inputs, fixed other-tower features.

What it saves over recomputing everything (:mod:`locoop.setar.naive_evaluator`), all exact:

* images are decoded and preprocessed once (by the caller); the patch embedding ("stem") runs once;
* per tower, the hidden states *entering* block ``l`` under the committed weights are cached
  (:class:`PrefixCache`). A candidate at block ``l`` only reruns blocks ``l .. L-1``. A cached
  state stays valid until a non-zero ratio is committed *below* it; with the top-to-bottom orders
  every state is computed once from the unmodified prefix, and ``layer_exhaustive`` recomputes
  only what a commit below invalidated. With a memory budget, only every ``stride``-th state is
  kept and the rest are recomputed from the nearest kept one;
* ``W_p`` candidates reuse the cached pre-projection features and only redo the projection;
* while one tower is searched the other tower's features are fixed and reused (image features
  during text steps, text features during visual steps);
* ratio 0 equals the committed model and is not rerun; a candidate evaluated since the last
  non-zero commit (``layer_exhaustive`` after a round that committed nothing) is reused;
* the features of the best candidate of a step are kept, so committing it costs nothing.

Block-level access goes through :class:`clip.model.CLIP`'s ``visual_*`` / ``text_*`` methods,
the same operations ``encode_image`` / ``encode_text`` perform; for a Swin-V2 classifier (one
tower, no text side) through :class:`~locoop.models.swinv2.SwinV2Classifier`'s ``stem`` /
``run_blocks`` / ``forward_from``, its raw logits the criterion's input.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from locoop.models.head import ClassPrompts, l2_normalize

from .evaluator import Counter, Evaluator, Parts, register_evaluator
from .lowrank import is_block_model
from .searchers import Step

Tensor = torch.Tensor

__all__ = ["FastEvaluator", "PrefixCache"]


class _VisualTower:
    """The ViT image tower block by block, counting block passes."""

    def __init__(self, model, counter: Counter) -> None:
        self.model, self.counter = model, counter
        self.n_layers = model.num_visual_blocks

    @staticmethod
    def index(layer: int) -> int:
        """Forward-order block index of a step's layer (the prefix-cache key)."""
        return layer

    def stem(self, images: Tensor) -> Tensor:
        return self.model.visual_stem(images)

    def run_blocks(self, h: Tensor, start: int, end: int, chunk: int) -> Tensor:
        self.counter.add("visual_layer_passes", (end - start) * h.shape[0])
        return self.model.visual_blocks(h, start, end)

    def finish(self, h: Tensor, start: int, chunk: int) -> Tuple[Tensor, Tensor]:
        self.counter.add("visual_layer_passes", (self.n_layers - start) * h.shape[0])
        g, loc = self.model.visual_finish(h, start)
        return l2_normalize(g), l2_normalize(loc)

    def finish_pre(self, h: Tensor, start: int, chunk: int) -> Tuple[Tensor, Tensor]:
        """Features after ``ln_post``, before the projection."""
        self.counter.add("visual_layer_passes", (self.n_layers - start) * h.shape[0])
        return self.model.visual_finish(h, start, project=False)

    def project(self, pre: Tuple[Tensor, Tensor], chunk: int) -> Tuple[Tensor, Tensor]:
        return l2_normalize(self.model.visual_project(pre[0])), l2_normalize(self.model.visual_project(pre[1]))


class _ClassifierTower:
    """A block-addressed classifier (Swin-V2) block by block: states entering blocks in, raw logits out.

    Blocks are indexed in forward order over the stages (a step's ``(stage, block)`` through
    :meth:`index`); a stage's patch merging belongs to the step out of its last block
    (:meth:`locoop.models.swinv2.SwinV2Classifier.run_blocks`).
    """

    def __init__(self, model, counter: Counter) -> None:
        self.model, self.counter = model, counter
        self.n_layers = model.num_blocks

    def index(self, layer) -> int:
        return self.model.block_index(layer)

    def stem(self, images: Tensor) -> Tensor:
        return self.model.stem(images)

    def run_blocks(self, h: Tensor, start: int, end: int, chunk: int) -> Tensor:
        self.counter.add("visual_layer_passes", (end - start) * h.shape[0])
        return self.model.run_blocks(h, start, end)

    def finish(self, h: Tensor, start: int, chunk: int) -> Tuple[Tensor, Tensor]:
        self.counter.add("visual_layer_passes", (self.n_layers - start) * h.shape[0])
        g, loc = self.model.forward_from(h, start, return_local=True)
        return g.float(), loc.float()


class _TextTower:
    """The text tower block by block over the prompt chunks, counting block passes."""

    def __init__(self, model, prompts: ClassPrompts, device: torch.device, counter: Counter) -> None:
        self.model, self.prompts, self.device, self.counter = model, prompts, device, counter
        self.n_layers = model.num_text_blocks
        self._eot: List[Tensor] = []

    @staticmethod
    def index(layer: int) -> int:
        return layer

    def inputs(self) -> List[Tensor]:
        """Hidden states entering block 0, per prompt chunk (as ``encode_text*`` build them)."""
        out, self._eot = [], []
        for sl in self.prompts.chunks():
            x, eot = self.prompts.chunk(sl, self.device)
            if self.prompts.tokens is not None:
                x = self.model.token_embedding(x)
            out.append(self.model.text_stem(x, eot))
            self._eot.append(eot)
        return out

    def run_blocks(self, h: Tensor, start: int, end: int, chunk: int) -> Tensor:
        self.counter.add("text_layer_passes", (end - start) * h.shape[0])
        return self.model.text_blocks(h, start, end)

    def finish(self, h: Tensor, start: int, chunk: int) -> Tensor:
        self.counter.add("text_layer_passes", (self.n_layers - start) * h.shape[0])
        return l2_normalize(self.model.text_finish(h, start, self._eot[chunk]))

    def finish_pre(self, h: Tensor, start: int, chunk: int) -> Tensor:
        self.counter.add("text_layer_passes", (self.n_layers - start) * h.shape[0])
        return self.model.text_finish(h, start, self._eot[chunk], project=False)

    def project(self, pre: Tensor, chunk: int) -> Tensor:
        return l2_normalize(self.model.text_project(pre))


class PrefixCache:
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


@register_evaluator("fast")
class FastEvaluator(Evaluator):
    """Cached prefixes, fixed other-tower features, projection-only ``W_p`` candidates, reuse."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model, data = self.model, self.data
        # Images: decoded once (by the caller), moved to the device once per use.
        self.image_batches = [im for im, _ in data.id_batches] + (list(data.ood_batches) if self.criterion.needs_ood
                                                                   else [])
        self.n_id_chunks = len(data.id_batches)
        if is_block_model(model):  # a Swin-V2 classifier: one tower, no text side (its logits are the output)
            self.visual, self.text = _ClassifierTower(model, self.counter), None
        else:
            self.visual = _VisualTower(model, self.counter) if model.num_visual_blocks else None
            self.text = _TextTower(model, data.text, self.device, self.counter)
        self._vis_prefix: Optional[PrefixCache] = None
        self._txt_prefix: Optional[PrefixCache] = None
        self._vis_pre: Optional[list] = None
        self._txt_pre: Optional[list] = None
        self._image_feats: Optional[List[Tuple[Tensor, Tensor]]] = None
        self._text_feats: Optional[Tensor] = None
        # Criterion parts valid for the committed model: the model itself, and candidates
        # evaluated since the last non-zero commit.
        self._incumbent: Optional[Parts] = None
        self._results: Dict[Tuple[Step, float], Parts] = {}
        # (step, ratio, criterion, features) of the best candidate computed since the last commit.
        self._best: Optional[tuple] = None

    # ------------------------------------------------------------------ caches
    def _stride(self, entries: List[Tensor], n_layers: int) -> int:
        per_layer = sum(t.numel() * t.element_size() for t in entries)
        if per_layer == 0 or self.cache_bytes <= 0:
            return n_layers
        return max(1, math.ceil(n_layers * per_layer / self.cache_bytes))

    def vis_prefix(self) -> PrefixCache:
        if self._vis_prefix is None:
            inputs = [self.visual.stem(im.to(self.device)) for im in self.image_batches]
            self._vis_prefix = PrefixCache(self.visual, inputs, self._stride(inputs, self.visual.n_layers))
            self.image_batches = None  # the stem never changes: the pixels are not needed any more
        return self._vis_prefix

    def txt_prefix(self) -> PrefixCache:
        if self._txt_prefix is None:
            inputs = self.text.inputs()
            self._txt_prefix = PrefixCache(self.text, inputs, self._stride(inputs, self.text.n_layers))
        return self._txt_prefix

    def image_feats(self) -> List[Tuple[Tensor, Tensor]]:
        """Normalised image features of the committed model (fixed during text steps)."""
        if self._image_feats is None:
            if self.visual is not None:
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
                    feats.append((l2_normalize(g), l2_normalize(loc)))
                self._image_feats = feats
        return self._image_feats

    def text_feats(self) -> Optional[Tensor]:
        """Normalised class features of the committed model (fixed during visual steps); None for a classifier."""
        if self.text is None:
            return None
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

    def _criterion(self, image_feats: list, text: Tensor) -> Parts:
        return self.criterion(image_feats[:self.n_id_chunks], image_feats[self.n_id_chunks:], text)

    # ------------------------------------------------------------------ search API
    def evaluate(self, step: Step, ratio: float) -> Tuple[Parts, bool]:
        if ratio == 0:
            if self._incumbent is not None:
                return dict(self._incumbent), True
            return self._criterion(self.image_feats(), self.text_feats()), False
        if (step, ratio) in self._results:
            return dict(self._results[(step, ratio)]), True
        parts, feats = self._compute(step, ratio)
        self._results[(step, ratio)] = parts
        best = self._best[2] if self._best is not None else (
            self._incumbent["criterion"] if self._incumbent is not None else self.criterion.worst)
        if self.criterion.better(parts["criterion"], best):
            self._best = (step, ratio, parts["criterion"], feats)
        return dict(parts), False

    def _compute(self, step: Step, ratio: float) -> Tuple[Parts, object]:
        visual = step.tower == "visual"
        tower = self.visual if visual else self.text
        other = self.text_feats() if visual else self.image_feats()
        if step.weight_type == "W_p":
            if visual:
                self._vis_pre = self._vis_pre if self._vis_pre is not None else self._pre(tower)
                pre = self._vis_pre
            else:
                self._txt_pre = self._txt_pre if self._txt_pre is not None else self._pre(tower)
                pre = self._txt_pre
            hs = None
        else:
            hs = (self.vis_prefix() if visual else self.txt_prefix()).get(tower.index(step.layer))
        # Everything above was computed with the committed weights; only now the candidate goes in.
        self.editor.apply(step.tower, step.weight_type, step.layer, ratio)
        try:
            if hs is None:
                feats = [tower.project(p, i) for i, p in enumerate(pre)]
            else:
                start = tower.index(step.layer)
                feats = [tower.finish(h, start, i) for i, h in enumerate(hs)]
        finally:
            self.editor.revert(step.tower, step.weight_type, step.layer)
        if visual:
            return self._criterion(feats, other), feats
        text = torch.cat(feats)
        return self._criterion(other, text), text

    def commit(self, step: Step, ratio: float, parts: Parts) -> None:
        self.editor.apply(step.tower, step.weight_type, step.layer, ratio)
        best, self._best = self._best, None
        self._incumbent = dict(parts)
        if ratio == 0:  # the model did not change: every known result stays valid
            for key in [k for k in self._results if k[0] == step]:
                del self._results[key]
            return
        self._results.clear()
        # Features of the committed candidate when it was computed in this step (else recomputed lazily).
        feats = best[3] if best is not None and best[:2] == (step, ratio) else None
        if step.tower == "visual":
            self._image_feats = feats
            if step.weight_type != "W_p":
                if self._vis_prefix is not None:
                    self._vis_prefix.invalidate_above(self.visual.index(step.layer))
                self._vis_pre = None
        else:
            self._text_feats = feats
            if step.weight_type != "W_p":
                if self._txt_prefix is not None:
                    self._txt_prefix.invalidate_above(step.layer)
                self._txt_pre = None

    def restore(self, settings: Sequence[Tuple[Step, float]], known: Mapping[Tuple[Step, float], Parts],
                incumbent: Optional[Parts]) -> None:
        super().restore(settings, known, incumbent)  # nothing is cached yet: applying the weights is all
        self._incumbent = dict(incumbent) if incumbent is not None else None
        self._results = {k: dict(v) for k, v in known.items()}
