"""Checkpoints in Dassl's layout, written atomically and loaded without executing pickles.

Layout per registered model: ``<OUTPUT_DIR>/<model name>/model.pth.tar-<epoch>`` (the papers' schedule,
``TRAIN.CHECKPOINT_FREQ``), an optional ``model-best.pth.tar``, a text file ``checkpoint`` naming the
latest epoch file (as Dassl), and ``model-last.pth.tar``, rewritten after every epoch that writes no
epoch file (``TRAIN.SAVE_LAST``) so that a killed run resumes from its last finished epoch, and deleted
when an epoch file (the same full state, newer) is written, the final one included; a resume takes the
newer of it and the latest epoch file (:func:`resume_checkpoint`). Evaluation never reads
``model-last`` (its discovery matches only ``model.pth.tar-<N>`` and ``model-best``).

A checkpoint is a dict holding only tensors and plain Python values (dict, list, tuple, str, int,
float, bool, None) so that ``torch.load(weights_only=True)`` reads it: ``state_dict``, ``epoch``
(the number of finished epochs = the epoch to start from), ``optimizer``, ``scheduler``,
``rng_states``, ``trainer`` (the trainer's name), ``val_result``, ``format_version`` and ``config`` (the
resolved config of the run as YAML text, compared on resume by :func:`check_recorded_config`).

Loading also accepts the checkpoints written by the papers' training code (Dassl's ``save_checkpoint``:
``{state_dict, epoch, optimizer, scheduler, val_result}``, no ``trainer`` / ``format_version``). Their
scheduler state holds real optimiser / scheduler objects, which ``weights_only=True`` refuses; such a file
is read by :mod:`locoop.engine.safe_load`'s restricted unpickler, which turns those objects into inert
dicts and refuses anything else (never executing it). They can be evaluated and used as initial weights,
not resumed.
"""
from __future__ import annotations

import collections
import os
import re
import warnings
from typing import Any, Iterable, Optional

import torch

from .fileio import atomic_copy, atomic_torch_save, atomic_write_text, remove_stale_temps
from .safe_load import CHECKPOINT_ALLOWLIST, load_foreign_file, restricted_torch_load
from .seed import set_rng_states

__all__ = [
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "LAST_FILE",
    "resume_checkpoint",
    "check_recorded_config",
    "resume_from_checkpoint",
    "check_trainer",
    "check_weights_only_safe",
    "is_dassl_checkpoint",
    "DASSL_CHECKPOINT_CONTENTS",
]

FORMAT_VERSION = 1
_EPOCH_FILE = re.compile(r"^model\.pth\.tar-(\d+)$")
#: The checkpoint of the last finished epoch (not an epoch file: evaluation's discovery ignores it).
LAST_FILE = "model-last.pth.tar"
# Exact types: subclasses such as numpy.float64 pickle through numpy and would be refused on load.
_SAFE_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raise TypeError if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse.

    Checked before writing, so a bad entry fails at save time with its path, not at resume time.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _SAFE_SCALARS:
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int, float, bool, type(None)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be stored in a checkpoint.")
            check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints may hold only tensors and "
        f"plain Python values (dict, list, tuple, str, int, float, bool, None) so that they load with "
        f"torch.load(weights_only=True). Store its state_dict() or a plain value instead."
    )


def _strip_module_prefix(state_dict: dict) -> dict:
    if not any(k.startswith("module.") for k in state_dict):
        return state_dict
    return collections.OrderedDict((k[len("module."):] if k.startswith("module.") else k, v)
                                   for k, v in state_dict.items())


def save_checkpoint(state: dict, save_dir: str, is_best: bool = False, model_name: str = "",
                    remove_module_from_keys: bool = True) -> str:
    """Atomically write ``state`` to ``save_dir/model_name`` (:mod:`locoop.engine.fileio`).

    Args:
        state: Dict with at least ``state_dict`` and ``epoch`` (finished epochs); plain values only.
        save_dir: Folder (created if missing), usually ``OUTPUT_DIR/<model name>``.
        is_best: Also copy it to ``model-best.pth.tar``.
        model_name: File name; default ``model.pth.tar-<epoch>``. Only ``model.pth.tar-<N>`` files
            update the ``checkpoint`` pointer (so resuming never picks an older best model).
        remove_module_from_keys: Strip DataParallel/DDP's ``module.`` prefix from parameter names.

    Returns:
        Path of the written file.
    """
    if "state_dict" not in state or "epoch" not in state:
        raise ValueError("A checkpoint state needs 'state_dict' and 'epoch' entries.")
    state = dict(state)
    if remove_module_from_keys:
        state["state_dict"] = _strip_module_prefix(state["state_dict"])
    state.setdefault("format_version", FORMAT_VERSION)
    check_weights_only_safe(state)

    os.makedirs(save_dir, exist_ok=True)
    # Temporaries of a killed writer are never valid checkpoints; one process writes a run folder.
    remove_stale_temps(save_dir, legacy=True)
    if not model_name:
        model_name = f"model.pth.tar-{state['epoch']}"
    fpath = os.path.join(save_dir, model_name)
    atomic_torch_save(state, fpath)

    if _EPOCH_FILE.match(model_name):
        atomic_write_text(os.path.join(save_dir, "checkpoint"), f"{model_name}\n")
    if is_best and model_name != "model-best.pth.tar":
        atomic_copy(fpath, os.path.join(save_dir, "model-best.pth.tar"))
    return fpath


DASSL_CHECKPOINT_CONTENTS = ("tensors, plain containers and the state of the torch / Dassl optimisers and "
                             "learning-rate schedulers, as the papers' Dassl training writes them")


def _load_papers_checkpoint(fpath: str, map_location: Any) -> Any:
    return load_foreign_file(
        fpath, "checkpoint",
        lambda p: restricted_torch_load(p, CHECKPOINT_ALLOWLIST, map_location=map_location),
        DASSL_CHECKPOINT_CONTENTS, torch_file=True)


def load_checkpoint(fpath: str, map_location: Any = "cpu") -> dict:
    """Load one of our checkpoints, or one written by the papers' Dassl training, without running pickled code.

    Our files are read with ``torch.load(weights_only=True)``. A file that it refuses is read again by the
    restricted unpickler of :mod:`locoop.engine.safe_load` (tensors, plain containers, and the torch / Dassl
    optimiser and scheduler classes as inert dicts), which is what Dassl's ``save_checkpoint`` writes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file holding any other object (the message names it; it is never executed), a damaged
            file (truncated, not a zip archive or pickle), or a pickle that is not a checkpoint.
    """
    if not fpath:
        raise ValueError("Checkpoint path is empty.")
    if not os.path.isfile(fpath):
        raise FileNotFoundError(f"No checkpoint at '{fpath}'.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings about foreign files; the fallback below decides
            ckpt = torch.load(fpath, map_location=map_location, weights_only=True)
    except Exception:  # refused global, damaged file, ...: the restricted load below classifies it exactly
        ckpt = _load_papers_checkpoint(fpath, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(
            f"'{fpath}' is not a checkpoint: expected a dict with a 'state_dict' entry (as this framework and "
            f"Dassl write them), found {type(ckpt).__name__}"
            + (f" with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else "") + "."
        )
    return ckpt


def is_dassl_checkpoint(ckpt: dict) -> bool:
    """True for a checkpoint written by Dassl's ``save_checkpoint`` (the papers' training), not by this framework."""
    return isinstance(ckpt, dict) and "state_dict" in ckpt and "format_version" not in ckpt and "trainer" not in ckpt


def latest_checkpoint(fdir: str) -> Optional[str]:
    """Path of the newest epoch checkpoint in ``fdir`` (pointer file first, else the highest epoch)."""
    pointer = os.path.join(fdir, "checkpoint")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        path = os.path.join(fdir, name)
        if name and os.path.isfile(path):
            return path
        warnings.warn(f"'{pointer}' names '{name}', which does not exist; using the highest epoch file instead.")
    epochs = []
    for p in os.listdir(fdir) if os.path.isdir(fdir) else []:
        m = _EPOCH_FILE.match(p)
        if m:
            epochs.append((int(m.group(1)), p))
    if not epochs:
        return None
    return os.path.join(fdir, max(epochs)[1])


def check_trainer(ckpt: dict, accepted: Iterable[str], fpath: str) -> None:
    """Refuse a checkpoint saved by another trainer.

    Raises:
        ValueError: naming both trainers. A checkpoint of the papers' Dassl training (no ``trainer``
            entry) is accepted with a note; one of ours without the entry with a warning.
    """
    accepted = list(accepted)
    saved = ckpt.get("trainer")
    if saved is None and is_dassl_checkpoint(ckpt):
        # The papers' CoOp / LoCoOp training (Dassl) records no trainer: its files are prompt learners.
        print(f"'{fpath}' was written by the papers' Dassl training (epoch {ckpt.get('epoch')}); "
              f"loading it as a {accepted[0]} checkpoint")
        return
    if saved is None:
        warnings.warn(f"'{fpath}' does not record which trainer wrote it; loading it as {accepted[0]}.")
        return
    if saved not in accepted:
        raise ValueError(
            f"'{fpath}' was saved by trainer '{saved}', but this is trainer '{accepted[0]}'. Use "
            f"--trainer {saved} (TRAINER.NAME) to load it, or point to a checkpoint of {accepted[0]}."
        )


def resume_checkpoint(fdir: str) -> Optional[str]:
    """Path of the checkpoint a resume continues from: the newer of ``model-last.pth.tar`` and the
    latest epoch file (an epoch file wins a tie: it is the papers' name for the same state). None if neither."""
    numbered = latest_checkpoint(fdir)
    last = os.path.join(fdir, LAST_FILE)
    if not os.path.isfile(last):
        return numbered
    if numbered is None:
        return last
    m = _EPOCH_FILE.match(os.path.basename(numbered))
    try:
        last_epoch = int(load_checkpoint(last).get("epoch", -1))
    except (ValueError, TypeError):
        return numbered  # a damaged model-last (never expected: it is written atomically) loses to the epoch file
    return last if m is None or last_epoch > int(m.group(1)) else numbered


def check_recorded_config(ckpt: dict, cfg: Any, fpath: str, action: str = "resume") -> None:
    """Refuse to continue (or skip) a run whose recorded config differs from ``cfg`` in a training key.

    Args:
        ckpt: A loaded checkpoint (its ``config`` entry, YAML text, is the config it was trained with).
        cfg: The config of this command.
        fpath: The checkpoint's path (named in the messages).
        action: "resume" or "skip" (``train --skip-finished``): selects the wording.

    Raises:
        ValueError: naming every differing key with its recorded and new value, and the fix. A checkpoint
            that records no config (older ones, the papers' Dassl ones) is accepted with a one-line note.
    """
    from locoop.config.training_keys import differing_training_keys

    recorded = ckpt.get("config")
    if not isinstance(recorded, str) or cfg is None:
        if cfg is not None:
            print(f"Note: '{fpath}' records no config (written before configs were recorded, or by the papers' "
                  f"code); cannot check that this {action} uses the same settings")
        return
    diff = differing_training_keys(recorded, cfg)
    if not diff:
        return
    keys = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)
    what = ("resuming it would train the remaining epochs with other settings" if action == "resume" else
            "skipping it would report a run of other settings as this one")
    raise ValueError(
        f"the run in this folder was trained with another config ({fpath}); {what}. Differing keys "
        f"(recorded -> now): {keys}. Start a new run with another --output-dir (OUTPUT_DIR), or use the "
        f"recorded values to continue this one.")


def resume_from_checkpoint(fdir: str, model: torch.nn.Module, optimizer: Optional[Any] = None,
                           scheduler: Optional[Any] = None, scaler: Optional[Any] = None,
                           trainer_names: Optional[Iterable[str]] = None, config: Any = None) -> int:
    """Restore model, optimiser, scheduler, AMP scaler and RNG states from the checkpoint of
    :func:`resume_checkpoint` (the newer of ``model-last`` and the latest epoch file).

    Args:
        fdir: Folder of one model's checkpoints (``OUTPUT_DIR/<model name>``).
        trainer_names: Accepted trainer names (None: no check).
        config: This run's config: refused if its training keys differ from the recorded ones
            (:func:`check_recorded_config`); None: no check.

    Returns:
        The epoch to start from (the number of epochs already finished).
    """
    fpath = resume_checkpoint(fdir)
    if fpath is None:
        raise FileNotFoundError(f"No 'model.pth.tar-<epoch>' or '{LAST_FILE}' checkpoint in '{fdir}' to resume from.")
    print(f"Loading checkpoint from '{fpath}'")
    ckpt = load_checkpoint(fpath)
    if is_dassl_checkpoint(ckpt):
        raise ValueError(
            f"'{fpath}' was written by the papers' Dassl training; it can be evaluated (eval, visualize, "
            f"setar-search --model-dir) or used as MODEL.INIT_WEIGHTS, but not resumed (it holds no RNG states "
            f"and Dassl's scheduler objects). Train into another OUTPUT_DIR.")
    if trainer_names is not None:
        check_trainer(ckpt, trainer_names, fpath)
    if config is not None:
        check_recorded_config(ckpt, config, fpath)
    model.load_state_dict(ckpt["state_dict"])
    print("Loaded model weights")
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        print("Loaded optimizer")
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
        print("Loaded scheduler")
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng_states") is not None:
        set_rng_states(ckpt["rng_states"])
    start_epoch = int(ckpt["epoch"])
    print(f"Previous epoch: {start_epoch}")
    return start_epoch

