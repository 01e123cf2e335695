"""Config loading and merging (yacs, Dassl key names).

Merge order, later wins::

    defaults < dataset YAML < method YAML < CLI flags < trailing KEY VALUE opts

Differences from plain yacs merging, all in the user's favour:

- an unknown key fails with the key, where it came from, and the closest valid keys;
- a value of the wrong type fails naming the key, the expected type and an example;
- an int is accepted where a float is expected (yacs refuses ``OPTIM.LR 1``), lists and tuples
  are interchangeable, and ``true``/``false`` are accepted for booleans in opts;
- every constrained value is checked once the config is built (:mod:`locoop.config.checks`).

How to add a key or a check: docs/ARCHITECTURE.md, "Configuration".
"""
from __future__ import annotations

import ast
import difflib
import os
from typing import Any, Mapping, Optional, Sequence

import yaml
from yacs.config import CfgNode as _YacsCfgNode

from .defaults import CfgNode, get_cfg_default

__all__ = [
    "CfgNode",
    "ConfigError",
    "ConfigKeyError",
    "ConfigTypeError",
    "CLI_FLAG_KEYS",
    "get_cfg_default",
    "merge_cfg",
    "merge_from_file",
    "merge_from_dict",
    "merge_from_list",
    "setup_cfg",
    "cfg_changes",
    "validate_cfg",
    "cfg_to_dict",
    "dump_cfg",
    "load_cfg",
    "all_keys",
]


class ConfigError(ValueError):
    """A config file, flag or option that cannot be merged."""


class ConfigKeyError(ConfigError, KeyError):
    """An unknown config key."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type."""


# argparse attribute -> config key, as Dassl/CoOp/LoCoOp's train.py (reset_cfg) maps them.
CLI_FLAG_KEYS: dict[str, str] = {
    "root": "DATASET.ROOT",
    "output_dir": "OUTPUT_DIR",
    "resume": "RESUME",
    "seed": "SEED",
    "trainer": "TRAINER.NAME",
    "backbone": "MODEL.BACKBONE.NAME",
    "head": "MODEL.HEAD.NAME",
    "lambda_value": "TRAINER.LOCOOP.LAMBDA",
    "topk": "TRAINER.LOCOOP.TOPK",
    "num_shots": "DATASET.NUM_SHOTS",
    "device": "MODEL.DEVICE",
}

# ----------------------------------------------------------------------------- key helpers
def all_keys(cfg: CfgNode, prefix: str = "") -> list[str]:
    """List every leaf key of ``cfg`` as a dotted path (``"OPTIM.LR"``)."""
    out = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        if isinstance(v, _YacsCfgNode):
            out.extend(all_keys(v, full + "."))
        else:
            out.append(full)
    return out


def _closest_keys(full_key: str, cfg: CfgNode, n: int = 3) -> list[str]:
    keys = all_keys(cfg)
    sections = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    candidates = keys + sections
    out = difflib.get_close_matches(full_key, candidates, n=n, cutoff=0.6)
    # The right leaf under the wrong section ("LR" for "OPTIM.LR"), or wrong case.
    leaf = full_key.rsplit(".", 1)[-1].upper()
    for k in keys:
        if k.rsplit(".", 1)[-1].upper() == leaf and k not in out:
            out.append(k)
    upper = [k for k in candidates if k.upper() == full_key.upper()]
    for k in upper:
        if k not in out:
            out.insert(0, k)
    return out[: n + 2]


def _unknown_key_error(full_key: str, root: CfgNode, source: str) -> ConfigKeyError:
    close = _closest_keys(full_key, root)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigKeyError(
        f"Unknown config key '{full_key}' ({source}).{hint} Keys are case-sensitive; "
        f"the defaults with all valid keys are in locoop/config/defaults.py."
    )


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (list, tuple)):
        return "list"
    if v is None:
        return "None"
    return type(v).__name__


# ----------------------------------------------------------------------------- value coercion
def _decode(value: Any) -> Any:
    """Turn a string into a Python literal where it is one (yacs' rule), else keep the string."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def _coerce(raw: Any, default: Any, full_key: str, source: str) -> Any:
    value = _decode(raw)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(raw, str):  # e.g. DATASET.NAME 1 -> keep the text the user typed
            return raw
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    else:  # pragma: no cover - defaults only hold the types above
        if type(value) is type(default):
            return value
    example = {"bool": "True or False", "str": '"text"', "int": "10", "float": "0.002",
               "list": str(list(default)) if isinstance(default, (list, tuple)) else ""}[_type_name(default)]
    return_type = _type_name(default)
    raise ConfigTypeError(
        f"Config key '{full_key}' expects {return_type} (current value {default!r}), got "
        f"{_type_name(value)} {raw!r} ({source}). Example of a valid value: {example}."
    )


# ----------------------------------------------------------------------------- merging
def merge_from_dict(cfg: CfgNode, data: Mapping[str, Any], source: str = "a dict",
                    _prefix: str = "", _root: Optional[CfgNode] = None) -> CfgNode:
    """Merge a nested mapping into ``cfg`` with key and type checks.

    Args:
        cfg: Config to update in place (must not be frozen).
        data: Nested ``{KEY: value or {SUBKEY: ...}}`` as read from YAML.
        source: Where the values come from, used in error messages.

    Returns:
        ``cfg``.

    Raises:
        ConfigKeyError: unknown key; ConfigTypeError: value of the wrong type.
    """
    root = cfg if _root is None else _root
    if _root is None and cfg.is_frozen():  # item assignment would bypass yacs' frozen guard
        raise ConfigError("The config is frozen (setup_cfg freezes it); merge before freeze(), or into "
                          "c = cfg.clone(); c.defrost().")
    if not isinstance(data, Mapping):
        raise ConfigError(f"Expected a mapping of config keys ({source}), got {type(data).__name__}.")
    for key, raw in data.items():
        key = str(key)
        full_key = f"{_prefix}{key}"
        if key not in cfg:
            if cfg.is_new_allowed():
                cfg[key] = type(cfg)(dict(raw)) if isinstance(raw, Mapping) else _decode(raw)
                continue
            raise _unknown_key_error(full_key, root, source)
        default = cfg[key]
        if isinstance(default, _YacsCfgNode):
            if not isinstance(raw, Mapping):
                raise ConfigTypeError(
                    f"Config key '{full_key}' is a section ({source}); set its sub-keys instead, "
                    f"e.g. {full_key}.{next(iter(default.keys()), 'KEY')}."
                )
            merge_from_dict(default, raw, source, full_key + ".", root)
        else:
            if isinstance(raw, Mapping):
                raise ConfigTypeError(
                    f"Config key '{full_key}' is a value of type {_type_name(default)}, not a section ({source})."
                )
            cfg[key] = _coerce(raw, default, full_key, source)
    return cfg


def merge_from_file(cfg: CfgNode, path: str) -> CfgNode:
    """Merge a YAML file into ``cfg`` (checked keys and types); a ``.json`` file is SeTAR's JSON config.

    A ``.json`` file goes through :func:`locoop.config.setar_json.merge_setar_json` (every SeTAR key
    mapped to ours, unknown keys refused).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file not found: '{path}'. Check the path (configs/ holds the shipped ones).")
    if str(path).lower().endswith(".json"):
        from .setar_json import merge_setar_json

        return merge_setar_json(cfg, path)
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {e}") from e
    if data is None:
        return cfg
    return merge_from_dict(cfg, data, source=f"in {path}")


def _set_key(cfg: CfgNode, full_key: str, raw: Any, source: str) -> None:
    parts = full_key.split(".")
    node: Any = cfg
    for part in parts:
        if not isinstance(node, _YacsCfgNode):
            break  # a leaf followed by more parts: merge_from_dict explains it
        if part not in node:
            if node.is_new_allowed():
                break
            raise _unknown_key_error(full_key, cfg, source)
        node = node[part]
    nested: Any = raw
    for part in reversed(parts[1:]):
        nested = {part: nested}
    merge_from_dict(cfg, {parts[0]: nested}, source)


def merge_from_list(cfg: CfgNode, opts: Sequence[Any], source: str = "command-line opts") -> CfgNode:
    """Merge trailing ``KEY VALUE KEY VALUE ...`` pairs into ``cfg``."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(
            f"Trailing options must be KEY VALUE pairs; got an odd number ({len(opts)}): {opts}. "
            f"The last key '{opts[-1]}' has no value."
        )
    for k, v in zip(opts[0::2], opts[1::2]):
        _set_key(cfg, str(k), v, f"{source}: {k} {v}")
    return cfg


def merge_cfg(cfg: CfgNode, dataset_config_file: Optional[str] = None, config_file: Optional[str] = None,
              cli_overrides: Optional[Mapping[str, Any]] = None, opts: Optional[Sequence[Any]] = None) -> CfgNode:
    """Merge, in order, a dataset YAML, a method YAML, CLI flags and trailing opts into ``cfg``.

    Args:
        cfg: Config to update in place (usually ``get_cfg_default()``).
        dataset_config_file: e.g. ``configs/datasets/imagenet.yaml`` ("" or None: skip).
        config_file: e.g. ``configs/trainers/LoCoOp/vit_b16_ep50.yaml`` ("" or None: skip).
        cli_overrides: ``{"DATASET.ROOT": "/data", ...}``; None values are skipped.
        opts: trailing ``["KEY", "VALUE", ...]``.

    Returns:
        ``cfg`` (not frozen).
    """
    if dataset_config_file:
        merge_from_file(cfg, dataset_config_file)
    if config_file:
        merge_from_file(cfg, config_file)
    for key, value in (cli_overrides or {}).items():
        if value is None:
            continue
        _set_key(cfg, key, value, f"command-line flag for {key}")
    if opts:
        merge_from_list(cfg, opts)
    return cfg


def validate_cfg(cfg: CfgNode) -> None:
    """Check every constrained value (choices, ranges) of every section: see :mod:`locoop.config.checks`.

    Raises:
        ConfigError: naming the key, the bad value and the valid choices or range.
    """
    from .checks import validate_cfg as _validate

    _validate(cfg)


def setup_cfg(args: Any, flag_keys: Optional[Mapping[str, str]] = None, freeze: bool = True) -> CfgNode:
    """Build the run config from an argparse namespace, as Dassl's ``train.py`` does.

    Reads ``args.dataset_config_file``, ``args.config_file``, the flags named in ``flag_keys``
    (default :data:`CLI_FLAG_KEYS`; an attribute that is missing, None or "" is skipped, so CLI
    defaults should be None) and ``args.opts``.

    Returns:
        The merged, validated and (by default) frozen config.
    """
    flag_keys = CLI_FLAG_KEYS if flag_keys is None else flag_keys
    cfg = get_cfg_default()
    overrides = {}
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is None or value == "":
            continue
        overrides[key] = value
    if getattr(args, "strict", False):
        overrides["DATASET.STRICT"] = True
    merge_cfg(
        cfg,
        dataset_config_file=getattr(args, "dataset_config_file", None),
        config_file=getattr(args, "config_file", None),
        cli_overrides=overrides,
        opts=getattr(args, "opts", None),
    )
    validate_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


# ----------------------------------------------------------------------------- export
def cfg_to_dict(cfg: CfgNode) -> dict:
    """Convert a config to plain nested dicts (tuples become lists), e.g. for JSON results."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, _YacsCfgNode):
            out[k] = cfg_to_dict(v)
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def _leaf(cfg: CfgNode, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def cfg_changes(cfg: CfgNode) -> list[tuple[str, Any]]:
    """``(key, value)`` of every leaf whose value differs from :func:`get_cfg_default`, in config order.

    What the console shows of a run's config (``config.yaml`` keeps every key).
    """
    default = get_cfg_default()
    return [(k, _leaf(cfg, k)) for k in all_keys(cfg) if _leaf(cfg, k) != _leaf(default, k)]


def dump_cfg(cfg: CfgNode, path: str) -> str:
    """Write the resolved config as YAML (loadable again with :func:`load_cfg`), atomically."""
    from locoop.engine.fileio import atomic_write_text

    text = yaml.safe_dump(cfg_to_dict(cfg), sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)
    return path


def load_cfg(path: str, freeze: bool = True) -> CfgNode:
    """Load a YAML written by :func:`dump_cfg` (or any config YAML) on top of the defaults."""
    cfg = merge_from_file(get_cfg_default(), path)
    if freeze:
        cfg.freeze()
    return cfg

