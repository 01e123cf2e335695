"""The config keys that change a trained result, and the difference between two runs' configs.

Every checkpoint the trainer writes records the resolved config (a YAML string, ``config``). A resume,
or ``train --skip-finished``, with a config whose *training-relevant* keys differ from the recorded
one is refused (:func:`locoop.engine.checkpoint.check_recorded_config`): the remaining epochs would
train a mix of two configs, or a finished run of other settings would be reported as this one.

Training-relevant: everything under ``SEED``, ``INPUT``, ``DATASET``, ``DATALOADER.TRAIN_X`` /
``TRAIN_U`` (and the loader's ``K_TRANSFORMS`` / ``RETURN_IMG0``), ``MODEL``, ``OPTIM``, ``TRAINER``,
``SETAR`` and ``TEST.FINAL_MODEL`` (which model a ``best_val`` run keeps), except the keys of
:data:`IGNORED` (where the data lies, which device, strictness about corrupt images, whether a
checkpoint of another backbone may be loaded), which do not change what is learned. Not relevant: output and resume folders, worker counts, print frequency,
checkpoint schedule, tensorboard, verbosity, evaluation and OOD settings. A key recorded on only one
side (a key added to the framework after the run) is not compared.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple, Union

import yaml

__all__ = ["TRAINING_PREFIXES", "IGNORED", "is_training_key", "config_text", "config_as_dict", "flatten_config",
           "training_values", "differing_training_keys"]

#: Dotted prefixes (a whole key or a section followed by ".") whose keys change the trained result.
TRAINING_PREFIXES: Tuple[str, ...] = (
    "SEED", "INPUT.", "DATASET.", "DATALOADER.TRAIN_X.", "DATALOADER.TRAIN_U.", "DATALOADER.K_TRANSFORMS",
    "DATALOADER.RETURN_IMG0", "MODEL.", "OPTIM.", "TRAINER.", "SETAR.", "TEST.FINAL_MODEL",
)
#: Keys under those prefixes that do not change what is learned.
IGNORED: Tuple[str, ...] = ("MODEL.DEVICE", "MODEL.ALLOW_OTHER_BACKBONE", "MODEL.ALLOW_OTHER_CLASSNAMES",
                            "DATASET.ROOT", "DATASET.STRICT")


def is_training_key(key: str) -> bool:
    """Whether the dotted config ``key`` changes the trained result (see the module docstring)."""
    if key in IGNORED:
        return False
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in TRAINING_PREFIXES)


def config_text(cfg: Any) -> str:
    """The resolved config as the YAML text that checkpoints record (the form of ``config.yaml``)."""
    from locoop.config import cfg_to_dict

    return yaml.safe_dump(cfg_to_dict(cfg), sort_keys=False, default_flow_style=None)


def config_as_dict(cfg: Union[str, Any]) -> Dict[str, Any]:
    """A config (a CfgNode, a plain dict, or the YAML text of one) as a plain nested dict, YAML-normalised
    (tuples become lists), so two configs compare equal exactly when their YAML does."""
    return yaml.safe_load(cfg if isinstance(cfg, str) else config_text(cfg)) or {}


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config dict as ``{dotted key: value}`` (``{"OOD": {"T": 1.0}}`` -> ``{"OOD.T": 1.0}``)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def training_values(cfg: Union[str, Any]) -> Dict[str, Any]:
    """The training-relevant keys of a config (CfgNode, dict or YAML text) as ``{dotted key: value}``, sorted."""
    flat = flatten_config(config_as_dict(cfg))
    return {k: flat[k] for k in sorted(flat) if is_training_key(k)}


def differing_training_keys(recorded: Union[str, Any], current: Union[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``[(key, recorded value, current value), ...]`` for the training-relevant keys that differ, sorted."""
    old, new = flatten_config(config_as_dict(recorded)), flatten_config(config_as_dict(current))
    return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if is_training_key(k) and old[k] != new[k]]
