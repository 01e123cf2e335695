"""Swin Transformer V2 image classifiers (Hugging Face ``Swinv2ForImageClassification``) for OOD detection.

SeTAR (Li et al., NeurIPS 2024) also runs on a vision-only model, Swin-V2-B
(``microsoft/swinv2-base-patch4-window16-256``). Its scores and its LoCoOp-loss criterion read two outputs:

* **global logits** ``[B, K]``: the classifier's normal output -- the last stage's tokens through the
  final LayerNorm, averaged over positions (``AdaptiveAvgPool1d(1)``), then the classifier;
* **local logits** ``[B, N, K]``: one class-logit vector per position of the last stage's grid
  (``N = H * W``, row-major). The input ``x`` of the *last block of the last stage* goes through that
  block's **value path** instead of its attention: per position, the value projection (with bias),
  the attention output projection, the block's post-norm ``layernorm_before``, the residual ``+ x``;
  then the block's MLP (``intermediate`` + GELU, ``output``), its post-norm ``layernorm_after`` and
  the second residual; then the model's final LayerNorm and the classifier -- no pooling.

No query, key, softmax, relative position bias or shift mask enters the value path. SeTAR's code
(``X1AOX1A/SeTAR``, ``src/svd_ood/svd_ood/models/swinv2/modeling_swinv2.py``, ``Swinv2Layer.forward``
``local_feat``) runs it on the padded, cyclically shifted window partition and undoes both
afterwards; every operation in it acts on each position alone, so that round trip is a permutation
and computing the path on the unpartitioned positions gives the same numbers (tested). SeTAR also
computes this path in every block of every stage and passes it through the patch merging, but
keeps only the last block's (:meth:`SwinV2Classifier.reference_forward` does that, for a naive
twin that costs what the reference costs); :meth:`SwinV2Classifier.forward_from` computes it once.

The scores then treat the logits as CLIP's cosines: ``MCM = max softmax(logits / T)``,
``energy = T * logsumexp(logits / T)``, ``GL-MCM = MCM + max over positions of the local MCM``
(SeTAR ``scorers.py``). SeTAR's training-free Swin configs use ``T = 1``, its fine-tuning configs
``T = 100``; its LoCoOp loss takes the raw logits (no scale).

Block-level access (for SeTAR's cached search). Blocks are numbered ``0 .. num_blocks - 1`` across
stages in forward order; SeTAR names them ``[stage, block]`` (``[3, 1]`` = stage 3, block 1). A
hidden state is a ``[B, H, W, C]`` tensor: the input of one block. The patch merging that ends a
stage (``swinv2.encoder.layers[s].downsample``) belongs to the step from that stage's last block to
the next stage's first, so the state entering block ``i`` is always well defined and a prefix cache
can resume at any block (:meth:`~SwinV2Classifier.stem`, :meth:`~SwinV2Classifier.run_blocks`,
:meth:`~SwinV2Classifier.forward_from`).

Searchable matrices per block (SeTAR ``model_hub.py``, ``SwinTransformerV2.get_weight_name``), each one
``nn.Linear`` of the Hugging Face model, named as in its state dict:

=========  =============================================================
``W_q``    ``swinv2.encoder.layers.{stage}.blocks.{block}.attention.self.query``
``W_k``    ``swinv2.encoder.layers.{stage}.blocks.{block}.attention.self.key`` (no bias)
``W_v``    ``swinv2.encoder.layers.{stage}.blocks.{block}.attention.self.value``
``W_o``    ``swinv2.encoder.layers.{stage}.blocks.{block}.attention.output.dense``
``W_up``   ``swinv2.encoder.layers.{stage}.blocks.{block}.intermediate.dense``
``W_down`` ``swinv2.encoder.layers.{stage}.blocks.{block}.output.dense``
=========  =============================================================

:class:`SwinV2Classifier` keeps the Hugging Face modules under their own names (``swinv2``,
``classifier``), so its ``state_dict`` keys, its module names (LoRA targets) and SeTAR's names agree.

Loading (:func:`load_swinv2`) needs Hugging Face ``transformers`` (``pip install 'locoop-ood[swin]'``):
a snapshot directory as ``save_pretrained`` writes it, a Hub-cache folder
(``models--microsoft--swinv2-base-patch4-window16-256`` or one of its ``snapshots/<hash>``), or a repo
id looked up in the local Hub cache (never downloaded). Weights are read with safetensors, or with
``torch.load(weights_only=True)`` for ``pytorch_model.bin``; nothing is unpickled otherwise.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "refuse_swinv2_backbone",
    "SETAR_SWIN_MODEL",
    "WEIGHT_TYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SETAR_CROP_PCT",
    "SwinLinear",
    "SwinV2Classifier",
    "require_transformers",
    "default_hub_cache",
    "resolve_snapshot",
    "is_swinv2_backbone",
    "read_swinv2_config",
    "load_swinv2",
    "build_swin_preprocess",
    "build_swin_train_preprocess",
    "tiny_swinv2_config",
    "make_tiny_swinv2",
    "save_snapshot",
]

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]
Layer = Tuple[int, int]

SETAR_SWIN_MODEL = "microsoft/swinv2-base-patch4-window16-256"
WEIGHT_TYPES: Tuple[str, ...] = ("W_q", "W_k", "W_v", "W_o", "W_up", "W_down")
# weight type -> module path inside one Swinv2Layer (SeTAR's get_weight_name)
_WEIGHT_PATHS: Dict[str, str] = {
    "W_q": "attention.self.query",
    "W_k": "attention.self.key",
    "W_v": "attention.self.value",
    "W_o": "attention.output.dense",
    "W_up": "intermediate.dense",
    "W_down": "output.dense",
}
_BLOCK_PREFIX = "swinv2.encoder.layers.{stage}.blocks.{block}"

# timm's evaluation transform of ``swinv2_base_window16_256.ms_in1k``, which SeTAR copies
# (model_hub.py SwinTransformerV2.val_preprocess): resize the shorter side to floor(256 / 0.9),
# bicubic, centre crop 256, ImageNet mean / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SETAR_CROP_PCT = 0.9

_INSTALL_HINT = "pip install 'locoop-ood[swin]'  (or: pip install transformers)"
# Index buffers that transformers recomputes from the config; older exports may still carry them.
_RECOMPUTED_BUFFERS = (".relative_coords_table", ".relative_position_index")


# ============================================================================ dependency
def require_transformers():
    """Import and return ``transformers``; a one-line error naming the extra when it is missing."""
    try:
        import transformers
        from transformers import Swinv2Config, Swinv2ForImageClassification  # noqa: F401
    except ImportError as err:
        raise ImportError(f"Swin-V2 backbones need Hugging Face transformers >= 4.37 ({err}); install it with: "
                          f"{_INSTALL_HINT}") from None
    return transformers


# ============================================================================ snapshots
def default_hub_cache() -> Path:
    """The Hugging Face Hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _snapshot_of_repo_folder(folder: Path, revision: str) -> Path:
    """``snapshots/<hash>`` of a Hub-cache ``models--org--name`` folder."""
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        raise FileNotFoundError(f"{folder} has no snapshots/ folder; a Hugging Face Hub-cache model folder "
                                "(models--<org>--<name>) holds snapshots/<commit hash>/config.json")
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
        raise FileNotFoundError(f"{ref} names commit {commit!r} but {snapshots / commit} does not exist "
                                "(an incomplete download?); pass one of the snapshot folders directly")
    if re.fullmatch(r"[0-9a-f]{40}", revision) and (snapshots / revision).is_dir():
        return snapshots / revision
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{snapshots} is empty; download the model first")
    raise ValueError(f"{folder} has no refs/{revision} and {len(found)} snapshots "
                     f"({', '.join(p.name for p in found)}); pass the snapshot folder to use")


def resolve_snapshot(path: PathLike, cache_dir: Optional[PathLike] = None, revision: str = "main") -> Path:
    """Find the snapshot directory (``config.json`` + weights) that ``path`` designates.

    Args:
        path: a snapshot directory (what ``save_pretrained`` writes, or a Hub cache's
            ``models--org--name/snapshots/<hash>``), a Hub-cache model folder ``models--org--name``,
            or a repo id such as ``microsoft/swinv2-base-patch4-window16-256`` looked up in the
            local Hub cache (nothing is downloaded).
        cache_dir: Hub cache to search for a repo id (default :func:`default_hub_cache`).
        revision: the ``refs/`` entry (or commit hash) of a Hub-cache model folder.

    Raises:
        FileNotFoundError: nothing usable found (the message says where it looked).
        ValueError: several snapshots and no ref to choose one.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        text = os.fspath(path)
        if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
            cache = Path(os.fspath(cache_dir)).expanduser() if cache_dir is not None else default_hub_cache()
            folder = cache / ("models--" + text.replace("/", "--"))
            if folder.is_dir():
                return resolve_snapshot(folder, revision=revision)
            raise FileNotFoundError(
                f"{text!r} is neither a folder nor in the Hugging Face cache ({folder} does not exist); download "
                f"it where there is internet (huggingface-cli download {text}) and copy the cache folder, or "
                "pass the snapshot folder (config.json + model.safetensors) directly")
        raise FileNotFoundError(f"Swin-V2 snapshot {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"{p} is a file; a Swin-V2 model is a Hugging Face snapshot folder with config.json and "
                         "model.safetensors (or pytorch_model.bin)")
    if (p / "config.json").is_file():
        from clip.hf import is_hf_snapshot  # the project's one definition of "config.json + weights"

        if not is_hf_snapshot(p):
            raise FileNotFoundError(f"{p} has config.json but no weights (model.safetensors, pytorch_model.bin or "
                                    "a sharded *.index.json; in a Hub cache, a dangling link means an incomplete "
                                    "download)")
        return p
    if (p / "snapshots").is_dir():
        return resolve_snapshot(_snapshot_of_repo_folder(p, revision))
    raise FileNotFoundError(f"{p} is not a Hugging Face snapshot: no config.json (and no snapshots/ folder of a "
                            "Hub-cache models--<org>--<name> folder)")


def is_swinv2_backbone(name: str) -> bool:
    """Whether ``MODEL.BACKBONE.NAME`` designates a Swin-V2 classifier rather than a CLIP model.

    True for a folder whose ``config.json`` (or whose Hub-cache snapshot's) says ``model_type
    "swinv2"``, and for a name that is not a folder but contains ``swinv2`` (a Hub repo id such as
    ``microsoft/swinv2-base-patch4-window16-256``: :func:`load_swinv2` then finds it in the local
    cache or says where to put it). CLIP names (``ViT-B/16``, ``RN50``, a ``.pt`` file, an
    ``openai/clip-*`` snapshot) give False.
    """
    text = str(name or "").strip()
    if not text:
        return False
    p = Path(text).expanduser()
    if p.is_dir():
        try:
            cfg_path = resolve_snapshot(p) / "config.json"
            return json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type") == "swinv2"
        except (OSError, ValueError):
            return False
    return not p.exists() and "swinv2" in text.lower()


def refuse_swinv2_backbone(name: str, command: str, needs: str) -> None:
    """Stop ``command`` before any work when ``name`` is a Swin-V2 classifier (:func:`is_swinv2_backbone`).

    Args:
        name: ``MODEL.BACKBONE.NAME``.
        command: The refusing command (``extract``, ``visualize``).
        needs: What it needs that a classifier lacks, e.g. "CLIP image features to cache".

    Raises:
        ValueError: one sentence naming the command, what it needs, the backbone and the fix.
    """
    if is_swinv2_backbone(name):
        raise ValueError(f"{command} needs {needs}; MODEL.BACKBONE.NAME {name!r} is a Swin-V2 classifier, which "
                         "has none (its evaluation is eval / setar-search). Give a CLIP backbone (e.g. --backbone "
                         "ViT-B/16)")


def read_swinv2_config(snapshot: PathLike) -> Dict[str, Any]:
    """``config.json`` of a snapshot, checked to describe a Swin-V2 image classifier.

    Raises:
        ValueError: another model type, or no classifier head.
    """
    path = Path(os.fspath(snapshot)) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    model_type = cfg.get("model_type")
    if model_type != "swinv2":
        hint = {"swin": "a Swin (V1) model; only Swin-V2 is supported",
                "clip": "a CLIP model; load it as the CLIP backbone (clip.load / MODEL.BACKBONE.NAME)"}
        raise ValueError(f"{path}: model_type is {model_type!r}, not 'swinv2' -- "
                         + hint.get(model_type, "expected a Swinv2ForImageClassification snapshot"))
    num_labels = cfg.get("num_labels", len(cfg.get("id2label") or {}))
    if not num_labels:
        raise ValueError(f"{path} describes a Swin-V2 without classes (no id2label / num_labels); SeTAR's Swin "
                         "scores need a Swinv2ForImageClassification snapshot with its classifier head")
    return cfg


def _load_weights(snapshot: Path) -> Dict[str, Tensor]:
    # The project's one reader of Hugging Face weight files (safetensors or weights_only torch.load, shards).
    from clip.hf import load_hf_weights

    return load_hf_weights(snapshot)


def load_swinv2(path: PathLike, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                cache_dir: Optional[PathLike] = None, revision: str = "main") -> "SwinV2Classifier":
    """Load a Swin-V2 image classifier from a local Hugging Face snapshot.

    Args:
        path: see :func:`resolve_snapshot` (snapshot folder, Hub-cache folder, or cached repo id).
        device: where to put the model.
        dtype: parameter dtype (SeTAR runs Swin-V2 in float32, the default).
        cache_dir, revision: see :func:`resolve_snapshot`.

    Returns:
        a :class:`SwinV2Classifier` in eval mode.

    Raises:
        ImportError: transformers is not installed (names the extra to install).
        FileNotFoundError / ValueError: not a Swin-V2 classifier snapshot, or weights that do not
            match its config (the message lists the offending keys).
    """
    require_transformers()
    from transformers import Swinv2Config, Swinv2ForImageClassification

    snapshot = resolve_snapshot(path, cache_dir=cache_dir, revision=revision)
    cfg = read_swinv2_config(snapshot)
    sd = _load_weights(snapshot)
    if not any(k.startswith("swinv2.") for k in sd):
        raise ValueError(f"{snapshot}: the weights have no 'swinv2.' keys -- this is a bare Swinv2Model (backbone) "
                         "export; SeTAR's Swin scores need Swinv2ForImageClassification weights (with classifier.*)")
    hf_model = Swinv2ForImageClassification(Swinv2Config.from_dict(cfg))
    own = hf_model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.endswith(_RECOMPUTED_BUFFERS)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{snapshot}: the weights do not match config.json -- missing {len(missing)} key(s) "
                         f"{missing[:5]}, unexpected {len(unexpected)} key(s) {unexpected[:5]}")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{snapshot}: {len(bad)} weight(s) have shapes other than config.json implies, e.g. "
                         f"{bad[0][0]} is {bad[0][1]} but the config gives {bad[0][2]}")
    hf_model.load_state_dict(sd, strict=True)
    model = SwinV2Classifier(hf_model, source=str(snapshot))
    return model.to(device=device, dtype=dtype).eval()


# ============================================================================ the model
@dataclass(frozen=True)
class SwinLinear:
    """One searchable matrix: ``layer`` = SeTAR's ``[stage, block]``, ``name`` = its module / state-dict name."""

    stage: int
    block: int
    weight_type: str
    name: str
    module: nn.Linear

    @property
    def layer(self) -> Layer:
        return (self.stage, self.block)


def _value_path(layer: nn.Module, x: Tensor) -> Tensor:
    """SeTAR's local-feature path of one Swinv2Layer, per position: ``x`` ``[B, L, C]`` -> ``[B, L, C]``."""
    v = layer.attention.output(layer.attention.self.value(x), x)
    h = x + layer.drop_path(layer.layernorm_before(v))
    return h + layer.drop_path(layer.layernorm_after(layer.output(layer.intermediate(h))))


def _windowed_value_path(layer: nn.Module, x: Tensor, dims: Tuple[int, int]) -> Tensor:
    """The same path the way SeTAR's ``local_feat`` runs it: pad, shift, window partition and back."""
    from transformers.models.swinv2.modeling_swinv2 import window_partition, window_reverse

    height, width = dims
    b, _, c = x.shape
    ws, shift = layer.window_size, layer.shift_size
    grid, pad = layer.maybe_pad(x.view(b, height, width, c), height, width)
    hp, wp = grid.shape[1], grid.shape[2]
    if shift > 0:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    windows = window_partition(grid, ws).view(-1, ws * ws, c)
    v = layer.attention.output(layer.attention.self.value(windows), None)
    grid = window_reverse(v.view(-1, ws, ws, c), ws, hp, wp)
    if shift > 0:
        grid = torch.roll(grid, shifts=(shift, shift), dims=(1, 2))
    v = grid[:, :height, :width, :].reshape(b, height * width, c)
    h = x + layer.drop_path(layer.layernorm_before(v))
    return h + layer.drop_path(layer.layernorm_after(layer.output(layer.intermediate(h))))


class SwinV2Classifier(nn.Module):
    """A Hugging Face ``Swinv2ForImageClassification`` with SeTAR's local logits and block-level access.

    The Hugging Face modules are used as they are (``self.swinv2``, ``self.classifier``; the same
    objects, not copies), so the full forward runs exactly the operations of the Hugging Face
    model and gives bit-identical logits, and an edit or adapter on any of its linear layers
    reaches every output.

    Args:
        hf_model: a ``transformers.Swinv2ForImageClassification`` (with a linear classifier).
        source: where the weights came from (for messages and run records).
    """

    def __init__(self, hf_model: nn.Module, source: Optional[str] = None) -> None:
        super().__init__()
        classifier = getattr(hf_model, "classifier", None)
        swinv2 = getattr(hf_model, "swinv2", None)
        if swinv2 is None or not isinstance(classifier, nn.Linear):
            what = type(hf_model).__name__ + ("" if swinv2 is None else " without classes (num_labels 0)")
            raise ValueError(f"expected a transformers Swinv2ForImageClassification with a linear classifier, "
                             f"got {what}")
        if swinv2.pooler is None:
            raise ValueError("the Swin-V2 model has no pooling layer; the classifier needs the averaged tokens")
        self.swinv2 = swinv2
        self.classifier = classifier
        self.__dict__["_hf"] = hf_model  # shares the modules above; kept out of the module tree
        self.config = hf_model.config
        self.source = source
        stages = self.swinv2.encoder.layers
        self.depths: Tuple[int, ...] = tuple(len(stage.blocks) for stage in stages)
        self.stage_dims: Tuple[int, ...] = tuple(int(stage.dim) for stage in stages)
        self._layers: List[Layer] = [(s, b) for s, d in enumerate(self.depths) for b in range(d)]
        self._index: Dict[Layer, int] = {layer: i for i, layer in enumerate(self._layers)}

    # ------------------------------------------------------------------ description
    @property
    def num_blocks(self) -> int:
        """Blocks over all stages (Swin-V2-B: 2 + 2 + 18 + 2 = 24)."""
        return len(self._layers)

    @property
    def num_classes(self) -> int:
        return int(self.classifier.out_features)

    @property
    def num_features(self) -> int:
        """Width of the last stage (the classifier's input)."""
        return int(self.classifier.in_features)

    @property
    def image_size(self) -> int:
        """The input side the model was trained at (``config.image_size``; 256 for SeTAR's Swin-V2-B)."""
        size = self.config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def dtype(self) -> torch.dtype:
        return self.classifier.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def to_hf(self) -> nn.Module:
        """The wrapped ``Swinv2ForImageClassification`` (shares every parameter with this model)."""
        return self._hf

    def final_grid(self, height: Optional[int] = None, width: Optional[int] = None) -> Tuple[int, int]:
        """``(H, W)`` of the last stage for an input of ``height x width`` pixels (default: ``image_size``)."""
        height = self.image_size if height is None else int(height)
        width = height if width is None else int(width)
        patch = self.config.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        h, w = -(-height // ph), -(-width // pw)  # the patch embedding pads to a multiple
        for _ in range(len(self.depths) - 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    # ------------------------------------------------------------------ layer addressing
    def layers(self) -> List[Layer]:
        """Every block as SeTAR's ``(stage, block)``, in forward order (reverse it for SeTAR's search order)."""
        return list(self._layers)

    def check_layer(self, layer: Sequence[int]) -> Layer:
        """Validate a SeTAR Swin layer ``[stage, block]`` and return it as a tuple.

        Raises:
            ValueError: not a pair of ints, or a stage / block the model does not have.
        """
        ok = (isinstance(layer, (list, tuple)) and len(layer) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in layer))
        if not ok:
            raise ValueError(f"a Swin-V2 layer is a [stage, block] pair of ints (SeTAR's naming, e.g. [3, 1] = "
                             f"stage 3, block 1), got {layer!r}")
        stage, block = int(layer[0]), int(layer[1])
        if not 0 <= stage < len(self.depths):
            raise ValueError(f"stage {stage} of layer {list(layer)} is outside 0..{len(self.depths) - 1} "
                             f"(blocks per stage: {list(self.depths)})")
        if not 0 <= block < self.depths[stage]:
            raise ValueError(f"block {block} of layer {list(layer)} is outside 0..{self.depths[stage] - 1} "
                             f"(stage {stage} has {self.depths[stage]} blocks; blocks per stage: {list(self.depths)})")
        return stage, block

    def block_index(self, layer: Sequence[int]) -> int:
        """Forward-order index ``0 .. num_blocks - 1`` of ``[stage, block]`` (the prefix-cache key)."""
        return self._index[self.check_layer(layer)]

    def block_layer(self, index: int) -> Layer:
        """``(stage, block)`` of a forward-order block index."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_blocks:
            raise ValueError(f"block index {index!r} is outside 0..{self.num_blocks - 1}")
        return self._layers[index]

    def _block(self, layer: Layer) -> nn.Module:
        stage, block = layer
        return self.swinv2.encoder.layers[stage].blocks[block]

    @staticmethod
    def _check_weight_type(weight_type: str) -> None:
        if weight_type not in _WEIGHT_PATHS:
            raise ValueError(f"unknown Swin-V2 weight type {weight_type!r}; valid weight types: "
                             f"{', '.join(WEIGHT_TYPES)} (Swin-V2 has no W_p: its classifier is not searched)")

    def module_name(self, weight_type: str, layer: Sequence[int]) -> str:
        """Dotted module name of one matrix, as SeTAR and the state dict spell it."""
        self._check_weight_type(weight_type)
        stage, block = self.check_layer(layer)
        return _BLOCK_PREFIX.format(stage=stage, block=block) + "." + _WEIGHT_PATHS[weight_type]

    def get_linear(self, weight_type: str, layer: Sequence[int]) -> nn.Linear:
        """The ``nn.Linear`` of one matrix (``weight_type`` of block ``[stage, block]``)."""
        self._check_weight_type(weight_type)
        module = self._block(self.check_layer(layer))
        for part in _WEIGHT_PATHS[weight_type].split("."):
            module = getattr(module, part)
        return module

    def linear_layers(self, weight_types: Sequence[str] = WEIGHT_TYPES) -> List[SwinLinear]:
        """Every searchable matrix, block by block in forward order, ``weight_types`` in the given order."""
        for wt in weight_types:
            self._check_weight_type(wt)
        return [SwinLinear(s, b, wt, self.module_name(wt, (s, b)), self.get_linear(wt, (s, b)))
                for s, b in self._layers for wt in weight_types]

    # ------------------------------------------------------------------ block-level forward
    def stem(self, images: Tensor) -> Tensor:
        """Patch embedding + its LayerNorm: images ``[B, 3, H, W]`` -> the state entering block 0 ``[B, h, w, C]``."""
        if images.ndim != 4 or images.shape[1] != self.config.num_channels:
            raise ValueError(f"expected images [B, {self.config.num_channels}, H, W], got {tuple(images.shape)}")
        emb, (h, w) = self.swinv2.embeddings(images.to(self.dtype))
        return emb.reshape(emb.shape[0], h, w, emb.shape[-1])

    def _check_state(self, h: Tensor, start: int) -> None:
        dim = self.stage_dims[self._layers[start][0]] if start < self.num_blocks else self.num_features
        if h.ndim != 4 or h.shape[-1] != dim:
            raise ValueError(f"the hidden state entering block {start} must be [B, H, W, {dim}], got {tuple(h.shape)}")

    def run_blocks(self, h: Tensor, start: int, end: int) -> Tensor:
        """Run blocks ``start .. end - 1`` on the state entering block ``start``; returns the state entering ``end``.

        A stage's patch merging runs right after its last block, so the state entering the first
        block of a stage is the merged one. ``end = num_blocks`` gives the last stage's output.
        """
        if not 0 <= start <= end <= self.num_blocks:
            raise ValueError(f"block range {start}..{end} outside 0..{self.num_blocks}")
        self._check_state(h, start)
        if start == end:
            return h
        b, height, width, c = h.shape
        x, dims = h.reshape(b, height * width, c), (height, width)
        stages = self.swinv2.encoder.layers
        for i in range(start, end):
            s, k = self._layers[i]
            x = stages[s].blocks[k](x, dims)[0]
            if k == self.depths[s] - 1 and stages[s].downsample is not None:
                x = stages[s].downsample(x, dims)
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        return x.reshape(b, dims[0], dims[1], x.shape[-1])

    def features_from(self, h: Tensor, start: int = 0, return_local: bool = True
                      ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Classifier inputs from the state entering block ``start``.

        Returns:
            pooled ``[B, D]`` (final LayerNorm, mean over positions), and if ``return_local`` the
            local features ``[B, N, D]`` (the last block's value path, final LayerNorm).
        """
        last = self.num_blocks - 1
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= last:
            raise ValueError(f"start block {start!r} outside 0..{last}")
        x = self.run_blocks(h, start, last)
        b, height, width, c = x.shape
        x = x.reshape(b, height * width, c)
        block = self._block(self._layers[last])
        seq = self.swinv2.layernorm(block(x, (height, width))[0])
        pooled = torch.flatten(self.swinv2.pooler(seq.transpose(1, 2)), 1)
        if not return_local:
            return pooled
        return pooled, self.swinv2.layernorm(_value_path(block, x))

    def forward_from(self, h: Tensor, start: int = 0, return_local: bool = False
                     ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Finish from the state entering block ``start``: logits ``[B, K]`` (and local logits ``[B, N, K]``)."""
        feats = self.features_from(h, start, return_local)
        if not return_local:
            return self.classifier(feats)
        return self.classifier(feats[0]), self.classifier(feats[1])

    def forward(self, images: Tensor, return_local: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Logits ``[B, K]``, or ``(logits [B, K], local logits [B, N, K])`` with ``N = H * W`` row-major."""
        return self.forward_from(self.stem(images), 0, return_local)

    def class_logits(self, images: Tensor, return_local: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """The OOD runner's logit-head interface (:mod:`locoop.ood.heads`): the same as :meth:`forward`."""
        return self.forward(images, return_local)

    def reference_forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """Global and local logits computed the way SeTAR's modified model does (the naive twin).

        Every block also runs the value path on its padded, shifted window partition; at the end
        of a stage the value states go through the patch merging as well; only the last block's
        survive. Same numbers as ``forward(images, return_local=True)`` up to float rounding, at
        the reference's cost.
        """
        x = self.stem(images)
        b, height, width, c = x.shape
        x, dims = x.reshape(b, height * width, c), (height, width)
        value = x
        for stage in self.swinv2.encoder.layers:
            for block in stage.blocks:
                value = _windowed_value_path(block, x, dims)
                x = block(x, dims)[0]
            if stage.downsample is not None:
                x, value = stage.downsample(x, dims), stage.downsample(value, dims)
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        seq = self.swinv2.layernorm(x)
        pooled = torch.flatten(self.swinv2.pooler(seq.transpose(1, 2)), 1)
        return self.classifier(pooled), self.classifier(self.swinv2.layernorm(value))

    def extra_repr(self) -> str:
        return (f"depths={list(self.depths)}, dims={list(self.stage_dims)}, classes={self.num_classes}, "
                f"image_size={self.image_size}, source={self.source!r}")


# ============================================================================ preprocessing
def build_swin_preprocess(n_px: int = 256, crop_pct: float = SETAR_CROP_PCT):
    """SeTAR's test-time transform for Swin-V2 (timm's eval transform of ``swinv2_base_window16_256``).

    RGB, resize the shorter side to ``floor(n_px / crop_pct)`` (284 for 256) bicubically, centre crop
    ``n_px``, to tensor, normalise with ImageNet's mean / std. (Not the Hugging Face image processor of
    the snapshot: SeTAR does not use it.)
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from clip.transform import convert_to_rgb

    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return T.Compose([
        convert_to_rgb,
        T.Resize(math.floor(n_px / crop_pct), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(n_px),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_swin_train_preprocess(n_px: int = 256):
    """SeTAR's training transform for Swin-V2 (SeTAR+FT / LoRA; timm's training transform, as SeTAR copies it).

    RGB, ``RandomResizedCrop(n_px, scale=(0.08, 1))`` bicubic, horizontal flip, colour jitter of
    brightness / contrast / saturation in ``[0.6, 1.4]``, to tensor, ImageNet mean / std.
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from clip.transform import convert_to_rgb

    return T.Compose([
        convert_to_rgb,
        T.RandomResizedCrop(n_px, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.6, 1.4)),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ============================================================================ tiny models / export
def tiny_swinv2_config(num_labels: int = 10, **overrides: Any):
    """A ``transformers.Swinv2Config`` for tests: 32 px, 2 px patches, window 4, 2 stages (16x16 then 8x8).

    Both stages' second block is shifted; ``overrides`` replace any field.
    """
    require_transformers()
    from transformers import Swinv2Config

    fields = dict(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                  window_size=4, mlp_ratio=2.0, drop_path_rate=0.0, num_labels=int(num_labels))
    fields.update(overrides)
    if fields["num_labels"] < 1:
        raise ValueError(f"num_labels must be >= 1, got {fields['num_labels']}")
    fields.setdefault("id2label", {i: f"class_{i}" for i in range(fields["num_labels"])})
    fields["label2id"] = {v: int(k) for k, v in fields["id2label"].items()}
    return Swinv2Config(**fields)


def make_tiny_swinv2(num_labels: int = 10, seed: int = 0, **overrides: Any) -> nn.Module:
    """A random-weight ``Swinv2ForImageClassification`` of :func:`tiny_swinv2_config`, in eval mode.

    Every parameter is random (biases, LayerNorm gains and the continuous position-bias MLP
    included, unlike the library's zero / one initialisation) so that tests see every term.
    """
    require_transformers()
    from transformers import Swinv2ForImageClassification

    config = tiny_swinv2_config(num_labels, **overrides)
    with torch.random.fork_rng(devices=[]):  # the library's own initialisation draws from the global RNG
        model = Swinv2ForImageClassification(config)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("logit_scale"):
                p.add_(0.1 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1] if p.ndim == 2 else p[0].numel()))
    return model.eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_snapshot(model: nn.Module, out: PathLike, fmt: str = "safetensors", hub_layout: bool = False,
                  repo_id: str = "local/tiny-swinv2") -> Path:
    """Write a Swin-V2 classifier as a Hugging Face snapshot; returns the snapshot folder.

    Args:
        model: a :class:`SwinV2Classifier` or a ``Swinv2ForImageClassification``.
        out: folder to write into. Plain layout: ``out/config.json`` + weights. Hub layout:
            ``out/models--<org>--<name>/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/...,
            refs/main}``, as the Hub cache stores a download.
        fmt: ``safetensors`` (``model.safetensors``, ``save_pretrained``'s default) or ``bin``
            (``pytorch_model.bin``, a ``torch.save``'d state dict as older exports have).
        hub_layout: write the Hub-cache layout instead of a plain folder.
        repo_id: ``org/name`` of the Hub-cache folder.

    Every file, the snapshot folder and the ref are written atomically (:mod:`clip.fileio`), so an
    interrupted write leaves no half-written snapshot.
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"unknown snapshot format {fmt!r}; valid formats: safetensors, bin")
    if hub_layout and not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    # The project's one set of atomic writers (temporary sibling + rename, the umask's permissions).
    from clip.fileio import atomic_copy, atomic_folder, atomic_write_text

    hf_model = model.to_hf() if isinstance(model, SwinV2Classifier) else model
    out = Path(os.fspath(out))
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".swinv2-", dir=out))  # what transformers writes, read back below
    try:
        if fmt == "safetensors":
            hf_model.save_pretrained(staging)
        else:
            hf_model.config.save_pretrained(staging)
            state = {k: v.detach().cpu().contiguous() for k, v in hf_model.state_dict().items()}
            torch.save(state, staging / "pytorch_model.bin")
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        if not hub_layout:
            for name in files:
                atomic_copy(staging / name, out / name)
            return out
        repo = out / ("models--" + repo_id.replace("/", "--"))
        hashes = {name: _sha256(staging / name) for name in files}
        commit = hashlib.sha1("".join(f"{n}:{h}\n" for n, h in hashes.items()).encode()).hexdigest()
        for name, digest in hashes.items():
            atomic_copy(staging / name, repo / "blobs" / digest)
        snapshot = repo / "snapshots" / commit
        with atomic_folder(snapshot) as snap_tmp:
            for name, digest in hashes.items():
                try:
                    os.symlink(os.path.join("..", "..", "blobs", digest), snap_tmp / name)
                except OSError:  # no symlinks (some Windows setups): the Hub client copies too
                    shutil.copyfile(repo / "blobs" / digest, snap_tmp / name)
        atomic_write_text(repo / "refs" / "main", commit)
        return snapshot
    finally:
        shutil.rmtree(staging, ignore_errors=True)
