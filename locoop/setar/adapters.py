"""Low-rank adapters on CLIP / Swin-V2 weight matrices: SeTAR+FT's SVD-initialised adapters and plain LoRA.

SeTAR+FT (Li et al., NeurIPS 2024, section 3.3): for every matrix ``W`` a SeTAR search pruned with
ratio ``r > 0``, split ``W`` by its SVD (float32) into

* the principal part, kept frozen as the layer's base weight: the reconstruction from the
  components the search *keeps* (for the ``small`` prune type, all but the ``k`` smallest), and
* the minor part of rank ``k = round(r * min(W.shape))`` (``k = r`` for a whole number ``r >= 1``,
  an absolute rank as in SeTAR's ``lora_settings``; :func:`~locoop.setar.lowrank.n_removed`), which becomes a LoRA adapter with
  ``A = sqrt(S_minor) V_minor^T`` (``[k, in]``), ``B = U_minor sqrt(S_minor)`` (``[out, k]``) and
  scaling 1,

so ``base + B A == W`` and the adapted model starts equal to the unpruned one (up to float error).
Which components are "minor" follows the prune type of the search (``small`` / ``large`` /
``random``), using :class:`~locoop.setar.lowrank.LowRankEditor`'s SVD and component choice.

Plain LoRA (the baseline): one rank on the configured weight types of every block of both towers,
peft's default initialisation (``A`` Kaiming-uniform, ``B = 0``, so the model also starts unchanged)
and scaling ``alpha / rank``.

Both backbones are addressed the same way (:func:`locoop.setar.lowrank.get_linear`): a CLIP's
``(tower, weight_type, block)``, a Swin-V2 classifier's ``("visual", weight_type, (stage, block))`` (SeTAR's
Swin naming; no ``W_p``, one tower). Descriptions store a Swin layer as a JSON list ``[stage, block]``.

Implementation: the adapters are peft LoRA layers (``peft.inject_adapter_in_model``, in place, no
wrapper model), so the model keeps its module names and its own forward -- the one evaluation uses.
peft fits because every SeTAR matrix is its own ``nn.Linear`` in our CLIP (split q/k/v, bias-free
projections). Two details need care:

* module names of the two towers overlap as suffixes (``transformer.resblocks.0.mlp.c_fc`` is the
  text block and also the tail of ``visual.transformer.resblocks.0.mlp.c_fc``), and peft matches a
  list of names by suffix; so the targets are passed as one anchored regular expression (peft
  full-matches a string), and the per-module ``rank_pattern`` / ``alpha_pattern`` keys are anchored
  with ``^``. After injection every layer's rank and scaling are checked, so a change in peft's
  matching cannot go unnoticed.
* peft freezes everything but the adapters; biases stay frozen (``bias="none"``).

:class:`AdapterSet` gathers the adapter parameters (shared, not copied) in a small module whose
``state_dict`` holds only ``A`` / ``B`` of every adapter plus a description (``_extra_state``): the
adapter kind, the adapted matrices with ranks and scalings, the SeTAR settings / prune type or
the LoRA rank and alpha, the backbone name and a SHA-256 of the base model's weights. Loading
checks that description against the model it is loaded into before any tensor is copied, so a
checkpoint never silently lands on another base model or other settings.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from locoop.engine.provenance import cached_weights_sha256, check_backbone_hash

from .lowrank import (BLOCK_WEIGHT_TYPES, LowRankEditor, get_linear, is_block_model, n_removed, normalize_layer,
                      num_layers)
from .settings import validate_settings

__all__ = [
    "ADAPTER_KINDS",
    "ADAPTER_NAME",
    "META_FORMAT",
    "AdapterSet",
    "base_weights_sha256",
    "module_name",
    "add_setar_adapters",
    "add_lora_adapters",
    "lora_targets",
    "adapters_from_meta",
    "check_compatible",
]

ADAPTER_KINDS: Tuple[str, ...] = ("setar", "lora")
ADAPTER_NAME = "default"  # peft adapter name
META_FORMAT = 1

Key = Tuple[str, str, Any]  # (tower, weight_type, layer): layer int, (stage, block) or None
Tensor = torch.Tensor


# ============================================================================ addressing / hashing
def module_name(model: nn.Module, tower: str, weight_type: str, layer: Any = None) -> str:
    """Dotted name (as in ``model.named_modules()``) of the ``nn.Linear`` of one SeTAR matrix."""
    target = get_linear(model, tower, weight_type, layer)
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ValueError(f"{_describe((tower, weight_type, layer))} is not a submodule of the model")  # pragma: no cover


def _format_layer(layer: Any) -> str:
    """A layer for messages: ``11`` (CLIP) or ``[3, 1]`` (Swin-V2)."""
    if isinstance(layer, (list, tuple)):
        return "[" + ", ".join(str(v) for v in layer) + "]"
    return str(layer)


def _describe(key: Key) -> str:
    tower, weight_type, layer = key
    return f"{tower} {weight_type}" + ("" if layer is None else f" layer {_format_layer(layer)}")


def _key(key: Sequence) -> Key:
    """A matrix address as a dict key (a Swin ``[stage, block]`` list becomes a tuple)."""
    tower, weight_type, layer = key
    return tower, weight_type, normalize_layer(layer)


def _plain_layer(layer: Any) -> Any:
    """A layer as stored in descriptions and JSON: a Swin ``(stage, block)`` as a list."""
    return list(layer) if isinstance(layer, tuple) else layer


def _param_key(key: Key, which: str) -> str:
    # ParameterDict names may not contain '.', so SeTAR's address is joined with ':' (a Swin layer as
    # stage_block).
    tower, weight_type, layer = key
    if layer is None:
        token = "-"
    elif isinstance(layer, (list, tuple)):
        token = "_".join(str(v) for v in layer)
    else:
        token = str(layer)
    return f"{tower}:{weight_type}:{token}:{which}"


def base_weights_sha256(model: nn.Module) -> str:
    """:func:`locoop.engine.provenance.weights_sha256` of the base model (before adapters are injected).

    Identifies the base model independently of its file format or location (a TorchScript archive
    and a state-dict file of the same weights hash the same). Computed once per model object while its
    weights are unchanged (:func:`locoop.engine.provenance.cached_weights_sha256`); for the fp32 model
    SeTAR+FT requires it equals the backbone hash a prompt checkpoint records.
    """
    return cached_weights_sha256(model)


# ============================================================================ peft injection
def _inject(model: nn.Module, targets: Mapping[str, Tuple[int, float]], init_lora_weights: bool,
            dropout: float) -> Dict[str, nn.Module]:
    """Inject peft LoRA layers on exactly the named modules, with per-module rank and alpha.

    Returns:
        module name -> the peft layer that replaced it.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    names = list(targets)
    already = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if already:
        raise ValueError(f"the model already carries LoRA adapters ({', '.join(already[:3])}...); "
                         "load a fresh copy of the backbone before adding adapters")
    first_rank, first_alpha = next(iter(targets.values()))
    config = LoraConfig(
        r=int(first_rank), lora_alpha=float(first_alpha),
        target_modules="|".join(re.escape(n) for n in names),  # a string: peft full-matches it
        rank_pattern={"^" + re.escape(n): int(r) for n, (r, _) in targets.items()},
        alpha_pattern={"^" + re.escape(n): float(a) for n, (_, a) in targets.items()},
        lora_dropout=float(dropout), bias="none", init_lora_weights=init_lora_weights,
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    modules = dict(model.named_modules())
    layers = {}
    for name, (rank, alpha) in targets.items():
        layer = modules.get(name)
        if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
            raise RuntimeError(f"peft did not put a LoRA adapter on {name}")
        got_r = layer.lora_A[ADAPTER_NAME].weight.shape[0]
        got_s = float(layer.scaling[ADAPTER_NAME])
        if got_r != rank or not math.isclose(got_s, alpha / rank, rel_tol=1e-6):
            raise RuntimeError(f"peft gave {name} rank {got_r} and scaling {got_s}, expected rank {rank} and "
                               f"scaling {alpha / rank}; its pattern matching may have changed")
        layers[name] = layer
    extra = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and n not in targets]
    if extra:
        raise RuntimeError(f"peft put adapters on modules that were not asked for: {extra}")
    return layers


# ============================================================================ AdapterSet
class AdapterSet(nn.Module):
    """The adapters of one model: their parameters (shared with the peft layers) and description.

    ``state_dict()`` = ``params.<tower>:<type>:<layer>:A`` / ``...:B`` plus ``_extra_state`` (the
    description, plain values only). :meth:`load_state_dict` checks the description first (see
    :func:`check_compatible`) and copies nothing when it differs.

    An empty set (``meta is None``) can be filled later with :meth:`attach` (used when the
    adapters are rebuilt from a checkpoint's description).
    """

    def __init__(self) -> None:
        super().__init__()
        self.params = nn.ParameterDict()
        self.meta: Optional[dict] = None
        self._layers: Dict[Key, nn.Module] = {}
        self._names: Dict[Key, str] = {}
        self.source = "the checkpoint"  # named in load errors (trainers set the file path)

    # ------------------------------------------------------------------ filling
    def attach(self, meta: dict, layers: Mapping[Key, nn.Module], names: Mapping[Key, str]) -> "AdapterSet":
        """Adopt injected peft layers (their ``A``/``B`` parameters are shared, not copied)."""
        if self.meta is not None:
            raise RuntimeError("this AdapterSet already holds adapters")
        for key, layer in layers.items():
            self.params[_param_key(key, "A")] = layer.lora_A[ADAPTER_NAME].weight
            self.params[_param_key(key, "B")] = layer.lora_B[ADAPTER_NAME].weight
        self._layers = dict(layers)
        self._names = dict(names)
        self.meta = meta
        return self

    @property
    def attached(self) -> bool:
        return self.meta is not None

    @property
    def kind(self) -> Optional[str]:
        return None if self.meta is None else self.meta["kind"]

    def keys(self) -> List[Key]:
        """Adapted matrices as ``(tower, weight_type, layer)``, in the order they were added."""
        return list(self._layers)

    def layer(self, key: Key) -> nn.Module:
        """The peft layer of one adapted matrix."""
        return self._layers[_key(key)]

    def towers(self) -> set:
        """Towers with at least one adapter."""
        return {k[0] for k in self._layers}

    def ranks(self) -> Dict[Key, int]:
        return {k: int(layer.lora_A[ADAPTER_NAME].weight.shape[0]) for k, layer in self._layers.items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def delta_weight(self, key: Key) -> Tensor:
        """``scaling * B @ A`` of one adapter (what it adds to the base weight)."""
        layer = self.layer(key)
        a = layer.lora_A[ADAPTER_NAME].weight
        b = layer.lora_B[ADAPTER_NAME].weight
        return float(layer.scaling[ADAPTER_NAME]) * (b @ a)

    def merged_weight(self, key: Key) -> Tensor:
        """The effective weight ``base + scaling * B @ A`` of one adapted matrix."""
        base = self.layer(key).get_base_layer().weight
        return base + self.delta_weight(key).to(base.dtype)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "AdapterSet":
        # The adapters live inside the CLIP model, not under this module: switch them too
        # (LoRA dropout), leaving the rest of CLIP as it is.
        super().train(mode)
        for layer in self._layers.values():
            layer.train(mode)
        return self

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return copy.deepcopy(self.meta) if self.meta is not None else {}

    def set_extra_state(self, state: dict) -> None:
        # Checked (with a clear message) in load_state_dict before anything is copied.
        pass

    def load_state_dict(self, state_dict: Mapping[str, object], strict: bool = True, assign: bool = False,
                        source: Optional[str] = None):
        """Check the saved description against this set, then load ``A`` / ``B``.

        Raises:
            ValueError: no description, or another base model, adapter kind, settings or ranks.
        """
        source = source or self.source
        saved = state_dict.get("_extra_state")
        if not isinstance(saved, dict) or not saved:
            raise ValueError(f"{source} holds no adapter description ('_extra_state'); it was not written by the "
                             "SeTARFT / LoRA trainers")
        if self.meta is None:
            raise ValueError(f"no adapters were built to load {source} into; rebuild them from its description "
                             "first (adapters_from_meta)")
        check_compatible(saved, self.meta, source)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ============================================================================ compatibility
def _modules_list(meta: Mapping) -> list:
    return [[m[0], m[1], _plain_layer(normalize_layer(m[2]))] + list(m[3:]) for m in meta.get("modules", [])]


def _fmt_modules(mods: Sequence) -> str:
    parts = [f"{t} {w}{'' if l is None else ' ' + _format_layer(l)} (rank {r})" for t, w, l, r, *_ in mods]
    return ", ".join(parts[:6]) + (f", ... ({len(parts)} in all)" if len(parts) > 6 else "") if parts else "none"


def check_compatible(saved: Mapping, current: Mapping, source: str = "the checkpoint") -> None:
    """Refuse adapters saved for another base model, adapter kind, settings or ranks.

    Args:
        saved: the description stored with the adapters.
        current: the description of the adapters built here.
        source: where ``saved`` comes from (for messages).

    Raises:
        ValueError: naming what differs and how to load the checkpoint correctly.
    """
    if int(saved.get("format", -1)) != META_FORMAT:
        raise ValueError(f"{source}: adapter description format {saved.get('format')!r}, expected {META_FORMAT}")
    if saved.get("kind") != current.get("kind"):
        raise ValueError(f"{source} holds {saved.get('kind')!r} adapters but this run builds {current.get('kind')!r} "
                         "adapters; use the trainer that wrote it (SeTARFT for 'setar', LoRA for 'lora')")
    if saved.get("base_sha256") != current.get("base_sha256"):
        raise ValueError(
            f"{source} was fine-tuned on another base model: weights sha256 {str(saved.get('base_sha256'))[:16]}... "
            f"(backbone {saved.get('backbone')!r}) but this run's base is {str(current.get('base_sha256'))[:16]}... "
            f"(backbone {current.get('backbone')!r}); set MODEL.BACKBONE.NAME to the checkpoint's backbone")
    if saved.get("kind") == "setar":
        for field in ("prune_type",) + (("seed",) if saved.get("prune_type") == "random" else ()):
            if saved.get(field) != current.get(field):
                raise ValueError(f"{source} split the weights with {field} {saved.get(field)!r}, this run with "
                                 f"{current.get(field)!r}; set SETAR.PRUNE_TYPE / SEED as in the fine-tuning run")
    a, b = _modules_list(saved), _modules_list(current)
    if a != b:
        what = ("SeTAR settings" if saved.get("kind") == "setar" else "LoRA targets (SETAR.WEIGHT_TYPES, "
                "SETAR.FREEZE_PROJ, SETAR.FT.LORA_RANK / LORA_ALPHA)")
        fix = ("pass the fine-tuning run's best_settings.json as --settings (SETAR.SETTINGS_FILE), or leave it "
               "empty to rebuild the adapters from the checkpoint" if saved.get("kind") == "setar"
               else "use the fine-tuning run's config")
        raise ValueError(f"{source} adapts other matrices or ranks ({what} differ): saved {_fmt_modules(a)}; "
                         f"this run {_fmt_modules(b)}. Fix: {fix}")


# ============================================================================ builders
def add_setar_adapters(model: nn.Module, settings: Iterable[Sequence], prune_type: str = "small", seed: int = 0,
                       dropout: float = 0.0, backbone: str = "", base_sha256: Optional[str] = None) -> AdapterSet:
    """Split every matrix with a non-zero ratio into a frozen principal base and a trainable adapter.

    Args:
        model: a :class:`clip.model.CLIP` or a Swin-V2 classifier in float32, without adapters
            (modified in place).
        settings: ``[[tower, weight_type, layer, ratio], ...]`` (a SeTAR search's best settings;
            Swin-V2 layers ``[stage, block]``); entries whose ratio removes no component are skipped.
        prune_type: which components form the adapter (``small``: the smallest, SeTAR+FT).
        seed: seed of the ``random`` prune type (as in the search).
        dropout: LoRA dropout on the adapter input.
        backbone: the backbone name, recorded in the description.
        base_sha256: :func:`base_weights_sha256` of ``model`` if already computed.

    Returns:
        The :class:`AdapterSet` (model output unchanged up to float error).

    Raises:
        ValueError: invalid settings (unknown tower/type, missing layer, bad ratio, a matrix listed
            twice), no entry with a non-zero rank, or a model that is not float32 -- all checked
            before the model is changed.
    """
    checked = validate_settings(settings, model)
    if model.dtype != torch.float32:
        raise ValueError(f"SeTAR+FT splits float32 weights; the model is {model.dtype} (load it in fp32)")
    entries = []
    for tower, weight_type, layer, ratio in checked:
        lin = get_linear(model, tower, weight_type, layer)
        k = n_removed(ratio, tuple(lin.weight.shape), _describe((tower, weight_type, layer)))
        if k > 0:
            entries.append(((tower, weight_type, layer), ratio, k))
    if not entries:
        raise ValueError("the settings prune no matrix (every ratio is 0 or rounds to 0 components): there is "
                         "nothing to fine-tune; give the best_settings.json of a search that pruned something")
    if base_sha256 is None:
        base_sha256 = base_weights_sha256(model)
    editor = LowRankEditor(model, prune_type=prune_type, seed=seed)
    split = {}
    with torch.no_grad():
        for key, ratio, k in entries:
            u, s, vh = editor.svd(*key)
            idx = editor.removed_indices(*key, k).to(s.device)
            root = s[idx].sqrt()
            a = root[:, None] * vh[idx]          # [k, in]
            b = u[:, idx] * root[None, :]         # [out, k]
            base = editor.pruned_weight(*key, ratio)
            split[key] = (base, a, b)
    names = {key: module_name(model, *key) for key, _, _ in entries}
    layers_by_name = _inject(model, {names[key]: (k, float(k)) for key, _, k in entries},
                             init_lora_weights=False, dropout=dropout)
    layers = {}
    with torch.no_grad():
        for key, _, _ in entries:
            layer = layers_by_name[names[key]]
            base, a, b = split[key]
            layer.get_base_layer().weight.copy_(base)
            layer.lora_A[ADAPTER_NAME].weight.copy_(a)
            layer.lora_B[ADAPTER_NAME].weight.copy_(b)
            layers[key] = layer
    meta = {
        "format": META_FORMAT, "kind": "setar", "backbone": str(backbone), "base_sha256": base_sha256,
        "settings": [[t, w, _plain_layer(l), float(r)] for (t, w, l), r, _ in entries],
        "prune_type": prune_type, "seed": int(seed),
        "modules": [[t, w, _plain_layer(l), int(k), 1.0] for (t, w, l), _, k in entries],
    }
    return AdapterSet().attach(meta, layers, names)


def lora_targets(model: nn.Module, weight_types: Sequence[str], include_proj: bool = False) -> List[Key]:
    """Every block's ``weight_types`` in both towers (bottom to top), plus ``W_p`` when asked.

    A Swin-V2 classifier: every block of every stage (forward order) of its one tower; it has no ``W_p``.

    Raises:
        ValueError: unknown weight type, a ResNet image tower (no transformer blocks), or
            ``include_proj`` on a Swin-V2.
    """
    types = list(weight_types)
    bad = [t for t in types if t not in BLOCK_WEIGHT_TYPES]
    if bad or not types or len(set(types)) != len(types):
        raise ValueError(f"LoRA weight types must be distinct entries of {', '.join(BLOCK_WEIGHT_TYPES)}; got {types} "
                         "(the projections W_p are added with SETAR.FREEZE_PROJ False)")
    swin = is_block_model(model)
    if swin and include_proj:
        raise ValueError("a Swin-V2 classifier has no projection W_p (its classifier head is not adapted); set "
                         "SETAR.FREEZE_PROJ True")
    keys: List[Key] = []
    for tower in ("visual",) if swin else ("visual", "text"):
        layers = model.layers() if swin else range(num_layers(model, tower))  # Swin: (stage, block), forward order
        for layer in layers:
            keys.extend((tower, t, layer) for t in types)
        if include_proj:
            keys.append((tower, "W_p", None))
    return keys


def add_lora_adapters(model: nn.Module, weight_types: Sequence[str], rank: int, alpha: float,
                      include_proj: bool = False, dropout: float = 0.0, backbone: str = "",
                      base_sha256: Optional[str] = None) -> AdapterSet:
    """Plain LoRA (SeTAR's baseline): rank ``rank`` on every block's ``weight_types`` in both towers.

    peft's default initialisation (``A`` Kaiming-uniform from torch's global generator, ``B = 0``),
    scaling ``alpha / rank``. Base weights are unchanged.

    Raises:
        ValueError: bad weight types, a rank < 1 or above a target's ``min(shape)``, alpha <= 0.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"SETAR.FT.LORA_RANK must be a positive integer, got {rank!r}")
    if not float(alpha) > 0:
        raise ValueError(f"SETAR.FT.LORA_ALPHA must be > 0, got {alpha!r}")
    keys = lora_targets(model, weight_types, include_proj)
    for key in keys:
        shape = tuple(get_linear(model, *key).weight.shape)
        if rank > min(shape):
            raise ValueError(f"SETAR.FT.LORA_RANK {rank} exceeds the rank of {_describe(key)} (shape {shape})")
    if base_sha256 is None:
        base_sha256 = base_weights_sha256(model)
    names = {key: module_name(model, *key) for key in keys}
    layers_by_name = _inject(model, {names[k]: (rank, float(alpha)) for k in keys}, init_lora_weights=True,
                             dropout=dropout)
    layers = {k: layers_by_name[names[k]] for k in keys}
    meta = {
        "format": META_FORMAT, "kind": "lora", "backbone": str(backbone), "base_sha256": base_sha256,
        "weight_types": list(weight_types), "include_proj": bool(include_proj), "lora_rank": int(rank),
        "lora_alpha": float(alpha),
        "modules": [[t, w, _plain_layer(l), int(rank), float(alpha) / rank] for (t, w, l) in keys],
    }
    return AdapterSet().attach(meta, layers, names)


def adapters_from_meta(model: nn.Module, meta: Mapping, dropout: float = 0.0, backbone: str = "",
                       base_sha256: Optional[str] = None, target: Optional[AdapterSet] = None) -> AdapterSet:
    """Rebuild the adapters a description (a checkpoint's ``_extra_state``) names, on a fresh model.

    The base is rebuilt deterministically (SeTAR: the SVD split of the same settings); the adapter
    weights are whatever the builders initialise -- load the checkpoint afterwards.

    Args:
        target: an empty :class:`AdapterSet` to fill (e.g. one already registered with a trainer).

    Raises:
        ValueError: unknown kind, or a model that is not the described base.
    """
    kind = meta.get("kind")
    if base_sha256 is None:
        base_sha256 = base_weights_sha256(model)
    # No key accepts another base: the SeTAR base is the SVD split of these very weights.
    check_backbone_hash(meta.get("base_sha256"), meta.get("backbone"), base_sha256, backbone, "the description",
                        "the adapters were fine-tuned")
    if kind == "setar":
        built = add_setar_adapters(model, meta["settings"], prune_type=meta.get("prune_type", "small"),
                                   seed=int(meta.get("seed", 0)), dropout=dropout, backbone=backbone,
                                   base_sha256=base_sha256)
    elif kind == "lora":
        built = add_lora_adapters(model, meta["weight_types"], int(meta["lora_rank"]), float(meta["lora_alpha"]),
                                  include_proj=bool(meta.get("include_proj", False)), dropout=dropout,
                                  backbone=backbone, base_sha256=base_sha256)
    else:
        raise ValueError(f"unknown adapter kind {kind!r} in the description; valid kinds: {', '.join(ADAPTER_KINDS)}")
    check_compatible(meta, built.meta)
    if target is None:
        return built
    return target.attach(built.meta, built._layers, built._names)
