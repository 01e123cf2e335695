"""Run provenance: what a results file, ``run_info.json`` or an adapter checkpoint records about its run.

One place for the facts every record carries, so that the files of ``train``, ``eval``,
``setar-search`` and ``setar-finetune`` describe their runs the same way:

* :func:`weights_sha256` -- the identity of a model's weights (names, dtypes, shapes and bytes of
  its state dict), independent of the file they came from. The feature cache keys image features
  by it, SeTAR+FT adapter checkpoints record the base model's;
* :func:`dataset_provenance` -- the class-name file, the few-shot split and the validation split
  a dataset was built from, each with its SHA-256;
* :func:`environment` -- library versions and hardware;
* :func:`run_provenance` -- the above for a run: trainer, backbone, seed, dataset files, config.

See docs/ARCHITECTURE.md for which file holds what.
"""
from __future__ import annotations

import hashlib
import platform
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch

__all__ = ["DATASET_KEYS", "weights_sha256", "dataset_provenance", "environment", "run_provenance"]

#: Dataset attributes recorded for reproducibility (each ``*_file`` with its ``*_hash``).
DATASET_KEYS = ("classnames_file", "classnames_hash", "split_file", "split_hash", "val_split_file", "val_split_hash")


def weights_sha256(weights: Union[torch.nn.Module, Mapping[str, Any]], header: str = "") -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted by name).

    A TorchScript archive and a state-dict file of the same weights hash the same; any changed
    value, dtype or shape changes the digest. Non-tensor entries (e.g. extra state) are skipped.

    Args:
        weights: a module (its ``state_dict()``) or a state dict.
        header: text hashed first (e.g. the model classes, so equal weights in another
            architecture class differ).
    """
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    h = hashlib.sha256()
    if header:
        h.update(header.encode("utf-8"))
    for name, t in sorted(state.items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode("utf-8"))
        # Raw bytes of any dtype (bfloat16 included): reinterpret as uint8.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
