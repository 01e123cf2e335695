"""CoOp's prompt learner (used by LoCoOp and CoOp) and zero-shot text features.

A prompt is ``"X X ... X <classname>."`` tokenised with CLIP's tokenizer; the ``X`` token
embeddings are replaced by learned context vectors. Everything else (SOS, class-name tokens, '.',
EOT, padding) is a fixed buffer computed from the current class names.

Differences from the CoOp/LoCoOp reference code, all deliberate:

* The fixed token buffers (``token_prefix``, ``token_suffix``, ``tokenized_prompts``, ``eot_idx``)
  are non-persistent: checkpoints hold only ``ctx``. Loading drops those keys when a checkpoint has
  them (reference checkpoints do), so the buffers always match the class names in use.
* Loading a ``ctx`` of another shape fails with a message naming N_CTX / CSC of both sides
  (the reference silently loads with ``strict=False`` or fails with a bare size mismatch).
* ``CTX_INIT``: N_CTX becomes the number of BPE *tokens* of the words (the reference counts words,
  which differs for a word split into several tokens and then misplaces the class name). With
  CSC the initial words are copied to every class (the reference ignores CSC when CTX_INIT is set).
* ``middle`` / ``front`` positions are built with one gather instead of a Python loop over classes;
  the resulting embeddings are the same.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from locoop.models.head import zero_shot_text_features  # noqa: F401  (kept importable from here)

Tensor = torch.Tensor

__all__ = ["CLASS_TOKEN_POSITIONS", "PromptLearner", "zero_shot_text_features", "describe_ctx_shape"]

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


def _tokenize(texts: Sequence[str], context_length: int) -> Tensor:
    import clip

    return clip.tokenize(list(texts), context_length=context_length)


def _encode(text: str) -> list:
    from clip.tokenizer import get_tokenizer

    return get_tokenizer().encode(text)


def describe_ctx_shape(shape: Sequence[int]) -> str:
    """Human-readable N_CTX / CSC of a ``ctx`` tensor shape (``[n_ctx, W]`` or ``[C, n_ctx, W]``)."""
    shape = tuple(shape)
    if len(shape) == 2:
        return f"N_CTX={shape[0]}, CSC=False, width {shape[1]}"
    if len(shape) == 3:
        return f"N_CTX={shape[1]}, CSC=True ({shape[0]} classes), width {shape[2]}"
    return f"shape {shape}"


class PromptLearner(nn.Module):
    """Learned context vectors in front of (or around) the class-name tokens.

    Args:
        classnames: class names in label order ('_' is read as a space, as CoOp does).
        clip_model: the CLIP model (its token embedding, dtype and context length are used; it is
            not stored).
        n_ctx: number of context vectors (ignored when ``ctx_init`` is given).
        ctx_init: words to initialise the context from ("" = random normal, std 0.02).
        csc: class-specific contexts (one set per class) instead of one shared set.
        class_token_position: "end", "middle" or "front".
        verbose: print the initial context.

    Attributes:
        ctx: the learned ``nn.Parameter``, ``[n_ctx, W]`` or ``[C, n_ctx, W]`` in the model dtype.
        token_prefix: ``[C, 1, W]`` SOS embeddings; token_suffix: ``[C, 77 - 1 - n_ctx, W]``
            (class tokens, '.', EOT, padding); tokenized_prompts ``[C, 77]``; eot_idx ``[C]``.
    """

    def __init__(self, classnames: Sequence[str], clip_model: nn.Module, n_ctx: int = 16, ctx_init: str = "",
                 csc: bool = False, class_token_position: str = "end", verbose: bool = False):
        super().__init__()
        if isinstance(classnames, str) or len(classnames) == 0:
            raise ValueError("classnames must be a non-empty list of class names")
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token_position must be one of {CLASS_TOKEN_POSITIONS} "
                             f"(TRAINER.LOCOOP.CLASS_TOKEN_POSITION), got {class_token_position!r}")
        dtype = clip_model.dtype
        width = clip_model.ln_final.weight.shape[0]
        context_length = int(clip_model.context_length)
        device = clip_model.token_embedding.weight.device
        n_cls = len(classnames)
        ctx_init = (ctx_init or "").replace("_", " ").strip()

        if ctx_init:
            init_ids = _encode(ctx_init)
            n_ctx = len(init_ids)
            if n_ctx == 0:
                raise ValueError(f"CTX_INIT {ctx_init!r} has no tokens")
            with torch.no_grad():
                ids = torch.tensor(init_ids, device=device)
                ctx_vectors = clip_model.token_embedding(ids).to(dtype).detach().clone()
            if csc:
                ctx_vectors = ctx_vectors.unsqueeze(0).repeat(n_cls, 1, 1)
            prompt_prefix = ctx_init
        else:
            if int(n_ctx) < 1:
                raise ValueError(f"N_CTX must be at least 1 when CTX_INIT is empty, got {n_ctx}")
            n_ctx = int(n_ctx)
            shape = (n_cls, n_ctx, width) if csc else (n_ctx, width)
            ctx_vectors = torch.empty(shape, dtype=dtype, device=device)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        if verbose:
            print(f"Initializing {'class-specific' if csc else 'a generic'} context: \"{prompt_prefix}\" "
                  f"({n_ctx} context tokens)")
        self.ctx = nn.Parameter(ctx_vectors)

        names = [name.replace("_", " ") for name in classnames]
        name_lens = [len(_encode(name)) for name in names]
        prompts = [f"{prompt_prefix} {name}." for name in names]
        try:
            tokenized = _tokenize(prompts, context_length).to(device)
        except RuntimeError as e:
            raise ValueError(f"a prompt is longer than CLIP's {context_length} tokens; use a smaller N_CTX or "
                             f"shorter class names ({e})") from e
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized).to(dtype)
        # The context occupies tokens 1..n_ctx of "<ctx words> <name>." whatever the init words were.
        self.register_buffer("token_prefix", embedding[:, :1, :].clone(), persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:, :].clone(), persistent=False)
        self.register_buffer("tokenized_prompts", tokenized, persistent=False)
        self.register_buffer("eot_idx", tokenized.argmax(dim=-1), persistent=False)
        self.n_cls = n_cls
        self.n_ctx = n_ctx
        self.csc = bool(csc)
        self.classnames = names
        self.name_lens = name_lens
        self.class_token_position = class_token_position
        if class_token_position != "end":
            self.register_buffer("_order", self._position_order(), persistent=False)

    # ------------------------------------------------------------------ layout
    def _position_order(self) -> Tensor:
        """Per class, which position of the 'end' layout goes to each output position."""
        n_ctx, length = self.n_ctx, int(self.tokenized_prompts.shape[1])
        rows = []
        for name_len in self.name_lens:
            sos, ctx = [0], list(range(1, 1 + n_ctx))
            cls = list(range(1 + n_ctx, 1 + n_ctx + name_len))
            rest = list(range(1 + n_ctx + name_len, length))
            if self.class_token_position == "front":
                rows.append(sos + cls + ctx + rest)
            else:  # middle: first half of the context, class, second half (CoOp)
                half = n_ctx // 2
                rows.append(sos + ctx[:half] + cls + ctx[half:] + rest)
        return torch.tensor(rows, dtype=torch.long, device=self.tokenized_prompts.device)

    @property
    def shared_prefix_len(self) -> Optional[int]:
        """``1 + n_ctx`` when every prompt starts with the same tokens (shared context, class at the
        end), which allows shared-prefix text encoding; None otherwise."""
        if not self.csc and self.class_token_position == "end":
            return 1 + self.n_ctx
        return None

    def prefix_and_suffix(self) -> tuple[Tensor, Tensor]:
        """For shared-prefix encoding: ``(prefix [1 + n_ctx, W], suffix [C, 77 - 1 - n_ctx, W])``.

        Raises:
            ValueError: the prompts do not share a prefix (CSC or class token not at the end).
        """
        if self.shared_prefix_len is None:
            raise ValueError("prompts share no prefix: needs CSC=False and CLASS_TOKEN_POSITION 'end'")
        return torch.cat([self.token_prefix[0], self.ctx], dim=0), self.token_suffix

    def forward(self) -> Tensor:
        """Prompt token embeddings ``[C, 77, W]`` (no positional embedding)."""
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        if self.class_token_position == "end":
            return prompts
        index = self._order.unsqueeze(-1).expand(-1, -1, prompts.shape[-1])
        return prompts.gather(1, index)

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Fixed token buffers are rebuilt from the current class names; reference checkpoints store them.
        for key in ("token_prefix", "token_suffix", "tokenized_prompts", "eot_idx", "_order"):
            state_dict.pop(prefix + key, None)
        key = prefix + "ctx"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.ctx.shape):
            got = tuple(state_dict[key].shape)
            raise ValueError(
                f"the checkpoint's context vectors have shape {got} ({describe_ctx_shape(got)}) but this "
                f"model's have {tuple(self.ctx.shape)} ({describe_ctx_shape(self.ctx.shape)}); set "
                f"TRAINER.LOCOOP.N_CTX / CSC (and CTX_INIT, the class list) to those of the checkpoint")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
