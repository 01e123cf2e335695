"""``python -m locoop run-settings MODEL_DIR``: what a training run folder was trained with.

A prompt checkpoint only loads into a prompt learner of the same shape, so evaluating or
visualising a run needs the trainer, backbone, ``N_CTX``, ``CSC``, ``CTX_INIT`` and class-token
position it was trained with, and an epoch that has a checkpoint. This command reads them from the
run folder: the ``config.yaml`` that ``train`` writes, and the checkpoint files present
(``<model>/model.pth.tar-<epoch>``; the epoch to load is the last one found, or ``--load-epoch``
after checking it exists). A folder without ``config.yaml`` (e.g. written by the original
LoCoOp/CoOp code) still gives ``N_CTX`` / ``CSC`` from the shape of the checkpoint's context
vectors.

``scripts/locoop/eval.sh`` and ``demo_visualization.sh`` call it with ``--shell`` (``RUN_*=value``
lines for the shell to evaluate; messages name the scripts' own variables, ``MODEL_DIR`` and
``LOAD_EPOCH``); without it the settings are printed as a table.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["RunSettings", "read_run_settings", "SETTING_KEYS", "add_arguments", "run"]

CONFIG_FILE = "config.yaml"
# (shell variable, config key): the keys a prompt checkpoint depends on, plus the OOD rule's TOPK.
SETTING_KEYS: Tuple[Tuple[str, str], ...] = (
    ("TRAINER", "TRAINER.NAME"),
    ("BACKBONE", "MODEL.BACKBONE.NAME"),
    ("NCTX", "TRAINER.LOCOOP.N_CTX"),
    ("CSC", "TRAINER.LOCOOP.CSC"),
    ("CTX_INIT", "TRAINER.LOCOOP.CTX_INIT"),
    ("CTP", "TRAINER.LOCOOP.CLASS_TOKEN_POSITION"),
    ("TOPK", "TRAINER.LOCOOP.TOPK"),
    ("MAX_EPOCH", "OPTIM.MAX_EPOCH"),
)
_LABELS = {"TRAINER.NAME": "trainer", "MODEL.BACKBONE.NAME": "backbone", "TRAINER.LOCOOP.N_CTX": "N_CTX",
           "TRAINER.LOCOOP.CSC": "CSC", "TRAINER.LOCOOP.CTX_INIT": "CTX_INIT",
           "TRAINER.LOCOOP.CLASS_TOKEN_POSITION": "class token", "TRAINER.LOCOOP.TOPK": "TOPK"}
# How the two inputs are called in messages: by the CLI, and by the scripts.
CLI_NAMES = {"model_dir": "MODEL_DIR", "load_epoch": "--load-epoch"}
SCRIPT_NAMES = {"model_dir": "MODEL_DIR", "load_epoch": "LOAD_EPOCH"}
_RUN_FOLDER = "train.sh writes output/<DATASET>/<TRAINER>/<CFG>_<SHOTS>shots/nctx<NCTX>_csc<CSC>_ctp<CTP>/seed<SEED>"


@dataclass
class RunSettings:
    """The settings of one training run folder.

    Attributes:
        model_dir: the folder.
        config_file: its ``config.yaml``, or None when it has none.
        values: config key -> value, for the keys of :data:`SETTING_KEYS` that could be read.
        from_checkpoint: the keys read from a checkpoint because there is no ``config.yaml``.
        epochs: epochs with a checkpoint in every model sub-folder, ascending.
        has_best: a ``model-best.pth.tar`` exists in every model sub-folder.
        load_epoch: the epoch to load; None = the trainer's own choice (model-best, else latest).
        notes: remarks for the user (an unfinished run, values taken from a checkpoint).
    """

    model_dir: str
    config_file: Optional[str]
    values: Dict[str, Any]
    from_checkpoint: List[str] = field(default_factory=list)
    epochs: List[int] = field(default_factory=list)
    has_best: bool = False
    load_epoch: Optional[int] = None
    notes: List[str] = field(default_factory=list)


def _get(tree: Any, dotted: str) -> Tuple[bool, Any]:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _read_config(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "it should be the config.yaml that `python -m locoop train` wrote") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a config (expected a YAML mapping of config keys)")
    values = {}
    for _, key in SETTING_KEYS:
        found, value = _get(doc, key)
        if found:
            values[key] = value
    return values


def _from_checkpoint(path: str) -> Dict[str, Any]:
    """N_CTX / CSC (and the trainer, when recorded) from a prompt checkpoint's ``ctx`` tensor."""
    from locoop.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    ctx = ckpt["state_dict"].get("ctx")
    values: Dict[str, Any] = {}
    if ctx is not None and ctx.dim() in (2, 3):
        values["TRAINER.LOCOOP.N_CTX"] = int(ctx.shape[-2])
        values["TRAINER.LOCOOP.CSC"] = ctx.dim() == 3
        values["TRAINER.LOCOOP.CTX_INIT"] = ""  # the learned vectors replace any initialisation
    if isinstance(ckpt.get("trainer"), str):
        values["TRAINER.NAME"] = ckpt["trainer"]
    return values


def read_run_settings(model_dir: str, load_epoch: Optional[str] = None,
                      names: Optional[Dict[str, str]] = None) -> RunSettings:
    """Read the settings of a training run folder and choose (or check) the epoch to load.

    Args:
        model_dir: the run folder (``--output-dir`` of ``train``).
        load_epoch: an epoch to load (checked to have a checkpoint), ``"latest"`` (the trainer's
            own choice), or None / "" for the last epoch found.
        names: how ``model_dir`` and ``load_epoch`` are called in messages
            (:data:`CLI_NAMES` by default, :data:`SCRIPT_NAMES` for the scripts).

    Returns:
        The :class:`RunSettings`.

    Raises:
        FileNotFoundError: the folder is missing, holds neither ``config.yaml`` nor a checkpoint,
            holds no checkpoint, or none of ``load_epoch``.
        ValueError: an unreadable ``config.yaml``, a ``load_epoch`` that is not an epoch number.
    """
    from locoop.commands._common import find_checkpoints

    n = dict(CLI_NAMES, **(names or {}))
    md, le = n["model_dir"], n["load_epoch"]
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{md} {model_dir} is not a folder; give the folder a training wrote ({_RUN_FOLDER})")
    config = os.path.join(model_dir, CONFIG_FILE)
    config = config if os.path.isfile(config) else None
    found = find_checkpoints(model_dir)
    if config is None and not found:
        raise FileNotFoundError(
            f"{md} {model_dir} holds neither {CONFIG_FILE} nor checkpoints (<model>/model.pth.tar-<epoch>): it is "
            f"not a training run folder; give the folder a training wrote ({_RUN_FOLDER})")
    if not found:
        raise FileNotFoundError(f"{md} {model_dir} has a {CONFIG_FILE} but no checkpoint yet "
                                "(<model>/model.pth.tar-<epoch>): let the training save one, or resume it")
    per_sub = [{int(f.rsplit("-", 1)[1]) for f in files if f.startswith("model.pth.tar-")} for files in found.values()]
    epochs = sorted(set.intersection(*per_sub))
    has_best = all("model-best.pth.tar" in files for files in found.values())
    settings = RunSettings(model_dir=model_dir, config_file=config, values={}, epochs=epochs, has_best=has_best)

    want = str(load_epoch).strip() if load_epoch is not None else ""
    if want == "latest":
        settings.load_epoch = None
    elif want:
        if not want.isdigit():
            raise ValueError(f"{le}={want} is not an epoch number (or 'latest'); checkpoints: "
                             f"{_describe(settings)}")
        if int(want) not in epochs:
            raise FileNotFoundError(f"{le}={want}: {model_dir} has no checkpoint of epoch {want}; checkpoints: "
                                    f"{_describe(settings)}. Set {le} to one of them, or leave it unset for the last")
        settings.load_epoch = int(want)
    else:
        settings.load_epoch = epochs[-1] if epochs else None

    if config is not None:
        settings.values = _read_config(config)
    else:
        sub = next(iter(found))
        files = found[sub]
        name = (f"model.pth.tar-{settings.load_epoch}" if settings.load_epoch is not None
                else ("model-best.pth.tar" if "model-best.pth.tar" in files else files[-1]))
        settings.values = _from_checkpoint(os.path.join(model_dir, sub, name))
        settings.from_checkpoint = [k for _, k in SETTING_KEYS if k in settings.values]
        if settings.from_checkpoint:
            settings.notes.append(f"no {CONFIG_FILE} in {model_dir}: "
                                  + ", ".join(f"{k} {settings.values[k]}" for k in settings.from_checkpoint
                                              if k != "TRAINER.LOCOOP.CTX_INIT")
                                  + f" read from {sub}/{name}; the class-token position and backbone are the defaults")
    max_epoch = settings.values.get("OPTIM.MAX_EPOCH")
    if not want and isinstance(max_epoch, int) and epochs and epochs[-1] < max_epoch:
        settings.notes.append(f"the run's last checkpoint is epoch {epochs[-1]} of OPTIM.MAX_EPOCH {max_epoch} "
                              f"(unfinished); using it (set {le} to choose another)")
    return settings


def _describe(s: RunSettings) -> str:
    parts = []
    if s.epochs:
        parts.append("epochs " + ", ".join(map(str, s.epochs)))
    if s.has_best:
        parts.append("model-best")
    return "; ".join(parts) or "none"


def _shell_value(value: Any) -> str:
    return shlex.quote("" if value is None else str(value))


def format_shell(s: RunSettings) -> str:
    """``RUN_<NAME>=value`` lines (shell-quoted; empty when unknown) for ``eval`` in the scripts."""
    lines = [f"RUN_{var}={_shell_value(s.values.get(key))}" for var, key in SETTING_KEYS]
    lines.append(f"RUN_LOAD_EPOCH={_shell_value(s.load_epoch)}")
    lines.append(f"RUN_CONFIG={_shell_value(s.config_file)}")
    return "\n".join(lines) + "\n"


def summary_line(s: RunSettings) -> str:
    """One line saying what was read (printed by the scripts before they start)."""
    v = s.values
    src = s.config_file or "checkpoint"
    shown = [f"{_LABELS[k]} {v[k]}" for _, k in SETTING_KEYS
             if k in v and k in _LABELS and not (k == "TRAINER.LOCOOP.CTX_INIT" and not v[k])]
    epoch = f"epoch {s.load_epoch}" if s.load_epoch is not None else ("model-best" if s.has_best else "latest")
    return f"run settings from {src}: " + ", ".join(shown + [epoch])


def format_text(s: RunSettings) -> str:
    """The settings as a small table."""
    rows = [("run folder", s.model_dir), ("config", s.config_file or f"(no {CONFIG_FILE})")]
    for _, key in SETTING_KEYS:
        if key in s.values:
            value = s.values[key]
            shown = repr(value) if isinstance(value, str) else str(value)
            rows.append((key, shown + ("  (from the checkpoint)" if key in s.from_checkpoint else "")))
    rows.append(("checkpoints", _describe(s)))
    rows.append(("load epoch", str(s.load_epoch) if s.load_epoch is not None else "the trainer's choice "
                 "(model-best, else the latest)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "".join(f"\nnote: {n}" for n in s.notes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a training run folder (train's --output-dir)")
    parser.add_argument("--load-epoch", default=None, metavar="EPOCH",
                        help="check that this epoch has a checkpoint ('latest': leave the choice to the trainer); "
                             "default: the last epoch found")
    parser.add_argument("--shell", action="store_true",
                        help="print RUN_<NAME>=value lines for a shell to evaluate (what the scripts use); "
                             "messages then name the scripts' variables MODEL_DIR and LOAD_EPOCH")
    parser.add_argument("--prog", default=None, help="name to put in front of messages (the calling script)")


def run(args: argparse.Namespace) -> int:
    """Print the settings; 2 (one line on stderr) when the folder cannot be used."""
    prog = args.prog or "python -m locoop run-settings"
    try:
        s = read_run_settings(args.model_dir, args.load_epoch, SCRIPT_NAMES if args.shell else CLI_NAMES)
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("LOCOOP_DEBUG", "") not in ("", "0"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if args.shell:
        for note in s.notes:
            print(f"{prog}: note: {note}", file=sys.stderr)
        print(f"{prog}: {summary_line(s)}", file=sys.stderr)
        sys.stdout.write(format_shell(s))
    else:
        print(format_text(s))
    return 0
