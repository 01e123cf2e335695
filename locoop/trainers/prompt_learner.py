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

Random initial context, as the papers' code draws it: there, ``set_random_seed(SEED)`` is followed by
building OpenAI's CLIP module (whose constructor draws its random initialisation on the CPU generator
before the real weights are loaded over it) and then ``nn.init.normal_(ctx, std=0.02)`` on a CPU tensor of
the model's dtype. Our CLIP is built differently (separate q/k/v layers), so the global generator is not
where the papers' is at that point. :func:`papers_context_generator` therefore replays the papers' draws on a
private generator seeded with the run's seed (``torch.initial_seed()``) -- the same tensor shapes, in the same
order, with the same ``uniform_`` / ``normal_`` calls -- and the context is drawn from it: for the same seed,
backbone and dtype (fp16 on CUDA with ``PREC fp16``, fp32 with ``fp32`` / ``amp``) it equals the papers'
initial context under the same torch CPU kernels. ``init_rng="global"`` draws from the global generator instead.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from locoop.models.head import zero_shot_text_features  # noqa: F401  (kept importable from here)

Tensor = torch.Tensor

__all__ = ["CLASS_TOKEN_POSITIONS", "INIT_RNGS", "PromptLearner", "zero_shot_text_features", "describe_ctx_shape",
           "papers_context_generator"]

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
INIT_RNGS = ("papers", "global")


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


def _draw(g: torch.Generator, kind: str, *shape: int) -> None:
    t = torch.empty(*shape)  # float32 on the CPU, as the reference constructor allocates it
    if kind == "uniform":
        t.uniform_(generator=g)
    else:
        t.normal_(generator=g)


def _linear(g: torch.Generator, out_features: int, in_features: int, bias: bool = True) -> None:
    _draw(g, "uniform", out_features, in_features)  # nn.Linear.reset_parameters: kaiming_uniform_ ...
    if bias:
        _draw(g, "uniform", out_features)  # ... then uniform_ on the bias


def _residual_block(g: torch.Generator, width: int) -> None:
    _linear(g, width, width)  # nn.MultiheadAttention's out_proj is built first ...
    _draw(g, "uniform", 3 * width, width)  # ... then _reset_parameters: xavier_uniform_(in_proj_weight)
    _linear(g, 4 * width, width)  # mlp.c_fc
    _linear(g, width, 4 * width)  # mlp.c_proj


def _replay_openai_clip_init(clip_model: nn.Module, g: torch.Generator) -> None:
    """Advance ``g`` exactly as building OpenAI's ``CLIP`` module (``clip.model.build_model``) advances the CPU
    generator: every random initialisation of its constructor and of ``initialize_parameters``, in order."""
    visual = clip_model.visual
    text_width = int(clip_model.ln_final.weight.shape[0])
    text_layers = len(clip_model.transformer.resblocks)
    vocab = int(clip_model.token_embedding.weight.shape[0])
    context = int(clip_model.positional_embedding.shape[0])
    embed_dim = int(clip_model.text_projection.weight.shape[0])
    resnet = hasattr(visual, "layer1")
    if resnet:
        for conv in (visual.conv1, visual.conv2, visual.conv3):
            _draw(g, "uniform", *conv.weight.shape)
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            for block in layer:
                for conv in (block.conv1, block.conv2, block.conv3):
                    _draw(g, "uniform", *conv.weight.shape)
                if block.downsample is not None:
                    _draw(g, "uniform", *block.downsample[1].weight.shape)
        pool = visual.attnpool
        pool_dim = int(pool.positional_embedding.shape[1])
        _draw(g, "normal", *pool.positional_embedding.shape)
        for _ in range(3):  # k_proj, q_proj, v_proj
            _linear(g, pool_dim, pool_dim)
        _linear(g, int(pool.c_proj.weight.shape[0]), pool_dim)
    else:
        width = int(visual.conv1.weight.shape[0])
        _draw(g, "uniform", *visual.conv1.weight.shape)
        _draw(g, "normal", width)  # class_embedding
        _draw(g, "normal", *visual.positional_embedding.shape)
        for _ in range(len(visual.transformer.resblocks)):
            _residual_block(g, width)
        _draw(g, "normal", width, int(visual.output_dim))  # proj
    for _ in range(text_layers):
        _residual_block(g, text_width)
    _draw(g, "normal", vocab, text_width)  # nn.Embedding
    # initialize_parameters()
    _draw(g, "normal", vocab, text_width)
    _draw(g, "normal", context, text_width)
    if resnet:
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            _draw(g, "normal", *proj.weight.shape)
    for _ in range(text_layers):
        _draw(g, "normal", 3 * text_width, text_width)
        _draw(g, "normal", text_width, text_width)
        _draw(g, "normal", 4 * text_width, text_width)
        _draw(g, "normal", text_width, 4 * text_width)
    _draw(g, "normal", text_width, embed_dim)  # text_projection


def papers_context_generator(clip_model: nn.Module, seed: Optional[int] = None) -> torch.Generator:
    """A CPU generator in the state the papers' code has when it draws the random context (see module docstring).

    Args:
        clip_model: the backbone (only its architecture is read).
        seed: the run's seed; default ``torch.initial_seed()``, i.e. the seed ``set_random_seed`` gave torch.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(int(torch.initial_seed() if seed is None else seed))
    _replay_openai_clip_init(clip_model, g)
    return g


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
        init_rng: where a random context is drawn from: "papers" (default: the papers' draw for the run's
            seed, see the module docstring) or "global" (the global generator, as it stands).
        init_seed: the seed of the "papers" draw (default ``torch.initial_seed()``).

    Attributes:
        ctx: the learned ``nn.Parameter``, ``[n_ctx, W]`` or ``[C, n_ctx, W]`` in the model dtype.
        token_prefix: ``[C, 1, W]`` SOS embeddings; token_suffix: ``[C, 77 - 1 - n_ctx, W]``
            (class tokens, '.', EOT, padding); tokenized_prompts ``[C, 77]``; eot_idx ``[C]``.
    """

    def __init__(self, classnames: Sequence[str], clip_model: nn.Module, n_ctx: int = 16, ctx_init: str = "",
                 csc: bool = False, class_token_position: str = "end", verbose: bool = False,
                 init_rng: str = "papers", init_seed: Optional[int] = None):
        super().__init__()
        if isinstance(classnames, str) or len(classnames) == 0:
            raise ValueError("classnames must be a non-empty list of class names")
        if init_rng not in INIT_RNGS:
            raise ValueError(f"init_rng must be one of {INIT_RNGS}, got {init_rng!r}")
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
            if init_rng == "papers":  # a CPU tensor of the model's dtype, as the papers draw it
                ctx_vectors = torch.empty(shape, dtype=dtype)
                ctx_vectors.normal_(0.0, 0.02, generator=papers_context_generator(clip_model, init_seed))
                ctx_vectors = ctx_vectors.to(device)
            else:
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
