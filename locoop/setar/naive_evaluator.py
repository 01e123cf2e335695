"""SeTAR's naive search mode: every candidate recomputed from scratch, as the reference does.

For every candidate (ratio 0 included, at every step) the images are encoded again (decoded again
too when :attr:`~locoop.setar.evaluator.SearchData.reload` is given) and every class prompt is
encoded again. The paths share nothing with the fast mode's (:mod:`locoop.setar.fast_evaluator`):

* images: every ViT block in full on all tokens *and* the value path of every block, keeping the
  last block's as the local features (SeTAR's reference model,
  :func:`clip.naive.encode_image_value_path_every_block`);
* text: every prompt over the full 77-token context with an explicit causal mask, no truncation
  and no length buckets (:func:`clip.naive.encode_text_full_naive` /
  :func:`clip.naive.encode_text_embeddings_full_naive`).

A Swin-V2 classifier (no text side) is run as SeTAR's modified model runs it
(:meth:`locoop.models.swinv2.SwinV2Classifier.reference_forward`: the value path on the shifted window
partition in every block, carried through the patch merges, the last block's kept), its raw logits
the criterion's input.

So fast-vs-naive agreement checks the cached, truncated fast path against an independent one.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from clip.naive import (encode_image_value_path_every_block, encode_text_embeddings_full_naive,
                        encode_text_full_naive)
from locoop.models.head import l2_normalize

from .evaluator import Evaluator, Parts, register_evaluator
from .lowrank import is_block_model
from .searchers import Step

Tensor = torch.Tensor

__all__ = ["NaiveEvaluator"]


@register_evaluator("naive")
class NaiveEvaluator(Evaluator):
    """Re-encodes everything for every candidate, like the reference implementation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.classifier = is_block_model(self.model)  # a Swin-V2: no text side, logits out
        self.n_visual = self.model.num_blocks if self.classifier else self.model.num_visual_blocks
        self.n_text = 0 if self.classifier else self.model.num_text_blocks

    def _image_feats(self, batches) -> List[Tuple[Tensor, Tensor]]:
        out = []
        for images in batches:
            if self.classifier:  # SeTAR's modified Swin: value path in every block, through the merges
                g, loc = self.model.reference_forward(images.to(self.device))
            else:
                g, loc = encode_image_value_path_every_block(self.model, images.to(self.device))
            self.counter.add("visual_layer_passes", self.n_visual * images.shape[0])
            # the reference's extra value path in every block
            self.counter.add("visual_value_paths", self.n_visual * images.shape[0])
            out.append((g.float(), loc.float()) if self.classifier else (l2_normalize(g), l2_normalize(loc)))
        return out

    def _text_feats(self) -> Optional[Tensor]:
        if self.classifier:
            return None
        prompts, feats = self.data.text, []
        for sl in prompts.chunks():
            x, eot = prompts.chunk(sl, self.device)
            if prompts.tokens is not None:
                f = encode_text_full_naive(self.model, x)
            else:
                f = encode_text_embeddings_full_naive(self.model, x, eot)
            self.counter.add("text_layer_passes", self.n_text * f.shape[0])
            feats.append(l2_normalize(f))
        return torch.cat(feats)

    @torch.no_grad()
    def evaluate(self, step: Step, ratio: float) -> Tuple[Parts, bool]:
        self.editor.apply(step.tower, step.weight_type, step.layer, ratio)
        try:
            if self.data.reload is not None:
                id_batches, ood_batches = self.data.reload()
            else:
                id_batches, ood_batches = self.data.id_batches, self.data.ood_batches
            id_feats = self._image_feats([im for im, _ in id_batches])
            ood_feats = self._image_feats(ood_batches) if self.criterion.needs_ood else []
            return self.criterion(id_feats, ood_feats, self._text_feats()), False
        finally:
            self.editor.revert(step.tower, step.weight_type, step.layer)

    def commit(self, step: Step, ratio: float, parts: Parts) -> None:
        self.editor.apply(step.tower, step.weight_type, step.layer, ratio)
