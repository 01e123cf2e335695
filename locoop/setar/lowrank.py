"""Low-rank approximation of CLIP weight matrices, addressed the way SeTAR names them.

Every matrix SeTAR edits is one :class:`torch.nn.Linear` of our CLIP (``clip/model.py``):

=========  ====================================  ==============================
type       per block ``l`` of a tower            module
=========  ====================================  ==============================
``W_q``    query projection                      ``resblocks[l].attn.q_proj``
``W_k``    key projection                        ``resblocks[l].attn.k_proj``
``W_v``    value projection                      ``resblocks[l].attn.v_proj``
``W_o``    attention output projection           ``resblocks[l].attn.out_proj``
``W_up``   MLP up-projection                     ``resblocks[l].mlp.c_fc``
``W_down`` MLP down-projection                   ``resblocks[l].mlp.c_proj``
``W_p``    the tower's final projection (no l)   ``visual.proj`` / ``text_projection``
=========  ====================================  ==============================

A ratio ``r < 1`` removes ``k = round(r * min(W.shape))`` singular components (Python's ``round``,
i.e. halves to even, as SeTAR's ``round(full_rank * rank_ratio)``); a whole number ``r >= 1`` is
an absolute rank, ``k = r``, as SeTAR reads its ``lora_settings`` (``5`` removes 5 components).
Either way ``k`` must leave a component (``k < min(W.shape)``). The edit writes back
``U[:, keep] diag(S[keep]) Vh[keep]`` -- the reconstruction from the kept components, as SeTAR's
SVD split does. Which components go is the prune type:

* ``small`` -- the ``k`` smallest singular values (SeTAR, the method);
* ``large`` -- the ``k`` largest (ablation);
* ``random`` -- ``k`` components drawn by a permutation seeded by ``(seed, tower, type, layer)``
  (ablation). The permutation is fixed per matrix, so a larger ratio removes a superset.

Biases are never touched. ``r = 0`` restores the original tensor bit for bit.

A block-addressed classifier (:class:`locoop.models.swinv2.SwinV2Classifier`, recognised by its
``block_layer`` method: :func:`is_block_model`) has one tower, ``visual``, and SeTAR's Swin layer
naming: ``layer`` is a ``[stage, block]`` pair (``[3, 1]`` = stage 3, block 1; a tuple inside, a
list in JSON), the matrices are the model's own ``get_linear`` (W_q .. W_down; no W_p).
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

__all__ = [
    "is_block_model",
    "normalize_layer",
    "WEIGHT_TYPES",
    "BLOCK_WEIGHT_TYPES",
    "TOWERS",
    "PRUNE_TYPES",
    "get_linear",
    "num_layers",
    "check_ratio",
    "n_removed",
    "LowRankEditor",
]

WEIGHT_TYPES: Tuple[str, ...] = ("W_q", "W_k", "W_v", "W_o", "W_up", "W_down", "W_p")
BLOCK_WEIGHT_TYPES: Tuple[str, ...] = WEIGHT_TYPES[:-1]
TOWERS: Tuple[str, ...] = ("visual", "text")
PRUNE_TYPES: Tuple[str, ...] = ("small", "large", "random")

# weight type -> attribute path inside a ResidualAttentionBlock
_BLOCK_PATHS: Dict[str, Tuple[str, str]] = {
    "W_q": ("attn", "q_proj"),
    "W_k": ("attn", "k_proj"),
    "W_v": ("attn", "v_proj"),
    "W_o": ("attn", "out_proj"),
    "W_up": ("mlp", "c_fc"),
    "W_down": ("mlp", "c_proj"),
}

Key = Tuple[str, str, Optional[int]]


def _check_tower(tower: str) -> None:
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; valid towers: {', '.join(TOWERS)}")


def _check_weight_type(weight_type: str) -> None:
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {weight_type!r}; valid weight types: {', '.join(WEIGHT_TYPES)}")


def _tower_transformer(model: nn.Module, tower: str) -> nn.Module:
    """The ``Transformer`` of a tower; a ResNet image tower has none."""
    _check_tower(tower)
    if tower == "text":
        return model.transformer
    transformer = getattr(model.visual, "transformer", None)
    if transformer is None:
        raise ValueError(
            f"the image tower is a {type(model.visual).__name__}, which has no transformer blocks; SeTAR's "
            "weight types address ViT blocks -- use a ViT CLIP (e.g. ViT-B/16) or search the text tower only "
            "(SETAR.SEARCHER text_only)")
    return transformer


def is_block_model(model: nn.Module) -> bool:
    """Whether ``model`` addresses its blocks as ``[stage, block]`` (a Swin-V2 classifier), not as CLIP towers."""
    return callable(getattr(model, "block_layer", None)) and callable(getattr(model, "get_linear", None))


def normalize_layer(layer):
    """A layer as a hashable key: a ``[stage, block]`` list (JSON) becomes a tuple; ints and None stay."""
    return tuple(layer) if isinstance(layer, list) else layer


def num_layers(model: nn.Module, tower: str) -> int:
    """Number of transformer blocks of a tower (``"visual"`` or ``"text"``; a Swin-V2's blocks over all stages)."""
    if is_block_model(model):
        _block_model_tower(model, tower)
        return int(model.num_blocks)
    return len(_tower_transformer(model, tower).resblocks)


def _block_model_tower(model: nn.Module, tower: str) -> None:
    _check_tower(tower)
    if tower != "visual":
        raise ValueError(f"{type(model).__name__} is a vision-only classifier: it has no {tower} tower; "
                         "its matrices are the 'visual' tower's")


def get_linear(model: nn.Module, tower: str, weight_type: str, layer: Optional[int] = None) -> nn.Linear:
    """The ``nn.Linear`` holding one SeTAR weight matrix.

    Args:
        model: a :class:`clip.model.CLIP`.
        tower: ``"visual"`` or ``"text"``.
        weight_type: one of :data:`WEIGHT_TYPES`.
        layer: block index ``0 .. L-1`` (bottom to top); must be None for ``W_p``.

    Raises:
        ValueError: unknown tower or weight type, or a layer outside the tower's range
            (the messages list the valid choices).
    """
    if is_block_model(model):  # SeTAR's Swin naming: layer = [stage, block]
        _block_model_tower(model, tower)
        return model.get_linear(weight_type, normalize_layer(layer))
    _check_tower(tower)
    _check_weight_type(weight_type)
    if weight_type == "W_p":
        if layer is not None:
            raise ValueError(f"W_p (the {tower} tower's final projection) has no layer; give layer None, got {layer!r}")
        if tower == "visual":
            proj = getattr(model.visual, "proj", None)
            if not isinstance(proj, nn.Linear):
                raise ValueError(f"the image tower ({type(model.visual).__name__}) has no 'proj' linear layer; "
                                 "W_p of the visual tower exists for ViT CLIP models only")
            return proj
        return model.text_projection
    transformer = _tower_transformer(model, tower)
    n = len(transformer.resblocks)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"{weight_type} of the {tower} tower needs a layer index in 0..{n - 1} "
                         f"(the tower has {n} blocks), got {layer!r}")
    first, second = _BLOCK_PATHS[weight_type]
    return getattr(getattr(transformer.resblocks[layer], first), second)


def check_ratio(ratio: float, what: str = "ratio") -> Union[float, int]:
    """Validate a pruning ratio: a float in [0, 1), or an int for an absolute rank.

    A number in [0, 1) is the fraction of singular components to remove; a whole number >= 1 is
    the number of components itself (an absolute rank, as in SeTAR's ``lora_settings``), returned
    as an int so that files write it as SeTAR does (``5``, which SeTAR's code requires to be an int).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1) or a whole number of components >= 1, got {ratio!r}")
    r = float(ratio)
    if math.isfinite(r) and r >= 1.0 and r == int(r):
        return int(r)
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (the fraction of singular components to remove) or a whole "
                         f"number >= 1 (how many to remove, as SeTAR's absolute ranks), got {ratio!r}")
    return r


def n_removed(ratio: float, shape: Tuple[int, int], what: str = "the matrix") -> int:
    """Number of singular components a ratio removes.

    ``round(ratio * min(shape))`` for a ratio below 1, the ratio itself for a whole number >= 1
    (SeTAR's ``to_target_modules``: ``rank < 1`` is a ratio, anything else a rank).

    Raises:
        ValueError: an invalid ratio, or one that would remove every component (or more).
    """
    r = check_ratio(ratio)
    full = min(int(shape[0]), int(shape[1]))
    if r >= 1.0:
        k = int(r)
        if k >= full:
            raise ValueError(f"rank {ratio} asks to remove {k} singular components of {what} (shape {tuple(shape)}), "
                             f"which has {full}; give at most {full - 1} (or a ratio below 1)")
        return k
    k = round(r * full)
    if k >= full:
        raise ValueError(f"ratio {ratio} removes round({r} * {full}) = {k} of the {full} singular components of "
                         f"{what} (shape {tuple(shape)}), i.e. all of them; "
                         f"use a ratio below {(full - 0.5) / full:.4g}")
    return k


def _describe(key: Key) -> str:
    tower, weight_type, layer = key
    return f"{tower} {weight_type}" + ("" if layer is None else f" layer {layer}")


class LowRankEditor:
    """Applies and reverts low-rank approximations of a CLIP model's weights in place.

    The SVD of each matrix is computed once, in float32, from the original weight, and cached;
    so is an exact copy of the original weight, which :meth:`revert` (and ``apply(..., 0)``)
    copies back bit for bit. Applying a ratio always starts from the original matrix, never
    from an already pruned one.

    Args:
        model: a :class:`clip.model.CLIP` (edited in place).
        prune_type: ``"small"`` (SeTAR), ``"large"`` or ``"random"``.
        seed: seed of the ``random`` prune type's permutations.
    """

    def __init__(self, model: nn.Module, prune_type: str = "small", seed: int = 0) -> None:
        if prune_type not in PRUNE_TYPES:
            raise ValueError(f"unknown prune type {prune_type!r}; valid prune types: {', '.join(PRUNE_TYPES)} "
                             "(small = remove the smallest singular components, SeTAR's method)")
        self.model = model
        self.prune_type = prune_type
        self.seed = int(seed)
        self._original: Dict[Key, torch.Tensor] = {}
        self._svd: Dict[Key, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._perm: Dict[Key, torch.Tensor] = {}
        self.applied: Dict[Key, float] = {}  # key -> ratio currently applied (non-zero only)

    # ------------------------------------------------------------------ helpers
    def linear(self, tower: str, weight_type: str, layer: Optional[int] = None) -> nn.Linear:
        """The edited module (see :func:`get_linear`)."""
        return get_linear(self.model, tower, weight_type, normalize_layer(layer))

    def _remember(self, key: Key, lin: nn.Linear) -> torch.Tensor:
        if key not in self._original:
            self._original[key] = lin.weight.detach().clone()
        return self._original[key]

    def svd(self, tower: str, weight_type: str, layer: Optional[int] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, Vh)`` of the original matrix in float32 (singular values descending), cached."""
        key = (tower, weight_type, normalize_layer(layer))
        if key not in self._svd:
            original = self._remember(key, self.linear(*key))
            self._svd[key] = torch.linalg.svd(original.float(), full_matrices=False)
        return self._svd[key]

    def n_removed(self, tower: str, weight_type: str, layer: Optional[int], ratio: float) -> int:
        """Components that ``ratio`` removes from this matrix (errors as :func:`n_removed`)."""
        lin = self.linear(tower, weight_type, layer)
        return n_removed(ratio, tuple(lin.weight.shape), _describe((tower, weight_type, layer)))

    def removed_indices(self, tower: str, weight_type: str, layer: Optional[int], k: int) -> torch.Tensor:
        """Indices (into the descending singular values) of the ``k`` removed components."""
        key = (tower, weight_type, normalize_layer(layer))
        full = self.svd(*key)[1].numel()
        if self.prune_type == "small":
            return torch.arange(full - k, full)
        if self.prune_type == "large":
            return torch.arange(0, k)
        if key not in self._perm:
            # A stable per-matrix seed: the same matrix gets the same permutation in every run and mode.
            salt = zlib.crc32(_describe(key).encode("utf-8"))
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + salt) % (2 ** 63))
            self._perm[key] = torch.randperm(full, generator=gen)
        return self._perm[key][:k].sort().values

    def pruned_weight(self, tower: str, weight_type: str, layer: Optional[int], ratio: float) -> torch.Tensor:
        """The approximated weight for ``ratio`` (the original tensor itself when nothing is removed)."""
        key = (tower, weight_type, normalize_layer(layer))
        k = self.n_removed(*key, ratio)
        original = self._remember(key, self.linear(*key))
        if k == 0:
            return original
        u, s, vh = self.svd(*key)
        keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
        keep[self.removed_indices(*key, k).to(s.device)] = False
        approx = (u[:, keep] * s[keep]) @ vh[keep]
        return approx.to(original.dtype)

    # ------------------------------------------------------------------ editing
    @torch.no_grad()
    def apply(self, tower: str, weight_type: str, layer: Optional[int], ratio: float) -> int:
        """Replace the weight by its approximation at ``ratio`` (in place); returns components removed.

        Raises:
            ValueError: bad tower/type/layer, a ratio neither in [0, 1) nor a whole number >= 1, or
                one removing every component -- checked before anything is changed.
        """
        key = (tower, weight_type, normalize_layer(layer))
        lin = self.linear(*key)
        k = n_removed(ratio, tuple(lin.weight.shape), _describe(key))
        if k == 0 and key not in self._original:
            return 0  # never touched: nothing to do, and no copy needed
        lin.weight.copy_(self.pruned_weight(*key, ratio))
        if k:
            self.applied[key] = float(ratio)
        else:
            self.applied.pop(key, None)
        return k

    @torch.no_grad()
    def revert(self, tower: str, weight_type: str, layer: Optional[int] = None) -> None:
        """Restore the original weight of one matrix exactly (no-op if it was never edited)."""
        key = (tower, weight_type, normalize_layer(layer))
        if key in self._original:
            self.linear(*key).weight.copy_(self._original[key])
        self.applied.pop(key, None)

    def revert_all(self) -> None:
        """Restore every matrix this editor has touched."""
        for key in list(self._original):
            self.revert(*key)

    def original_weight(self, tower: str, weight_type: str, layer: Optional[int] = None) -> torch.Tensor:
        """The exact copy of the original weight (taken on first use)."""
        key = (tower, weight_type, normalize_layer(layer))
        return self._remember(key, self.linear(*key))
