"""Exact fast text encoding of learned prompts.

Three ways to get the EOT features of ``C`` prompts, all equal up to float reassociation:

* ``naive``: every prompt over the full 77 tokens with an explicit causal mask (what the
  CoOp/LoCoOp reference code does); kept for tests and ``tools/bench_train.py``.
* ``truncate``: cut all prompts after the longest EOT (:meth:`clip.model.CLIP.encode_text_embeddings`).
  Causal attention means later tokens never reach an EOT, so nothing changes.
* ``shared_prefix`` (class-shared context, class token at the end): every prompt starts with the same
  ``P = 1 + N_CTX`` tokens (SOS + context). Under causal attention their hidden states are the same
  for every class in every layer, so they are computed once, for one sequence. Only the per-class
  suffix (class-name tokens, '.', EOT) is computed per class, its queries attending to the shared
  prefix keys/values plus its own earlier suffix tokens.

  The suffix tokens of all classes are *packed*: each class contributes only its tokens up to its
  own EOT (``eot_c - P + 1`` of them; 4.2 on average for the ImageNet names against 30 for the
  truncated prompt). The prefix rows and all packed suffix rows form one ``[P + T, W]`` array, so
  every per-token layer (LayerNorms, q/k/v/out projections, MLP), which is where nearly all the time
  goes, is one call on ``P + sum_c (eot_c - P + 1)`` rows instead of ``C * (max eot + 1)``.
  For attention the suffix q/k/v rows are gathered into a padded ``[C, S, W]`` grid (S = longest
  suffix; a pad cell repeats its class's EOT row and sits after it, so causality keeps it from
  affecting that class, and its zero output gradient adds nothing) and the scores against the
  prefix are one ``[C*S, d] x [d, P]`` matmul per head on the single copy of the prefix keys - the
  prefix is never copied per class. Both score blocks go through one softmax.
  In the last block only the EOT rows need an output, so only they get queries, the
  out-projection and the MLP.

The same ``nn.Linear`` / ``LayerNorm`` modules of the CLIP text tower are called, so low-rank edits or
LoRA adapters on them (SeTAR) act here exactly as in the plain encoder.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

__all__ = ["TEXT_ENCODER_MODES", "TextEncoder", "encode_text_shared_prefix", "encode_text_truncated",
           "encode_text_naive"]

TEXT_ENCODER_MODES = ("auto", "shared_prefix", "truncate", "naive")


def encode_text_truncated(clip_model: nn.Module, prompts: Tensor, eot_idx: Tensor) -> Tensor:
    """EOT features ``[C, D]`` of prompt embeddings ``[C, L, W]``, truncated after the longest EOT."""
    return clip_model.encode_text_embeddings(prompts, eot_idx)


def encode_text_naive(clip_model: nn.Module, prompts: Tensor, eot_idx: Tensor) -> Tensor:
    """EOT features over the full context with an explicit causal mask (the reference's way)."""
    from clip.naive import encode_text_embeddings_full_naive

    return encode_text_embeddings_full_naive(clip_model, prompts, eot_idx)


class _SuffixLayout:
    """Where the tokens sit: rows ``0..P-1`` of the packed ``[P + T, W]`` array are the shared prefix,
    then each class's suffix tokens up to its own EOT; the padded grid is ``[C, S]`` (S = longest suffix)."""

    def __init__(self, eot_idx: Tensor, prefix_len: int):
        counts = eot_idx.long() - prefix_len + 1  # suffix tokens of each class, EOT included
        if int(counts.min()) < 1:
            raise ValueError(f"an EOT position ({int(eot_idx.min())}) lies inside the shared prefix of "
                             f"{prefix_len} tokens; the prompts are not '<prefix> <class tokens>.'")
        p = prefix_len
        self.prefix_len = p
        self.num_classes = int(counts.shape[0])
        self.max_len = int(counts.max())  # S
        steps = torch.arange(self.max_len, device=eot_idx.device)
        valid = steps.unsqueeze(0) < counts.unsqueeze(1)  # [C, S]
        self.valid = valid
        self.dense = bool(valid.all())
        ends = counts.cumsum(0)
        starts = ends - counts
        # Packed row (offset by P) of each class's EOT, its last suffix token.
        self.eot_rows = p + ends - 1  # [C]
        # Packed row read by every grid cell. Pad cells (after their class's EOT) read the EOT row:
        # any finite value works, causality keeps pad keys away from valid queries.
        self.grid_src = (p + torch.minimum(starts.unsqueeze(1) + steps, ends.unsqueeze(1) - 1)).reshape(-1)
        # Flattened grid cells holding real tokens, in packed order.
        self.grid_rows = valid.reshape(-1).nonzero().squeeze(1)  # [T]
        self.positions = (p + steps).unsqueeze(0).expand_as(valid)[valid]  # [T]

    def pack(self, suffix: Tensor) -> Tensor:
        """Suffix embeddings ``[C, >=S, W]`` -> packed ``[T, W]``."""
        x = suffix[:, : self.max_len]
        return x.reshape(-1, x.shape[-1]) if self.dense else x[self.valid]

    def to_grid(self, x: Tensor) -> Tensor:
        """Packed rows ``[P + T, W]`` -> suffix grid ``[C, S, W]``."""
        if self.dense:
            return x[self.prefix_len:].view(self.num_classes, self.max_len, -1)
        return x.index_select(0, self.grid_src).view(self.num_classes, self.max_len, -1)

    def from_grid(self, x: Tensor) -> Tensor:
        """Suffix grid ``[C, S, W]`` -> packed suffix rows ``[T, W]``."""
        x = x.reshape(-1, x.shape[-1])
        return x if self.dense else x.index_select(0, self.grid_rows)


def _suffix_attention(q: Tensor, k_s: Tensor, v_s: Tensor, k_p: Tensor, v_p: Tensor, num_heads: int,
                      query_last_only: bool = False) -> Tensor:
    """Attention of suffix queries over the shared prefix and their own causal suffix.

    Args:
        q: ``[C, Sq, W]`` queries (``Sq = S``, or 1 with ``query_last_only``: the EOT query).
        k_s, v_s: ``[C, S, W]`` suffix keys / values on the padded grid.
        k_p, v_p: ``[P, W]`` keys / values of the shared prefix.
        query_last_only: ``q`` holds one query per class, at suffix position ``last[c]``; the
            caller guarantees it attends to the whole (valid part of the) suffix.

    Returns:
        ``[C, Sq, W]`` attention output before the out-projection.
    """
    c, sq, w = q.shape
    s, p = k_s.shape[1], k_p.shape[0]
    h, d = num_heads, w // num_heads
    scale = 1.0 / math.sqrt(d)
    qh = (q * scale).view(c, sq, h, d).transpose(1, 2)  # [C, H, Sq, d]
    # Scores against the prefix: one matmul per head on the single copy of the prefix keys.
    kp = k_p.view(p, h, d).permute(1, 2, 0)  # [H, d, P]
    q_rows = qh.transpose(0, 1).reshape(h, c * sq, d)  # [H, C*Sq, d]
    s_pre = torch.bmm(q_rows, kp).view(h, c, sq, p).transpose(0, 1)  # [C, H, Sq, P]
    ksh = k_s.view(c, s, h, d).transpose(1, 2)  # [C, H, S, d]
    s_suf = torch.matmul(qh, ksh.transpose(-1, -2))  # [C, H, Sq, S]
    if not query_last_only:
        causal = torch.ones(sq, s, dtype=torch.bool, device=q.device).triu_(1)
        s_suf = s_suf.masked_fill(causal, float("-inf"))
    attn = torch.cat([s_pre, s_suf], dim=-1).softmax(dim=-1)  # [C, H, Sq, P + S]
    a_pre, a_suf = attn[..., :p], attn[..., p:]
    vp = v_p.view(p, h, d).transpose(0, 1)  # [H, P, d]
    o_pre = torch.bmm(a_pre.transpose(0, 1).reshape(h, c * sq, p), vp).view(h, c, sq, d).transpose(0, 1)
    o_suf = torch.matmul(a_suf, v_s.view(c, s, h, d).transpose(1, 2))  # [C, H, Sq, d]
    return (o_pre + o_suf).transpose(1, 2).reshape(c, sq, w)


def encode_text_shared_prefix(clip_model: nn.Module, prefix: Tensor, suffix: Tensor, eot_idx: Tensor) -> Tensor:
    """EOT features ``[C, D]`` of prompts ``cat(prefix, suffix[c])`` sharing their first tokens.

    Args:
        clip_model: CLIP model (its text tower is used).
        prefix: ``[P, W]`` token embeddings shared by every prompt (SOS + context).
        suffix: ``[C, L - P, W]`` per-class token embeddings that follow it (class tokens, '.', EOT, ...).
        eot_idx: ``[C]`` EOT positions in the full prompt (>= P).

    Returns:
        Unnormalised text features ``[C, D]``, equal (to float tolerance) to encoding each full prompt.
    """
    if prefix.dim() != 2 or suffix.dim() != 3 or prefix.shape[-1] != suffix.shape[-1]:
        raise ValueError(f"expected prefix [P, W] and suffix [C, L, W], got {tuple(prefix.shape)} and "
                         f"{tuple(suffix.shape)}")
    dtype = clip_model.dtype
    p = prefix.shape[0]
    layout = _SuffixLayout(eot_idx, p)
    if p + layout.max_len > clip_model.positional_embedding.shape[0]:
        raise ValueError(f"prompts of {p + layout.max_len} tokens exceed the context length")
    pos = clip_model.positional_embedding.to(dtype)
    # One packed array of rows: the prefix once, then every class's suffix tokens up to its EOT, so
    # each per-token layer is a single call on P + T rows.
    x = torch.cat([prefix.to(dtype) + pos[:p], layout.pack(suffix.to(dtype)) + pos[layout.positions]])
    blocks = clip_model.transformer.resblocks
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        attn = block.attn
        h = block.ln_1(x)
        k, v = attn.k_proj(h), attn.v_proj(h)
        k_p, v_p = k[:p], v[:p]
        k_s, v_s = layout.to_grid(k), layout.to_grid(v)
        if i < last:
            q = attn.q_proj(h)
            # The prefix is an ordinary causal sequence of its own.
            o_p = F.scaled_dot_product_attention(attn.split_heads(q[None, :p]), attn.split_heads(k_p[None]),
                                                 attn.split_heads(v_p[None]), is_causal=True)
            o_s = _suffix_attention(layout.to_grid(q), k_s, v_s, k_p, v_p, attn.num_heads)
            x = x + attn.out_proj(torch.cat([attn.merge_heads(o_p)[0], layout.from_grid(o_s)]))
            x = x + block.mlp(block.ln_2(x))
        else:
            # Only the EOT rows are read out: queries, out-projection and MLP for them alone. The
            # EOT is its class's last suffix token, so it attends to the whole valid suffix; pad
            # keys beyond it must still be masked.
            q_e = attn.q_proj(h.index_select(0, layout.eot_rows)).unsqueeze(1)  # [C, 1, W]
            if not layout.dense:
                o_e = _masked_last_query_attention(q_e, k_s, v_s, k_p, v_p, attn.num_heads, layout.valid)
            else:
                o_e = _suffix_attention(q_e, k_s, v_s, k_p, v_p, attn.num_heads, query_last_only=True)
            x_e = x.index_select(0, layout.eot_rows) + attn.out_proj(o_e[:, 0])
            x = x_e + block.mlp(block.ln_2(x_e))
    return clip_model.text_projection(clip_model.ln_final(x))


def _masked_last_query_attention(q: Tensor, k_s: Tensor, v_s: Tensor, k_p: Tensor, v_p: Tensor, num_heads: int,
                                 valid: Tensor) -> Tensor:
    """EOT-query attention when suffixes have different lengths: pad keys masked out."""
    c, _, w = q.shape
    s, p = k_s.shape[1], k_p.shape[0]
    h, d = num_heads, w // num_heads
    qh = (q * (1.0 / math.sqrt(d))).view(c, 1, h, d).transpose(1, 2)  # [C, H, 1, d]
    s_pre = torch.matmul(qh.squeeze(2).transpose(0, 1), k_p.view(p, h, d).permute(1, 2, 0))  # [H, C, P]
    s_pre = s_pre.transpose(0, 1).unsqueeze(2)  # [C, H, 1, P]
    s_suf = torch.matmul(qh, k_s.view(c, s, h, d).permute(0, 2, 3, 1))  # [C, H, 1, S]
    s_suf = s_suf.masked_fill(~valid.view(c, 1, 1, s), float("-inf"))
    attn = torch.cat([s_pre, s_suf], dim=-1).softmax(dim=-1)
    a_pre, a_suf = attn[..., :p], attn[..., p:]
    o_pre = torch.matmul(a_pre.squeeze(2).transpose(0, 1), v_p.view(p, h, d).transpose(0, 1))  # [H, C, d]
    o_suf = torch.matmul(a_suf, v_s.view(c, s, h, d).transpose(1, 2)).squeeze(2)  # [C, H, d]
    return (o_pre.transpose(0, 1) + o_suf).reshape(c, 1, w)


class TextEncoder(nn.Module):
    """Text features of a :class:`~locoop.trainers.prompt_learner.PromptLearner`'s prompts.

    Args:
        clip_model: CLIP model whose text tower encodes the prompts (not copied).
        mode: "auto" (shared prefix when the prompt learner allows it, else truncation),
            "shared_prefix" (error when not applicable), "truncate" or "naive".
    """

    def __init__(self, clip_model: nn.Module, mode: str = "auto"):
        super().__init__()
        if mode not in TEXT_ENCODER_MODES:
            raise ValueError(f"text encoder mode must be one of {TEXT_ENCODER_MODES}, got {mode!r}")
        # A plain attribute, not a submodule: the owner registers the CLIP model once.
        self.__dict__["clip_model"] = clip_model
        self.mode = mode

    def resolve_mode(self, prompt_learner: nn.Module, mode: Optional[str] = None) -> str:
        """The encoding actually used for ``prompt_learner`` (``mode`` overrides the module's)."""
        mode = mode or self.mode
        if mode not in TEXT_ENCODER_MODES:
            raise ValueError(f"text encoder mode must be one of {TEXT_ENCODER_MODES}, got {mode!r}")
        shared = getattr(prompt_learner, "shared_prefix_len", None) is not None
        if mode == "shared_prefix" and not shared:
            raise ValueError("shared-prefix text encoding needs class-shared context (CSC False) and the class "
                             "token at the end; use mode 'auto' or 'truncate'")
        if mode == "auto":
            return "shared_prefix" if shared else "truncate"
        return mode

    def forward(self, prompt_learner: nn.Module, mode: Optional[str] = None) -> Tensor:
        """Unnormalised text features ``[C, D]`` (``mode`` overrides the module's for this call)."""
        mode = self.resolve_mode(prompt_learner, mode)
        model = self.clip_model
        if mode == "shared_prefix":
            prefix, suffix = prompt_learner.prefix_and_suffix()
            return encode_text_shared_prefix(model, prefix, suffix, prompt_learner.eot_idx)
        prompts = prompt_learner()
        if mode == "truncate":
            return encode_text_truncated(model, prompts, prompt_learner.eot_idx)
        return encode_text_naive(model, prompts, prompt_learner.eot_idx)
