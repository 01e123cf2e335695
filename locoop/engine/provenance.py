"""Run provenance: what a results file, ``run_info.json`` or an adapter checkpoint records about its run.

One place for the facts every record carries, so that the files of ``train``, ``eval``,
``setar-search`` and ``setar-finetune`` describe their runs the same way:

* :func:`weights_sha256` -- the identity of a model's weights (names, dtypes, shapes and bytes of
  its state dict), independent of the file they came from. The feature cache keys image features
  by it, SeTAR+FT adapter checkpoints record the base model's;
* :func:`dataset_provenance` -- the class-name file, the few-shot split and the validation split
  a dataset was built from, each with its SHA-256;
* :func:`environment` -- library versions and hardware;
* :func:`run_provenance` -- the above for a run: trainer, backbone, seed, dataset files, config;
* :func:`training_config_meta` -- the training keys of the config a loaded checkpoint was trained
  with, for the results of an evaluation of it;
* :func:`backbone_sha256` / :func:`classnames_sha256` -- what a prompt checkpoint records in its
  ``provenance`` entry (:func:`prompt_provenance`), and :func:`check_prompt_provenance` /
  :func:`check_backbone_hash` -- the checks made when such a checkpoint (or a SeTAR+FT adapter
  checkpoint) is loaded on a model.

See docs/ARCHITECTURE.md for which file holds what.
"""
from __future__ import annotations

import hashlib
import platform
import sys
import weakref
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["DATASET_KEYS", "weights_sha256", "cached_weights_sha256", "backbone_sha256", "classnames_sha256",
           "prompt_provenance", "check_backbone_hash", "check_prompt_provenance", "dataset_provenance",
           "environment", "run_provenance", "training_config_meta"]

#: Dataset attributes recorded for reproducibility (each ``*_file`` with its ``*_hash``).
DATASET_KEYS = ("classnames_file", "classnames_hash", "split_file", "split_hash", "val_split_file", "val_split_hash")


def weights_sha256(weights: Union[torch.nn.Module, Mapping[str, Any]], header: str = "",
                   float_dtype: Optional[torch.dtype] = None) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted by name).

    A TorchScript archive and a state-dict file of the same weights hash the same; any changed
    value, dtype or shape changes the digest. Non-tensor entries (e.g. extra state) are skipped.

    Args:
        weights: a module (its ``state_dict()``) or a state dict.
        header: text hashed first (e.g. the model classes, so equal weights in another
            architecture class differ).
        float_dtype: cast floating-point tensors to this dtype first (None: as they are). With
            ``torch.float32`` a model hashes the same in fp16 and fp32 when its weights are fp16
            values (CLIP's are), and the same as ``weights_sha256`` of its fp32 copy.
    """
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    h = hashlib.sha256()
    if header:
        h.update(header.encode("utf-8"))
    for name, t in sorted(state.items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        if float_dtype is not None and t.is_floating_point():
            t = t.to(float_dtype)
        t = t.to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode("utf-8"))
        # Raw bytes of any dtype (bfloat16 included): reinterpret as uint8.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# module -> (stamp, float dtype, digest); weak, so a cached hash never keeps a model alive.
_HASH_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, Tuple[tuple, Optional[torch.dtype], str]]" = \
    weakref.WeakKeyDictionary()


def _weights_stamp(module: torch.nn.Module) -> tuple:
    # Storage address, version counter, dtype, device and shape of every tensor: any in-place update
    # (copy_, an optimiser step), a .half() / .to() or a swapped parameter changes it.
    return tuple((name, t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
                 for name, t in module.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor))


def cached_weights_sha256(module: torch.nn.Module, float_dtype: Optional[torch.dtype] = None) -> str:
    """:func:`weights_sha256` of ``module``, computed once per model object while its weights are unchanged.

    The cache is keyed by the module and checked against a stamp of its tensors (address, version
    counter, dtype, device, shape), so a run hashes its backbone once however many checkpoints it
    saves or loads. A write through ``tensor.data`` bypasses the version counter; code that edits
    weights that way must not rely on this cache.
    """
    stamp = _weights_stamp(module)
    hit = _HASH_CACHE.get(module)
    if hit is not None and hit[0] == stamp and hit[1] == float_dtype:
        return hit[2]
    digest = weights_sha256(module, float_dtype=float_dtype)
    _HASH_CACHE[module] = (stamp, float_dtype, digest)
    return digest


def backbone_sha256(clip_model: torch.nn.Module) -> str:
    """The identity a prompt checkpoint records of its CLIP backbone, cached per model.

    :func:`weights_sha256` of the weights rounded to float16: the fp16 model (``PREC fp16``) holds
    exactly the float16 rounding of the fp32 weights, so prompts trained in fp16 on a GPU and
    evaluated in fp32 on a CPU (or the reverse) name the same backbone. Hashing the fp32 values
    would not: fp16 weights cast back to fp32 are not the original fp32 weights.
    """
    return cached_weights_sha256(clip_model, float_dtype=torch.float16)


def classnames_sha256(classnames: Sequence[str]) -> str:
    """SHA-256 of the class names in label order (one a line), as the prompts were built from them."""
    from locoop.data.classnames import sha256_text

    return sha256_text("\n".join(str(c) for c in classnames))


def prompt_provenance(backbone: str, clip_model: torch.nn.Module, classnames: Sequence[str]) -> Dict[str, Any]:
    """The ``provenance`` entry of a prompt checkpoint: backbone name and weight hash, class-name hash."""
    return {"backbone": str(backbone), "backbone_sha256": backbone_sha256(clip_model),
            "classnames_sha256": classnames_sha256(classnames), "num_classes": len(classnames)}


def check_backbone_hash(saved_sha256: Optional[str], saved_backbone: Any, sha256: str, backbone: Any,
                        source: str, what: str, allow_key: Optional[str] = None, allow: bool = False) -> bool:
    """Refuse (or, with ``allow``, warn about) ``source`` having been made on other backbone weights.

    Args:
        saved_sha256 / saved_backbone: what ``source`` records.
        sha256 / backbone: this run's backbone weight hash and name.
        source: the file (for the message).
        what: what was made on the backbone ("the prompts were learned", "the adapters were fine-tuned").
        allow_key: the config key that accepts another backbone (None: none can).
        allow: its value.

    Returns:
        True when the hashes are equal.

    Raises:
        ValueError: one line naming both backbones and hashes, and ``allow_key`` when there is one.
    """
    if saved_sha256 == sha256:
        return True
    msg = (f"{what} on another base model: {source} records backbone {saved_backbone!r} (weights sha256 "
           f"{str(saved_sha256)[:16]}...), but this run's backbone is {backbone!r} (weights sha256 {sha256[:16]}...)")
    if allow_key and allow:
        print(f"Warning: {msg}; loaded anyway ({allow_key} True)", file=sys.stderr)
        return False
    fix = "set MODEL.BACKBONE.NAME to the checkpoint's backbone"
    raise ValueError(f"{msg}; {fix}" + (f", or set {allow_key} True to load it anyway" if allow_key else ""))


def check_prompt_provenance(saved: Optional[Mapping[str, Any]], expected: Mapping[str, Any], source: str,
                            allow_other_backbone: bool = False, allow_other_classnames: bool = False) -> None:
    """Check a prompt checkpoint's ``provenance`` entry against the model it is loaded on.

    Args:
        saved: the checkpoint's entry (None: a checkpoint written before it existed, or by the papers'
            Dassl training -- loaded with a one-line note).
        expected: :func:`prompt_provenance` of this run.
        source: the checkpoint file.
        allow_other_backbone / allow_other_classnames: ``MODEL.ALLOW_OTHER_BACKBONE`` /
            ``MODEL.ALLOW_OTHER_CLASSNAMES`` (a one-line warning instead of the refusal).

    Raises:
        ValueError: another backbone or other class names, in one line naming both and the key.
    """
    if not isinstance(saved, Mapping):
        print(f"Note: {source} records no backbone or class-name hash (written before checkpoints carried "
              f"them, or by the papers' training); its backbone and class names are not checked")
        return
    check_backbone_hash(saved.get("backbone_sha256"), saved.get("backbone"), str(expected["backbone_sha256"]),
                        expected.get("backbone"), source, "the prompts were learned",
                        "MODEL.ALLOW_OTHER_BACKBONE", allow_other_backbone)
    if saved.get("classnames_sha256") != expected["classnames_sha256"]:
        msg = (f"the prompts in {source} were learned for other class names: it records {saved.get('num_classes')} "
               f"class names with sha256 {str(saved.get('classnames_sha256'))[:16]}..., this run's "
               f"{expected.get('num_classes')} have sha256 {str(expected['classnames_sha256'])[:16]}...")
        if allow_other_classnames:
            print(f"Warning: {msg}; loaded anyway (MODEL.ALLOW_OTHER_CLASSNAMES True)", file=sys.stderr)
            return
        raise ValueError(f"{msg}; use the dataset (class-name file, DATASET.SUBSAMPLE_CLASSES) it was trained on, "
                         "or set MODEL.ALLOW_OTHER_CLASSNAMES True to load it anyway")


def dataset_provenance(dataset: Any, keys: Sequence[str] = DATASET_KEYS) -> Dict[str, Any]:
    """The files a dataset was built from and their hashes (only the attributes it has and that are set)."""
    out: Dict[str, Any] = {}
    if dataset is None:
        return out
    for key in keys:
        value = getattr(dataset, key, None)
        if value is not None:
            out[key] = value
    return out


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # an optional package that is absent or broken is just "not installed"
        return None
    return getattr(mod, "__version__", "unknown")


def environment(device: Optional[Any] = None) -> Dict[str, Any]:
    """Library versions and hardware for reproducibility.

    Args:
        device: the device the run used (``torch.device`` or string); default: cuda if
            available else cpu.

    Returns:
        A JSON-serialisable dict: python, platform, torch, torchvision, numpy, sklearn,
        matplotlib, package version, cuda/cudnn versions, device and GPU name.
    """
    import numpy as np

    import locoop

    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    env: Dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "locoop": getattr(locoop, "__version__", "unknown"),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "numpy": np.__version__,
        "sklearn": _version("sklearn"),
        "matplotlib": _version("matplotlib"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": dev,
    }
    if dev.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(dev).index
        env["gpu"] = torch.cuda.get_device_name(idx if idx is not None else torch.cuda.current_device())
    return env


def run_provenance(cfg: Any, dataset: Any = None, extra: Optional[Mapping[str, Any]] = None,
                   with_config: bool = True) -> Dict[str, Any]:
    """What ``run_info.json`` records: trainer, backbone, seed, the dataset's files and hashes, ``extra``
    and (last) the resolved config."""
    from locoop.config import cfg_to_dict

    info: Dict[str, Any] = {"trainer": cfg.TRAINER.NAME, "backbone": cfg.MODEL.BACKBONE.NAME, "seed": cfg.SEED}
    info.update(dataset_provenance(dataset))
    info.update(dict(extra or {}))
    if with_config:
        info["config"] = cfg_to_dict(cfg)
    return info


def training_config_meta(trainer: Any) -> Dict[str, Any]:
    """``{"training_config": {dotted key: value}}``: the training-relevant keys
    (:func:`locoop.config.training_keys.training_values`) of the config recorded in the checkpoint the
    trainer loaded, so an evaluation's results say what the model was trained with, not only what this
    command's config files say; ``{}`` when nothing loaded records a config (zero-shot, the papers' Dassl
    files, checkpoints from before configs were recorded)."""
    from locoop.config.training_keys import training_values

    recorded = [c for c in (getattr(trainer, "loaded_configs", None) or {}).values() if c]
    return {"training_config": training_values(recorded[0])} if recorded else {}
