"""The order in which SeTAR's greedy search visits weight matrices.

A searcher turns the towers' depths, the searched weight types and whether the final projections
are searched into an ordered list of :class:`Step` ``(tower, weight_type, layer)``. Layers are
visited **top to bottom** (``L-1 .. 0``), as in SeTAR (X1AOX1A/SeTAR ``svd_ood/searchers.py``):

* ``visual_text`` (default) -- every visual layer, then every text layer;
* ``text_visual`` -- text first, then visual;
* ``visual_only`` / ``text_only`` -- one tower;
* ``modality_interleaved`` -- visual ``L-1``, text ``L-1``, visual ``L-2``, text ``L-2``, ...
  (towers of different depth: the deeper tower's remaining layers follow, still top to bottom);
* ``visual_only_swin`` -- a Swin-V2 classifier (one tower): stages top to bottom, each stage's
  blocks top to bottom, ``layer = (stage, block)`` (SeTAR's ``VisualSearchForSwin``: ``[3, 1]``,
  ``[3, 0]``, ``[2, 17]``, ..., ``[0, 0]`` for Swin-V2-B);
* ``layer_exhaustive`` -- not a fixed order: every round tries *all* remaining matrices (in the
  ``visual_text`` order) and commits the single best one (see :mod:`locoop.setar.search`).

With ``freeze_proj=False`` the tower's projection ``W_p`` is the tower's first step, before its
top layer (where SeTAR puts it). SeTAR's interleaved searcher repeats the ``W_p`` pair at every
layer, which visits each projection ``L`` times; here each matrix is visited exactly once, so the
pair comes once, first.

With several weight types, each layer's types are visited in the order given (e.g.
``["W_q", "W_up"]`` visits ``(l, W_q)`` then ``(l, W_up)`` before layer ``l-1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence

from clip.registry import Registry

from .lowrank import BLOCK_WEIGHT_TYPES, WEIGHT_TYPES

__all__ = ["Step", "Searcher", "SEARCHERS", "register_searcher", "get_searcher", "list_searchers",
           "build_steps", "check_weight_types"]


class Step(NamedTuple):
    """One matrix of the search: ``(tower, weight_type, layer)``; ``layer`` is None for ``W_p``, a
    ``(stage, block)`` tuple for a Swin-V2 classifier."""

    tower: str
    weight_type: str
    layer: Optional[object]


@dataclass(frozen=True)
class Searcher:
    """A registered searcher.

    Attributes:
        name: registry name.
        order: ``(layer_num, weight_types, freeze_proj) -> [Step, ...]``.
        exhaustive: True if each round tries every remaining step (``layer_exhaustive``).
        description: one line for ``--help`` and errors.
        backbone: the model kind it searches: ``clip`` (towers of layers; ``layer_num`` counts) or
            ``swin`` (a block-addressed classifier; ``layer_num["visual"]`` = blocks per stage).
    """

    name: str
    order: Callable[[Mapping[str, int], Sequence[str], bool], List[Step]]
    exhaustive: bool = False
    description: str = ""
    backbone: str = "clip"


SEARCHERS = Registry("SEARCHER", kind="searcher")


def register_searcher(name: str, exhaustive: bool = False, description: str = "", backbone: str = "clip"):
    """Decorator registering an order function under ``name``.

    Raises:
        RegistryError: the name is taken.
    """

    def deco(fn):
        SEARCHERS.register(Searcher(name, fn, exhaustive, description, backbone), name=name)
        return fn

    return deco


def list_searchers() -> List[str]:
    """Names of the registered searchers."""
    return SEARCHERS.registered_names()


def get_searcher(name: str) -> Searcher:
    """Look up a searcher by name.

    Raises:
        RegistryError (a ValueError): unknown name, naming the closest and all valid ones.
    """
    return SEARCHERS.get(name)


def check_weight_types(weight_types: Sequence[str]) -> List[str]:
    """Validate the searched weight types (``W_p`` is controlled by ``freeze_proj``, not listed here)."""
    if isinstance(weight_types, str):
        weight_types = [weight_types]
    types = list(weight_types)
    if not types:
        raise ValueError(f"no weight type to search; give at least one of {', '.join(BLOCK_WEIGHT_TYPES)}")
    for t in types:
        if t == "W_p":
            raise ValueError("W_p is not a per-layer weight type; the projections are searched with "
                             "SETAR.FREEZE_PROJ False instead of listing W_p in SETAR.WEIGHT_TYPES")
        if t not in WEIGHT_TYPES:
            raise ValueError(f"unknown weight type {t!r}; valid weight types: {', '.join(BLOCK_WEIGHT_TYPES)}")
    if len(set(types)) != len(types):
        raise ValueError(f"weight types listed twice: {types}")
    return types


def _tower_steps(tower: str, n_layers: int, weight_types: Sequence[str], freeze_proj: bool) -> List[Step]:
    steps = [] if freeze_proj else [Step(tower, "W_p", None)]
    for layer in range(n_layers - 1, -1, -1):
        steps.extend(Step(tower, t, layer) for t in weight_types)
    return steps


def _layers(layer_num: Mapping[str, int], tower: str) -> int:
    if tower not in layer_num:
        raise ValueError(f"the searcher needs the number of {tower} layers; got layer counts for {sorted(layer_num)}")
    if isinstance(layer_num[tower], (list, tuple)):
        raise ValueError("this searcher visits CLIP towers layer by layer; a Swin-V2 classifier (blocks per stage "
                         f"{list(layer_num[tower])}) is searched with SETAR.SEARCHER visual_only_swin")
    n = int(layer_num[tower])
    if n < 1:
        raise ValueError(f"the {tower} tower has {n} layers; nothing to search")
    return n


@register_searcher("visual_text", description="visual layers top to bottom, then text layers top to bottom")
def _visual_text(layer_num, weight_types, freeze_proj):
    return (_tower_steps("visual", _layers(layer_num, "visual"), weight_types, freeze_proj)
            + _tower_steps("text", _layers(layer_num, "text"), weight_types, freeze_proj))


@register_searcher("text_visual", description="text layers top to bottom, then visual layers top to bottom")
def _text_visual(layer_num, weight_types, freeze_proj):
    return (_tower_steps("text", _layers(layer_num, "text"), weight_types, freeze_proj)
            + _tower_steps("visual", _layers(layer_num, "visual"), weight_types, freeze_proj))


@register_searcher("visual_only", description="visual layers top to bottom")
def _visual_only(layer_num, weight_types, freeze_proj):
    return _tower_steps("visual", _layers(layer_num, "visual"), weight_types, freeze_proj)


@register_searcher("text_only", description="text layers top to bottom")
def _text_only(layer_num, weight_types, freeze_proj):
    return _tower_steps("text", _layers(layer_num, "text"), weight_types, freeze_proj)


@register_searcher("modality_interleaved", description="visual and text layers alternately, top to bottom")
def _modality_interleaved(layer_num, weight_types, freeze_proj):
    nv, nt = _layers(layer_num, "visual"), _layers(layer_num, "text")
    steps = [] if freeze_proj else [Step("visual", "W_p", None), Step("text", "W_p", None)]
    visual = [[Step("visual", t, l) for t in weight_types] for l in range(nv - 1, -1, -1)]
    text = [[Step("text", t, l) for t in weight_types] for l in range(nt - 1, -1, -1)]
    for v, t in zip_longest(visual, text, fillvalue=[]):
        steps.extend(v)
        steps.extend(t)
    return steps


@register_searcher("layer_exhaustive", exhaustive=True,
                   description="each round tries every remaining matrix and keeps the best one")
def _layer_exhaustive(layer_num, weight_types, freeze_proj):
    return _visual_text(layer_num, weight_types, freeze_proj)


def _stage_depths(layer_num: Mapping[str, object]) -> List[int]:
    depths = layer_num.get("visual")
    if not isinstance(depths, (list, tuple)) or not depths or not all(isinstance(d, int) and d > 0 for d in depths):
        raise ValueError("the visual_only_swin searcher needs a Swin-V2 classifier (blocks per stage, e.g. "
                         f"[2, 2, 18, 2]); got layer counts {dict(layer_num)} -- use visual_only / visual_text "
                         "for a CLIP model")
    return [int(d) for d in depths]


@register_searcher("visual_only_swin", backbone="swin",
                   description="Swin-V2 blocks, stages top to bottom, each stage's blocks top to bottom; "
                               "layers are [stage, block]")
def _visual_only_swin(layer_num, weight_types, freeze_proj):
    depths = _stage_depths(layer_num)
    if not freeze_proj:
        raise ValueError("a Swin-V2 classifier has no W_p to search (its classifier is not searched); "
                         "keep SETAR.FREEZE_PROJ True")
    return [Step("visual", t, (stage, block)) for stage in range(len(depths) - 1, -1, -1)
            for block in range(depths[stage] - 1, -1, -1) for t in weight_types]


def build_steps(searcher: str, layer_num: Mapping[str, int], weight_types: Sequence[str] = ("W_up",),
                freeze_proj: bool = True) -> List[Step]:
    """The ordered steps of a searcher (for ``layer_exhaustive``: the pool, in tie-break order).

    Args:
        searcher: a registered name (:func:`list_searchers`).
        layer_num: ``{"visual": L_v, "text": L_t}`` (only the towers the searcher visits are needed);
            for ``visual_only_swin`` ``{"visual": [blocks per stage]}`` (a Swin-V2 classifier).
        weight_types: per-layer weight types, e.g. ``["W_up"]`` (SeTAR's default).
        freeze_proj: False adds each visited tower's ``W_p`` step.

    Raises:
        ValueError: unknown searcher or weight type, or a missing/empty tower.
    """
    spec = get_searcher(searcher)
    return spec.order(layer_num, check_weight_types(weight_types), bool(freeze_proj))
