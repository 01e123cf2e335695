"""Naive reference paths, written the way the papers' reference code computes them.

They exist to check the fast paths in :mod:`clip.model` (tests) and to measure them
(``tools/bench_clip.py``); nothing in the library calls them.
"""
from __future__ import annotations

import torch

from clip.model import CLIP, ModifiedResNet

Tensor = torch.Tensor


@torch.no_grad()
def encode_image_local_naive(model: CLIP, images: Tensor) -> tuple[Tensor, Tensor]:
    """Global and local features with the value path computed in *every* ViT block.

    The reference LoCoOp code runs the full transformer and, alongside it, the value path of
    every block on all tokens, keeping only the last block's. ModifiedResNet has no such
    redundancy, so it is returned through the ordinary path.
    """
    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        return model.encode_image(images, return_local=True)
    x = visual.stem(images.to(model.dtype))
    local = None
    for block in visual.transformer.resblocks:
        local = _reference_value_path(block, x)
        x = block(x)
    glob = visual.head(x[:, 0])
    return glob, visual.head(local[:, 1:])


def _reference_value_path(block, x: Tensor) -> Tensor:
    """The value path as the reference computes it: the whole packed in-projection (q, k and v)
    and the out-projection of all three, of which only v is kept."""
    h = block.ln_1(x)
    _q, _k, v = (block.attn.out_proj(proj(h)) for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj))
    y = x + v
    return y + block.mlp(block.ln_2(y))


def encode_text_full_naive(model: CLIP, tokens: Tensor) -> Tensor:
    """Text features over the full context with an explicit causal mask, no truncation."""
    return encode_text_embeddings_full_naive(model, model.token_embedding(tokens), tokens.argmax(dim=-1))


def encode_text_embeddings_full_naive(model: CLIP, embeddings: Tensor, eot_idx: Tensor) -> Tensor:
    """Like :func:`encode_text_full_naive`, from prompt-learner token embeddings ``[B, 77, W]``."""
    n = embeddings.shape[1]
    x = embeddings.to(model.dtype) + model.positional_embedding[:n].to(model.dtype)
    mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
    for block in model.transformer.resblocks:
        x = block(x, attn_mask=mask)
    x = model.ln_final(x)
    return model.text_projection(x[torch.arange(x.shape[0], device=x.device), eot_idx])
