"""Flags, config set-up and early input checks shared by train / eval / visualize / setar.

The flags are those of the papers' ``train.py``, ``eval_ood_detection.py`` and
``demo_visualization.py`` (Dassl's argument parser plus LoCoOp's additions), so their shell
scripts' command lines work unchanged. Merge order, later wins::

    defaults < --dataset-config-file < --config-file < flags < trailing KEY VALUE opts

Every check that needs no model (trainer name, checkpoint folder, score names, OOD folders,
image path) runs before CLIP is loaded or an image is read, so a typo costs seconds, not a
model load. Errors are printed as one line naming the problem and the fix (exit status 2);
set ``LOCOOP_DEBUG=1`` to get the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional

__all__ = ["FLAG_KEYS", "add_common_arguments", "build_cfg", "check_trainer", "trainer_needs_checkpoint",
           "find_checkpoints", "check_model_dir", "final_checkpoint", "check_resume_config", "check_finished_config",
           "prepare_run", "run_command",
           "write_run_info", "read_run_info", "RUN_INFO"]

# argparse attribute -> config key: Dassl's reset_cfg mapping plus --T and --batch-size of the OOD evaluation.
FLAG_KEYS: Dict[str, str] = {}
RUN_INFO = "run_info.json"
_EPOCH_FILE = re.compile(r"^model\.pth\.tar-(\d+)$")
_BEST_FILE = "model-best.pth.tar"
# Trainers that evaluate CLIP as it is (nothing to load) when the class does not say otherwise.
_NO_CHECKPOINT_TRAINERS = ("ZeroshotCLIP", "ZeroshotCLIP2")


def _flag_keys() -> Dict[str, str]:
    if not FLAG_KEYS:
        from locoop.config import CLI_FLAG_KEYS

        FLAG_KEYS.update(CLI_FLAG_KEYS)
        FLAG_KEYS.update({"T": "OOD.T", "batch_size": "DATALOADER.TEST.BATCH_SIZE"})
    return FLAG_KEYS


def add_common_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the papers' flags (all default to None, so unset flags never override a YAML).

    Args:
        parser: the command's parser.
        command: "train", "eval", "visualize" or "setar" (selects the command-specific flags).
    """
    p = parser
    p.add_argument("--root", type=str, default=None, help="path to the datasets (DATASET.ROOT)")
    p.add_argument("--output-dir", type=str, default=None, help="output directory (OUTPUT_DIR)")
    p.add_argument("--resume", type=str, default=None,
                   help="checkpoint directory to resume training from (RESUME; default: OUTPUT_DIR itself)")
    p.add_argument("--seed", type=int, default=None, help="fixed seed when >= 0 (SEED)")
    p.add_argument("--config-file", type=str, default=None,
                   help="method config, e.g. configs/trainers/LoCoOp/vit_b16_ep50.yaml")
    p.add_argument("--dataset-config-file", type=str, default=None,
                   help="dataset config, e.g. configs/datasets/imagenet.yaml")
    p.add_argument("--trainer", type=str, default=None, help="trainer name: LoCoOp, CoOp, ZeroshotCLIP (TRAINER.NAME)")
    p.add_argument("--backbone", type=str, default=None,
                   help="CLIP model name (ViT-B/16, RN50, ...) or checkpoint path (MODEL.BACKBONE.NAME)")
    p.add_argument("--head", type=str, default=None, help="Dassl head name (MODEL.HEAD.NAME; unused by these methods)")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1 (MODEL.DEVICE; default automatic)")
    p.add_argument("--model-dir", type=str, default=None,
                   help="run folder holding <model>/model.pth.tar-<epoch> to load")
    p.add_argument("--load-epoch", type=int, default=None,
                   help="load model.pth.tar-<epoch> (default: model-best.pth.tar, else the latest epoch)")
    p.add_argument("--lambda_value", type=float, default=None, help="LoCoOp's OOD-loss weight (TRAINER.LOCOOP.LAMBDA)")
    p.add_argument("--topk", type=int, default=None,
                   help="a region is OOD if its label is not in its top-K classes (TRAINER.LOCOOP.TOPK)")
    p.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    if command == "train":
        p.add_argument("--eval-only", action="store_true", help="load --model-dir and test (classification) only")
        p.add_argument("--no-train", action="store_true", help="build the trainer but do not call train()")
        p.add_argument("--skip-finished", action="store_true",
                       help="exit at once when OUTPUT_DIR already holds the final epoch's checkpoint")
    if command in ("eval", "setar"):
        p.add_argument("--T", type=float, default=None, help="softmax temperature on cosine similarity (OOD.T)")
        p.add_argument("-b", "--batch-size", type=int, default=None,
                       help="evaluation batch size (DATALOADER.TEST.BATCH_SIZE)")
        p.add_argument("--in_dataset", type=str, default=None,
                       help="accepted for compatibility; the ID dataset comes from --dataset-config-file")
    if command == "visualize":
        p.add_argument("--image_path", type=str, default=None, required=True, help="image to visualise")
        p.add_argument("--label", type=int, default=None, required=True, help="its class index in [0, C)")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="trailing config overrides: KEY VALUE pairs, e.g. TRAINER.LOCOOP.N_CTX 16")


def build_cfg(args: argparse.Namespace, freeze: bool = True) -> Any:
    """The run config from the flags (see the module docstring for the merge order)."""
    from locoop.config import setup_cfg

    opts = list(getattr(args, "opts", None) or [])
    if opts and opts[0] == "--":  # `... -- KEY VALUE` is accepted as well
        opts = opts[1:]
    args.opts = opts
    return setup_cfg(args, flag_keys=_flag_keys(), freeze=freeze)


def check_trainer(name: str) -> type:
    """The registered trainer class of ``name``.

    Raises:
        ValueError: empty or unknown name (a RegistryError); the message lists the registered trainers.
    """
    from locoop.engine.registry import TRAINER_REGISTRY, get_trainer_class

    if not name:
        import locoop.trainers  # noqa: F401  (registers the built-in trainers, for the list below)

        raise ValueError(f"no trainer given; pass --trainer with one of {TRAINER_REGISTRY.registered_names()}")
    return get_trainer_class(name)  # a RegistryError (a ValueError) names the closest and all trainers


def trainer_needs_checkpoint(cls: type) -> bool:
    """False for trainers without learned weights (zero-shot CLIP), else True.

    A trainer class may say so itself with a ``NEEDS_CHECKPOINT`` attribute.
    """
    flag = getattr(cls, "NEEDS_CHECKPOINT", None)
    if flag is not None:
        return bool(flag)
    return cls.__name__ not in _NO_CHECKPOINT_TRAINERS


def find_checkpoints(model_dir: str) -> Dict[str, List[str]]:
    """Checkpoint files per model sub-folder of a run folder (``{name: [file, ...]}``)."""
    out: Dict[str, List[str]] = {}
    if not os.path.isdir(model_dir):
        return out
    for sub in sorted(os.listdir(model_dir)):
        folder = os.path.join(model_dir, sub)
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if _EPOCH_FILE.match(f) or f == _BEST_FILE)
        if files:
            out[sub] = files
    return out


def _listing(folder: str, limit: int = 20) -> str:
    entries = []
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for name in sorted(dirs) + sorted(files):
            entries.append(name + ("/" if name in dirs else "") if rel == "." else os.path.join(rel, name))
        if len(entries) > limit or rel.count(os.sep) >= 1:
            break
    if not entries:
        return "nothing (the folder is empty)"
    more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def check_model_dir(model_dir: Optional[str], epoch: Optional[int] = None) -> Dict[str, List[str]]:
    """Check that ``model_dir`` holds checkpoints (of ``epoch`` when given), before any loading.

    Raises:
        ValueError: no folder given.
        FileNotFoundError: the folder is missing, holds no checkpoints, or none of ``epoch``;
            the message lists what was found there.
    """
    if not model_dir:
        raise ValueError("--model-dir is required: the run folder written by `python -m locoop train "
                         "--output-dir DIR` (or use --trainer ZeroshotCLIP, which needs no checkpoint)")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model-dir {model_dir} does not exist; give the --output-dir of a training run")
    found = find_checkpoints(model_dir)
    if not found:
        raise FileNotFoundError(
            f"no checkpoints in --model-dir {model_dir}: expected {model_dir}/<model name>/model.pth.tar-<epoch> "
            f"(as written by `python -m locoop train --output-dir {model_dir}`); found there: {_listing(model_dir)}")
    if epoch is not None:
        want = f"model.pth.tar-{int(epoch)}"
        have = {sub: files for sub, files in found.items() if want in files}
        if not have:
            epochs = sorted({int(m.group(1)) for files in found.values() for f in files
                             if (m := _EPOCH_FILE.match(f))})
            raise FileNotFoundError(
                f"--load-epoch {epoch}: no {want} in {model_dir}; checkpoints found: "
                + "; ".join(f"{sub}/: {', '.join(files)}" for sub, files in found.items())
                + (f" (epochs {epochs}; pass one of them to --load-epoch, or omit it for the latest)"
                   if epochs else ""))
    return found


def final_checkpoint(output_dir: str, max_epoch: int) -> Optional[str]:
    """Path of ``<output_dir>/<model>/model.pth.tar-<max_epoch>`` if a finished run left it, else None."""
    for sub, files in find_checkpoints(output_dir).items():
        name = f"model.pth.tar-{int(max_epoch)}"
        if name in files:
            return os.path.join(output_dir, sub, name)
    return None


def check_resume_config(cfg: Any) -> None:
    """Refuse, before any model is loaded, a resume whose config differs from the one the run recorded.

    Looks at the checkpoint a resume would continue from (``RESUME``, else ``OUTPUT_DIR``; per model
    sub-folder the newer of ``model-last.pth.tar`` and the latest epoch file). The trainer checks it
    again when it resumes; checking here keeps ``config.yaml`` and ``run_info.json`` untouched.

    Raises:
        ValueError: the training keys that differ (:func:`locoop.engine.checkpoint.check_recorded_config`).
    """
    from locoop.engine.checkpoint import check_recorded_config, load_checkpoint, resume_checkpoint

    directory = str(cfg.RESUME or cfg.OUTPUT_DIR or "")
    if not directory or not os.path.isdir(directory):
        return
    for sub in sorted(os.listdir(directory)):
        path = resume_checkpoint(os.path.join(directory, sub)) if os.path.isdir(os.path.join(directory, sub)) else None
        if path:
            check_recorded_config(load_checkpoint(path), cfg, path)


def check_finished_config(cfg: Any, path: str) -> None:
    """Refuse ``--skip-finished`` when the finished run at ``path`` was trained with other training keys."""
    from locoop.engine.checkpoint import check_recorded_config, load_checkpoint

    check_recorded_config(load_checkpoint(path), cfg, path, action="skip")


def _print_args(args: argparse.Namespace, cfg: Any) -> None:
    print("***************\n** Arguments **\n***************")
    for key in sorted(vars(args)):
        print(f"{key}: {getattr(args, key)}")
    from locoop.config import cfg_changes

    # Only the keys that differ from the defaults: the full config (~200 lines) buried the run's
    # output; config.yaml / ood_results.json record every key.
    changes = cfg_changes(cfg)
    print(f"************\n** Config ** (the {len(changes)} key(s) that differ from the defaults)\n************")
    for key, value in changes:
        print(f"{key}: {value!r}")


def prepare_run(cfg: Any, args: Optional[argparse.Namespace] = None, lock: bool = False,
                check_resume: bool = False) -> None:
    """Seed, cuDNN and ``log.txt`` in ``OUTPUT_DIR``, then print the arguments and config (as the papers).

    Args:
        lock: This command writes a run into ``OUTPUT_DIR`` (train, setar-finetune, setar-search): first
            lock the folder for this process (:mod:`locoop.engine.runlock`; released when the command
            ends, see :func:`run_command`), before ``log.txt`` is opened.
        check_resume: This command trains (and so may resume): refuse a resume with another config
            (:func:`check_resume_config`) before anything is written.

    Raises:
        ValueError: the folder is locked by another run, or a resume's training keys differ.
    """
    import torch

    from locoop.engine.logger import setup_logger
    from locoop.engine.seed import set_random_seed

    if lock and cfg.OUTPUT_DIR:
        from locoop.engine.runlock import acquire_run_lock

        acquire_run_lock(cfg.OUTPUT_DIR)
    if check_resume:
        check_resume_config(cfg)
    if cfg.OUTPUT_DIR:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        setup_logger(cfg.OUTPUT_DIR)
    if int(cfg.SEED) >= 0:
        print(f"Setting fixed seed: {cfg.SEED}")
        set_random_seed(int(cfg.SEED), deterministic=bool(cfg.TRAIN.DETERMINISTIC))
    if torch.cuda.is_available() and cfg.USE_CUDA and not cfg.TRAIN.DETERMINISTIC:
        torch.backends.cudnn.benchmark = True
    if args is not None and cfg.VERBOSE:
        _print_args(args, cfg)


def load_trainer_for_eval(cfg: Any, args: argparse.Namespace) -> tuple:
    """Build the trainer without its training split, load ``--model-dir`` if given, and compute the
    class text features: what ``eval`` and ``visualize`` score images against.

    Returns:
        ``(trainer, text_features [C, D])``, the trainer in eval mode.
    """
    import torch

    from locoop.engine.registry import build_trainer

    trainer = build_trainer(cfg, need_train=False)
    if args.model_dir:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
    trainer.set_model_mode("eval")
    with torch.no_grad():
        text_features = trainer.text_features()
    return trainer, text_features


def write_run_info(cfg: Any, trainer: Any, extra: Optional[Dict[str, Any]] = None) -> str:
    """Write ``config.yaml`` and ``run_info.json`` (class-name and few-shot split hashes) into OUTPUT_DIR.

    The evaluation copies ``run_info.json`` of the model folder into its results, so a results file
    names the exact few-shot split its prompts were trained on.
    """
    import json

    from locoop.config import dump_cfg
    from locoop.engine import dist
    from locoop.engine.fileio import atomic_write_text
    from locoop.engine.provenance import run_provenance

    out = cfg.OUTPUT_DIR
    if not dist.is_main_process():  # under torchrun rank 0 writes; others would race on the same temp name
        return os.path.join(out, RUN_INFO)
    os.makedirs(out, exist_ok=True)
    dump_cfg(cfg, os.path.join(out, "config.yaml"))
    info = run_provenance(cfg, getattr(getattr(trainer, "dm", None), "dataset", None), extra)
    return str(atomic_write_text(os.path.join(out, RUN_INFO), json.dumps(info, indent=2, default=str)))


def read_run_info(model_dir: Optional[str]) -> Optional[Dict[str, Any]]:
    """``run_info.json`` of a training run folder without its config (None if absent or unreadable)."""
    import json

    if not model_dir:
        return None
    path = os.path.join(model_dir, RUN_INFO)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    info.pop("config", None)
    return info


def run_command(name: str, fn: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace) -> int:
    """Run ``fn(args)``; user errors become a one-line message and exit status 2.

    ``ValueError`` (incl. config errors), ``FileNotFoundError``, ``KeyError`` and
    ``FloatingPointError`` (NaN loss) are reported without a traceback unless ``LOCOOP_DEBUG=1``.
    """
    from locoop.engine.runlock import release_all

    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt as e:
        if debug_enabled(args):
            raise
        sys.stdout.flush()
        said = str(e.args[0]) if e.args and e.args[0] else ""
        # the trainer says "stopped at epoch E; the same command resumes from epoch N": not "stopped: stopped ..."
        detail = said if said.startswith("stopped") else "stopped" + (f": {said}" if said else "")
        print(f"python -m locoop {name}: {detail}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError, OSError, RuntimeError) as e:
        if debug_enabled(args) or (isinstance(e, RuntimeError) and not isinstance(e, _expected_runtime_errors())):
            raise
        if isinstance(e, RuntimeError):
            msg = _last_line(str(e))
        elif isinstance(e, KeyError) and e.args:
            msg = str(e.args[0])
        elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            msg = describe_os_error(e)
        else:
            msg = str(e)
        sys.stdout.flush()
        print(f"python -m locoop {name}: error: {msg} (--debug for the traceback)", file=sys.stderr)
        return 2
    finally:
        release_all()  # the run folder's lock (prepare_run) lasts as long as the command, however it ends


def _expected_runtime_errors() -> tuple:
    """RuntimeErrors that are user-facing failures: a download without network, a bad image in strict mode."""
    from clip.pretrained import DownloadError
    from locoop.data.image_io import UnreadableImageError

    return (DownloadError, UnreadableImageError)


def _last_line(msg: str) -> str:
    """The error's own message: a DataLoader worker re-raises it with the worker's traceback in front."""
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return msg.strip()
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1].endswith("Error") else last


def debug_enabled(args: Optional[argparse.Namespace] = None) -> bool:
    """``--debug`` given (anywhere on the command line) or ``LOCOOP_DEBUG=1``: show full tracebacks."""
    return bool(getattr(args, "debug", False)) or os.environ.get("LOCOOP_DEBUG", "") not in ("", "0")


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path or ".")
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: what failed on which path, and the fix (free space for a full disk)."""
    import errno
    import shutil

    path = e.filename or ""
    where = f" {path}" if path else ""
    if e.errno == errno.ENOSPC:
        free = ""
        try:
            free = f" ({shutil.disk_usage(_existing_parent(path)).free / 2**20:.1f} MiB free there)"
        except OSError:
            pass
        return (f"no space left on the device writing{where}{free}; free some space or choose another "
                f"--output-dir")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        kind = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return f"cannot write{where}: {kind}; choose a writable --output-dir (or fix the folder's permissions)"
    if e.errno == errno.ENOTDIR:
        return f"{path or 'a path'}: a part of the path is a file, not a folder; choose another --output-dir"
    return f"{e.strerror or e}{':' + where if path else ''}"
