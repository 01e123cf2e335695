"""Naive reference paths, written the way the papers' reference code computes them.

They exist to check the fast paths in :mod:`clip.model` (tests, SeTAR's naive search mode) and to
measure them (``tools/bench_*.py``). None of them calls the code it checks: the image paths run
the blocks one by one with the value path recomputed in every block (and the ResNet attention pool
written out by hand), the text paths run the full 77-token context with an explicit causal mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clip.model import CLIP, ModifiedResNet

Tensor = torch.Tensor

__all__ = ["encode_image_local_naive", "encode_image_value_path_every_block", "encode_text_full_naive",
           "encode_text_embeddings_full_naive"]


@torch.no_grad()
def encode_image_local_naive(model: CLIP, images: Tensor) -> tuple[Tensor, Tensor]:
    """Global and local features, the way LoCoOp's reference code computes them.

    ViT: the full transformer, and alongside it the value path of *every* block on all tokens
    (with the whole packed in-projection and the out-projection of q, k and v), keeping only the
    last block's. ModifiedResNet: the attention pool written out by hand (explicit softmax
    attention for the global feature, ``c_proj(v_proj(position))`` for each local feature).
    """
    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        return _resnet_naive(visual, images.to(model.dtype))
    x = visual.stem(images.to(model.dtype))
    local = None
    for block in visual.transformer.resblocks:
        local = _reference_value_path(block, x)
        x = block(x)
    glob = visual.head(x[:, 0])
    return glob, visual.head(local[:, 1:])


@torch.no_grad()
def encode_image_value_path_every_block(model: CLIP, images: Tensor) -> tuple[Tensor, Tensor]:
    """Global and local features the way SeTAR's reference model computes them.

    SeTAR's CLIP (``enable_local_feat``) runs every ViT block in full on all tokens *and* the
    value path (``v_proj``, ``out_proj``, MLP) of every block, keeping only the last block's value
    path as local features. Equal to :meth:`clip.model.CLIP.encode_image` up to float rounding, at
    the reference's cost. A ResNet image tower has no such redundancy: see
    :func:`encode_image_local_naive`.
    """
    v = model.visual
    if isinstance(v, ModifiedResNet):
        return _resnet_naive(v, images.to(model.dtype))
    x = v.stem(images.to(model.dtype))
    local = x
    for block in v.transformer.resblocks:
        local = block.value_path(x)
        x = block(x)
    return v.head(x[:, 0]), v.head(local[:, 1:])


def _reference_value_path(block, x: Tensor) -> Tensor:
    """The value path as the reference computes it: the whole packed in-projection (q, k and v)
    and the out-projection of all three, of which only v is kept."""
    h = block.ln_1(x)
    _q, _k, v = (block.attn.out_proj(proj(h)) for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj))
    y = x + v
    return y + block.mlp(block.ln_2(y))


def _resnet_naive(visual: ModifiedResNet, images: Tensor) -> tuple[Tensor, Tensor]:
    """ModifiedResNet features with the attention pool computed by hand (OpenAI's definition)."""
    x = visual.relu1(visual.bn1(visual.conv1(images)))
    x = visual.relu2(visual.bn2(visual.conv2(x)))
    x = visual.avgpool(visual.relu3(visual.bn3(visual.conv3(x))))
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).permute(0, 2, 1)  # [B, HW, C]
    pos = pool.positional_embedding
    if pos.shape[0] != h * w + 1:  # another input resolution: the same bicubic resize as the model
        from clip.model import resize_pos_embed

        pos = resize_pos_embed(pos, (h, w))
    seq = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pos.to(tokens.dtype)
    heads = pool.num_heads
    d = c // heads
    q = F.linear(seq[:, :1], pool.q_proj.weight, pool.q_proj.bias).reshape(b, 1, heads, d).transpose(1, 2)
    k = F.linear(seq, pool.k_proj.weight, pool.k_proj.bias).reshape(b, -1, heads, d).transpose(1, 2)
    v = F.linear(seq, pool.v_proj.weight, pool.v_proj.bias).reshape(b, -1, heads, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    pooled = (weights @ v).transpose(1, 2).reshape(b, c)
    glob = F.linear(pooled, pool.c_proj.weight, pool.c_proj.bias)
    # LoCoOp's local features: every position (no positional embedding) through v then c.
    local = F.linear(F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
    return glob, local


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
