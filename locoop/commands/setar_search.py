"""``python -m locoop setar-search``: SeTAR's training-free low-rank search, then the OOD benchmark.

    python -m locoop setar-search --root DATA \\
        --dataset-config-file configs/datasets/imagenet.yaml \\
        --config-file configs/setar/imagenet/SeTAR.yaml \\
        --output-dir output/setar/imagenet/SeTAR DATASET.VAL_SPLIT_FILE imagenet1k_val_data.json

Built from the pieces ``train`` and ``eval`` use: the model, its device (``cuda:LOCAL_RANK`` under
torchrun), the dataset and the class prompts come from a trainer built without its training split
(:func:`locoop.engine.registry.build_trainer`), the validation images from the shared evaluation
loader, the test from the shared OOD benchmark runner.

1. Search (``SETAR.*``): greedy over the searcher's matrices and ``SETAR.RATIOS``, scored on the
   ID *validation* split (``DATASET.VAL_SPLIT_FILE``, SeTAR's JSON) with the LoCoOp loss, or with
   an OOD metric on ``SETAR.OOD_VAL_DATASETS``. Writes ``search_log.csv`` / ``search_log.json`` and
   ``search_progress.json`` after every step, ``best_settings.json`` (with its completion marker)
   and ``search_summary.json`` once the search is complete, and the settings again as SeTAR's
   ``config_best.json`` (its argument names; :func:`locoop.config.setar_json.setar_config_best`). Started again on the same
   ``--output-dir``, an interrupted search resumes after its last completed step (the same
   settings and log as an uninterrupted run) and a complete one goes straight to the test; with
   other search settings it is refused, naming what differs.
   ``--settings FILE`` (``SETAR.SETTINGS_FILE``) applies a saved ``best_settings.json`` (or a plain
   list, or SeTAR's ``config_best.json``) instead of searching; ``none`` evaluates the unpruned model (vanilla MCM / GL-MCM).
2. Test: the pruned model through the shared OOD benchmark runner (``OOD.SCORES``, MCM and GL-MCM
   in the SeTAR configs, and ID accuracy): ``ood_results.{md,csv,json}``, ``ood_scores.npz``,
   ``plots/``. ``--no-test`` stops after the search.

Backbone: a CLIP model, or with a Swin-V2 snapshot in ``MODEL.BACKBONE.NAME``
(:func:`locoop.models.swinv2.is_swinv2_backbone`) the vision-only classifier (trainer ``SeTARSwin``:
no prompts, its global and local logits are the criterion's and the scores' input; searcher
``visual_only_swin``, layers ``[stage, block]``; ``configs/setar/imagenet/swin_base/``).

Prompts: zero-shot ``SETAR.PROMPT_TEMPLATE`` (trainer ``SeTARZeroshotCLIP``; SeTAR's code writes
``"a photo of a {}"``), or with ``--model-dir RUN`` the learned prompts of a LoCoOp/CoOp run
(``RUN/prompt_learner/model-best.pth.tar`` or ``model.pth.tar-<epoch>``, loaded by the trainer that
saved it; ``TRAINER.LOCOOP.N_CTX / CSC / CTX_INIT / CLASS_TOKEN_POSITION`` must match the run).
The model runs in fp32 as SeTAR's reference does (``TRAINER.LOCOOP.PREC`` is set to fp32 for the
trainer built here); the SVDs are fp32 in any case. ``--lambda_value`` / ``--topk`` set
``SETAR.LAMBDA`` / ``SETAR.TOPK`` (the criterion's LoCoOp loss).

Under torchrun every rank runs the whole (deterministic) search, so every rank holds the pruned
model for the sharded test pass; only rank 0 shows progress and writes files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Dict, Optional, Tuple

from locoop.commands._common import (add_common_arguments, build_cfg, check_model_dir, check_trainer, prepare_run,
                                     read_run_info, run_command, trainer_needs_checkpoint)

NO_SETTINGS = "none"
ZERO_SHOT_TRAINER = "SeTARZeroshotCLIP"
SWIN_TRAINER = "SeTARSwin"  # a Swin-V2 MODEL.BACKBONE.NAME (locoop.models.swinv2.is_swinv2_backbone)
PROMPT_TRAINER = "LoCoOp"  # loads a --model-dir checkpoint that does not say which trainer saved it
TEXT_CHUNK = 1000  # prompts per text forward pass in the search: one chunk for ImageNet-1K


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the common flags plus the search's own."""
    parser.add_argument("--settings", type=str, default=None, metavar="JSON",
                        help="apply this best_settings.json (or SeTAR's config_best.json, or a plain list) instead of "
                             "searching (SETAR.SETTINGS_FILE); "
                             "'none' = the unpruned model")
    parser.add_argument("--mode", choices=("fast", "naive"), default=None,
                        help="search implementation (SETAR.MODE): fast (cached, exact; default) or naive")
    parser.add_argument("--no-test", action="store_true", help="stop after the search (no OOD benchmark)")
    add_common_arguments(parser, "setar")


# ------------------------------------------------------------------------------------ checks
def check_setar_cfg(cfg: Any, search: bool) -> dict:
    """Validate ``cfg.SETAR`` (and what the search needs) before anything is loaded.

    The rules are declared with the config (:func:`locoop.config.checks.check_setar`).

    Returns:
        ``{"ratios": [...], "weight_types": [...], "criterion": str}``.

    Raises:
        ValueError / FileNotFoundError: naming the key and the valid choices.
    """
    from locoop.config.checks import check_setar

    return check_setar(cfg, search)


def _settings_file(cfg: Any) -> str:
    return str(cfg.SETAR.SETTINGS_FILE or "").strip()


# ------------------------------------------------------------------------------------ prompts
def find_prompt_checkpoint(model_dir: str, epoch: Optional[int] = None) -> str:
    """The prompt learner checkpoint of a LoCoOp/CoOp run folder (best, else latest, or ``epoch``)."""
    from locoop.engine.checkpoint import latest_checkpoint

    found = check_model_dir(model_dir, epoch)
    if "prompt_learner" not in found:
        raise FileNotFoundError(f"--model-dir {model_dir} has no prompt_learner/ checkpoints (found: "
                                f"{', '.join(found)}); give the --output-dir of a LoCoOp or CoOp training run")
    folder = os.path.join(model_dir, "prompt_learner")
    if epoch is not None:
        return os.path.join(folder, f"model.pth.tar-{int(epoch)}")
    best = os.path.join(folder, "model-best.pth.tar")
    return best if os.path.isfile(best) else latest_checkpoint(folder)


def _checkpoint_classes(state: dict) -> Optional[int]:
    """Number of classes recorded in a prompt-learner state dict, if it records one."""
    for key in ("token_prefix", "token_suffix", "tokenized_prompts"):
        for k, v in state.items():
            if k.endswith(key) and hasattr(v, "shape") and v.ndim >= 1:
                return int(v.shape[0])
    ctx = next((v for k, v in state.items() if k.endswith("ctx")), None)
    if ctx is not None and ctx.ndim == 3:  # class-specific context [C, n_ctx, W]
        return int(ctx.shape[0])
    return None


def prompt_trainer_name(model_dir: str, epoch: Optional[int] = None) -> str:
    """The trainer that saved the prompts of ``model_dir`` (``LoCoOp`` when the checkpoint does not say)."""
    from locoop.engine.checkpoint import load_checkpoint

    saved = load_checkpoint(find_prompt_checkpoint(model_dir, epoch)).get("trainer")
    return str(saved) if saved in ("LoCoOp", "CoOp") else PROMPT_TRAINER


def check_prompt_checkpoint(model_dir: str, epoch: Optional[int], dataset: Any, dataset_name: str = "") -> dict:
    """Check a run's prompts against the dataset before loading them; returns the results' provenance.

    Raises:
        ValueError: the prompts were learned for another number of classes.
        FileNotFoundError: no prompt checkpoint in ``model_dir``.
    """
    from locoop.engine.checkpoint import load_checkpoint

    path = find_prompt_checkpoint(model_dir, epoch)
    ckpt = load_checkpoint(path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["state_dict"].items()}
    n_ckpt, n_data = _checkpoint_classes(state), int(dataset.num_classes)
    if n_ckpt is not None and n_ckpt != n_data:
        raise ValueError(f"the prompts in {path} were learned for {n_ckpt} classes, but the dataset "
                         f"{dataset_name} has {n_data}; use a run trained on the same dataset "
                         "(and DATASET.SUBSAMPLE_CLASSES)")
    info = read_run_info(model_dir) or {}
    ds_hash = getattr(dataset, "classnames_hash", None)
    if info.get("classnames_hash") and ds_hash and info["classnames_hash"] != ds_hash:
        print(f"Warning: {model_dir} was trained with class names {info.get('classnames_file')} "
              f"(sha256 {info['classnames_hash'][:12]}...), this run uses {getattr(dataset, 'classnames_file', '?')} "
              f"(sha256 {ds_hash[:12]}...)", file=sys.stderr)
    return {"prompts": "learned", "prompt_checkpoint": path, "prompt_epoch": ckpt.get("epoch")}


def check_search_trainer(name: str, model_dir: Optional[str]) -> type:
    """The trainer class setar-search builds: one with fixed class prompts, and its checkpoint if it needs one.

    Raises:
        ValueError: unknown trainer, one without ``class_prompts()``, or a prompt learner without ``--model-dir``.
    """
    from locoop.trainers.base import PromptTrainer

    cls = check_trainer(name)
    if getattr(cls, "VISION_ONLY", False):  # a classifier: no prompts, its logits are the classes
        if model_dir:
            raise ValueError(f"trainer {name!r} is a vision-only classifier without prompts; drop --model-dir "
                             f"{model_dir}")
        return cls
    if getattr(cls, "class_prompts", PromptTrainer.class_prompts) is PromptTrainer.class_prompts:
        raise ValueError(f"setar-search prunes a CLIP model with fixed class prompts; trainer {name!r} has none "
                         f"(class_prompts()); use {ZERO_SHOT_TRAINER} (zero-shot) or --model-dir of a LoCoOp/CoOp run")
    if trainer_needs_checkpoint(cls) and not model_dir:
        raise ValueError(f"trainer {name!r} learns its prompts: give its run folder with --model-dir, or leave "
                         f"TRAINER.NAME empty for zero-shot prompts (SETAR.PROMPT_TEMPLATE)")
    if model_dir and not trainer_needs_checkpoint(cls):
        raise ValueError(f"trainer {name!r} has no learned prompts to load from --model-dir {model_dir}; leave "
                         "TRAINER.NAME empty to use the trainer that saved them")
    return cls


def _sha256_tensor(t) -> str:
    import torch

    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ data
def check_search_dataset(cfg: Any, dataset: Any, criterion: str) -> list:
    """The ID validation items, checked to be disjoint from the test split; and top-K vs the classes.

    Raises:
        ValueError: no validation images, validation = test (the search would see test images),
            or ``SETAR.TOPK`` larger than the number of classes.
    """
    val = list(dataset.val or [])
    if not val:
        raise ValueError(f"the dataset {cfg.DATASET.NAME} has no validation images; set DATASET.VAL_SPLIT_FILE")
    test_paths = {d.impath for d in (dataset.test or [])}
    if dataset.val is dataset.test or (test_paths and all(d.impath in test_paths for d in val)):
        raise ValueError(
            "the validation split is the test split: the search must not see test images. Set "
            "DATASET.VAL_SPLIT_FILE to SeTAR's split JSON ({class folder: [file names]}, e.g. "
            "imagenet1k_val_data.json / voc_val_data.json from the SeTAR repository) or give the dataset a val/ folder")
    if criterion in ("loss", "loss_id", "loss_ood"):
        from locoop.trainers.loss import check_top_k

        check_top_k("SETAR.TOPK", int(cfg.SETAR.TOPK), dataset.num_classes, str(cfg.DATASET.NAME))
    return val


def _ood_val_items(cfg: Any) -> Dict[str, list]:
    from locoop.data import build_ood_datasets

    return build_ood_datasets(cfg.DATASET.ROOT, list(cfg.SETAR.OOD_VAL_DATASETS))


def build_search_data(cfg: Any, val: list, prompts: Any, criterion: str, mode: str, tfm: Any):
    """Decode and preprocess the ID validation images (and OOD ones for metric criteria) once.

    Batches come from the shared evaluation loader (:func:`locoop.ood.runner.eval_loader`).
    """
    from locoop.ood.runner import eval_loader
    from locoop.setar.search import SearchData

    use_ood = criterion in ("auroc", "aupr", "fpr95")

    def batches(items, with_labels: bool) -> list:
        loader = eval_loader(cfg, items, tfm)
        out = [(b["img"], b["label"]) if with_labels else b["img"] for b in loader]
        if loader.num_skipped:
            print(f"Note: skipped {loader.num_skipped} unreadable image(s)")
        return out

    def load() -> Tuple[list, list]:
        id_batches = batches(val, True)
        ood_batches: list = []
        if use_ood:
            for items in _ood_val_items(cfg).values():
                ood_batches.extend(batches(items, False))
        return id_batches, ood_batches

    id_batches, ood_batches = load()
    print(f"SeTAR validation data: {sum(len(b[1]) for b in id_batches)} ID images"
          + (f", {sum(len(b) for b in ood_batches)} OOD images" if use_ood else ""))
    # The naive mode decodes the images again for every candidate, as the reference does.
    return SearchData(id_batches, prompts, ood_batches=ood_batches, reload=load if mode == "naive" else None)


def _items_sha256(cfg: Any, items) -> str:
    root = os.path.abspath(str(cfg.DATASET.ROOT or "."))
    h = hashlib.sha256()
    for d in items:
        h.update(f"{os.path.relpath(os.path.abspath(d.impath), root)}|{d.label}\n".encode("utf-8"))
    return h.hexdigest()


def _cfg_identity(cfg: Any) -> Dict[str, Any]:
    """What the search results depend on that the config alone says (checked before anything loads)."""
    ident: Dict[str, Any] = {
        "dataset": str(cfg.DATASET.NAME),
        "preprocessing": {"INPUT.SIZE": list(cfg.INPUT.SIZE), "INPUT.INTERPOLATION": str(cfg.INPUT.INTERPOLATION),
                          "INPUT.PIXEL_MEAN": list(cfg.INPUT.PIXEL_MEAN), "INPUT.PIXEL_STD": list(cfg.INPUT.PIXEL_STD),
                          "INPUT.TRANSFORMS": list(cfg.INPUT.TRANSFORMS),
                          "DATALOADER.TEST.BATCH_SIZE": int(cfg.DATALOADER.TEST.BATCH_SIZE)},
    }
    if str(cfg.SETAR.CRITERION) in ("auroc", "aupr", "fpr95"):
        ident["ood_val_datasets"] = list(cfg.SETAR.OOD_VAL_DATASETS)
    return ident


def _search_kwargs(cfg: Any, checked: dict) -> Dict[str, Any]:
    return dict(searcher=cfg.SETAR.SEARCHER, weight_types=checked["weight_types"], ratios=checked["ratios"],
                prune_type=cfg.SETAR.PRUNE_TYPE, seed=max(int(cfg.SEED), 0), freeze_proj=bool(cfg.SETAR.FREEZE_PROJ),
                criterion=checked["criterion"], lam=float(cfg.SETAR.LAMBDA), top_k=int(cfg.SETAR.TOPK),
                score=str(cfg.SETAR.SCORE), T=float(cfg.OOD.T))


# ------------------------------------------------------------------------------------ run folder
def _check_run_folder(cfg: Any, search: bool, settings: Optional[list], checked: dict) -> Any:
    """The progress of an earlier search in OUTPUT_DIR, checked against this run (before loading).

    Raises:
        ValueError: a search with other config values, a best_settings.json of another run, or
            settings applied onto the folder of a search.
    """
    from locoop.setar.outputs import PROGRESS_FILE, SETTINGS_FILE, check_identity, read_progress
    from locoop.setar.search import search_identity

    out = cfg.OUTPUT_DIR
    progress = read_progress(out) if os.path.isdir(out) else None
    if search:
        if progress is None and os.path.isfile(os.path.join(out, SETTINGS_FILE)):
            raise ValueError(f"{out} already holds a {SETTINGS_FILE} but no {PROGRESS_FILE}: it belongs to another "
                             "run (applied settings, or a search of an earlier version); use another --output-dir "
                             f"or remove {SETTINGS_FILE} to search there")
        if progress is not None:  # what the config alone says; the rest once the model is loaded
            early = search_identity(0, extra=_cfg_identity(cfg), **_search_kwargs(cfg, checked))
            early.pop("num_classes")
            check_identity(progress, early, os.path.join(out, PROGRESS_FILE), partial=True)
        return progress
    if progress is not None and (not progress.complete or [list(s) for s in settings or []]
                                 != [list(s) for s in progress.settings]):
        raise ValueError(f"{out} holds the {PROGRESS_FILE} of a SeTAR search; writing the results of other settings "
                         "there would mix two runs; use another --output-dir")
    return None


def _identity_extra(cfg: Any, trainer: Any, prompts: Any, val: list) -> Dict[str, Any]:
    """Everything the search results depend on beyond :func:`locoop.setar.search.search_identity`'s arguments."""
    from locoop.setar.adapters import base_weights_sha256

    ident = _cfg_identity(cfg)
    # Contents, not paths: a moved checkpoint or data folder resumes; other weights or prompts do not.
    ident["backbone_sha256"] = base_weights_sha256(trainer.clip_model)
    ident["prompts"] = {"trainer": str(cfg.TRAINER.NAME), "sha256": None if prompts is None else
                        _sha256_tensor(prompts.tokens if prompts.tokens is not None else prompts.embeddings)}
    ident["val_split"] = {"images": len(val), "sha256": _items_sha256(cfg, val)}
    if "ood_val_datasets" in ident:
        ident["ood_val_split"] = {name: _items_sha256(cfg, items) for name, items in _ood_val_items(cfg).items()}
    return ident


# ------------------------------------------------------------------------------------ run
def _save_config_best(cfg: Any, settings: Any, args: argparse.Namespace, main_rank: bool) -> None:
    """The settings also as SeTAR's ``config_best.json`` (its argument names), for SeTAR's own scripts."""
    from locoop.config.setar_json import CONFIG_BEST_FILE, save_setar_config_best

    if main_rank:
        save_setar_config_best(os.path.join(cfg.OUTPUT_DIR, CONFIG_BEST_FILE), cfg, settings,
                               model_type="LoCoOp" if args.model_dir else None)


def _run(args: argparse.Namespace) -> int:
    cfg = build_cfg(args, freeze=False)
    if args.settings is not None:
        cfg.SETAR.SETTINGS_FILE = args.settings
    if args.mode is not None:
        cfg.SETAR.MODE = args.mode
    # The papers' --lambda_value / --topk flags set the search criterion's values here.
    if getattr(args, "lambda_value", None) is not None:
        cfg.SETAR.LAMBDA = float(args.lambda_value)
    if getattr(args, "topk", None) is not None:
        cfg.SETAR.TOPK = int(args.topk)
    if args.model_dir:  # the trainer that saved the prompts loads them
        cfg.TRAINER.NAME = str(cfg.TRAINER.NAME or "").strip() or prompt_trainer_name(args.model_dir, args.load_epoch)
    else:
        from locoop.models.swinv2 import is_swinv2_backbone

        default = SWIN_TRAINER if is_swinv2_backbone(str(cfg.MODEL.BACKBONE.NAME)) else ZERO_SHOT_TRAINER
        cfg.TRAINER.NAME = str(cfg.TRAINER.NAME or "").strip() or default
    cfg.TRAINER.LOCOOP.PREC = "fp32"  # SeTAR's precision, recorded as what ran
    cfg.freeze()
    check_search_trainer(cfg.TRAINER.NAME, args.model_dir)
    settings_file = _settings_file(cfg)
    search = not settings_file
    checked = check_setar_cfg(cfg, search)
    settings = None
    if settings_file and settings_file.lower() != NO_SETTINGS:
        from locoop.setar.settings import load_settings

        settings = load_settings(settings_file)  # form and marker now, layers once the model is loaded
    if not args.no_test:
        from locoop.ood.runner import check_benchmark_inputs

        check_benchmark_inputs(cfg)
    if not cfg.OUTPUT_DIR:
        raise ValueError("OUTPUT_DIR is empty; pass --output-dir")
    progress = _check_run_folder(cfg, search, settings, checked)
    prepare_run(cfg, args, lock=True)

    import torch

    from locoop.config import dump_cfg
    from locoop.engine import dist
    from locoop.engine.registry import build_trainer
    from locoop.setar.lowrank import LowRankEditor
    from locoop.setar.search import run_search
    from locoop.setar.settings import apply_settings, nonzero, save_best_settings

    trainer = build_trainer(cfg, need_train=False)  # device (cuda:LOCAL_RANK under torchrun), data, model
    dataset = trainer.dm.dataset
    main_rank = dist.is_main_process()
    val = check_search_dataset(cfg, dataset, checked["criterion"]) if search else None
    if args.model_dir:
        prompt_meta = check_prompt_checkpoint(args.model_dir, args.load_epoch, dataset, cfg.DATASET.NAME)
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
    elif getattr(trainer, "VISION_ONLY", False):
        prompt_meta = {"prompts": "none (vision-only classifier: its logits)"}
    else:
        template = getattr(trainer, "prompt_template", None)
        prompt_meta = {"prompts": f"zero-shot '{template()}'" if template else "zero-shot"}
    trainer.set_model_mode("eval")
    model, device = trainer.clip_model, trainer.device
    prompts = (None if getattr(trainer, "VISION_ONLY", False)
               else trainer.class_prompts(chunk_size=max(TEXT_CHUNK, int(cfg.DATALOADER.TEST.BATCH_SIZE))))
    if main_rank:
        dump_cfg(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    editor = LowRankEditor(model, prune_type=cfg.SETAR.PRUNE_TYPE, seed=max(int(cfg.SEED), 0))
    meta = {"setar": {"searcher": cfg.SETAR.SEARCHER, "weight_types": checked["weight_types"],
                      "prune_type": cfg.SETAR.PRUNE_TYPE, "ratios": checked["ratios"],
                      "criterion": checked["criterion"], "lambda": float(cfg.SETAR.LAMBDA),
                      "top_k": int(cfg.SETAR.TOPK), "freeze_proj": bool(cfg.SETAR.FREEZE_PROJ),
                      "mode": cfg.SETAR.MODE}, **prompt_meta}
    if args.model_dir:
        from locoop.engine.provenance import training_config_meta

        meta["model_dir"] = args.model_dir
        meta.update(training_config_meta(trainer))  # what the prompts were trained with

    if search:
        from locoop.setar.outputs import check_identity
        from locoop.setar.search import search_identity

        kw = _search_kwargs(cfg, checked)
        extra = _identity_extra(cfg, trainer, prompts, val)
        # Rank 0's progress for every rank, checked before any image is decoded.
        progress = dist.broadcast_object(progress if main_rank else None)
        if progress is not None:
            check_identity(progress, search_identity(int(dataset.num_classes), extra=extra, **kw),
                           os.path.join(cfg.OUTPUT_DIR, "search_progress.json"))
        tfm = _test_transform(trainer, cfg)
        data = build_search_data(cfg, val, prompts, checked["criterion"], cfg.SETAR.MODE, tfm)
        result = run_search(model, data, **kw, mode=cfg.SETAR.MODE, device=device,
                            output_dir=cfg.OUTPUT_DIR if main_rank else None,
                            verbose=bool(cfg.VERBOSE) and main_rank, cache_gib=float(cfg.SETAR.CACHE_GB),
                            editor=editor, identity=extra, resume=progress)
        settings = result.settings
        print(f"SeTAR search done in {result.seconds:.1f} s ({cfg.SETAR.MODE} mode): {checked['criterion']} "
              f"{result.baseline:.6g} -> {result.final:.6g}; pruned matrices: {len(nonzero(settings))} of "
              f"{len(settings)}" + (f" (resumed at step {', '.join(map(str, result.resumed_at))})"
                                    if result.resumed_at else ""))
        print(f"Best settings: {os.path.join(cfg.OUTPUT_DIR, 'best_settings.json')}")
        _save_config_best(cfg, settings, args, main_rank)
        meta["setar"].update({"baseline_criterion": result.baseline, "final_criterion": result.final,
                              "search_seconds": result.seconds, "counters": result.counters,
                              "resumed_at": list(result.resumed_at)})
    elif settings is not None:
        settings = apply_settings(editor, settings)
        if main_rank:
            save_best_settings(os.path.join(cfg.OUTPUT_DIR, "best_settings.json"), settings)
        _save_config_best(cfg, settings, args, main_rank)
        print(f"Applied {len(nonzero(settings))} non-zero settings from {settings_file}")
        meta["setar"]["settings_file"] = os.path.abspath(settings_file)
    else:
        settings = []
        print("SETAR.SETTINGS_FILE none: evaluating the unpruned model")
    meta["setar"]["settings"] = [list(s) for s in settings]

    if args.no_test:
        return 0
    from locoop.ood.runner import run_ood_benchmark

    with torch.no_grad():
        text = trainer.text_features()  # through the pruned text tower, as `eval` computes them
        run_ood_benchmark(cfg, model, text, cfg.OUTPUT_DIR, meta=meta, device=device, dataset=dataset,
                          verbose=bool(cfg.VERBOSE), precision=trainer.precision)
    return 0


def _test_transform(trainer: Any, cfg: Any):
    """The test transform of the trainer's data manager (the one ``eval`` uses)."""
    tfm = getattr(getattr(trainer, "dm", None), "tfm_test", None)
    if tfm is None:
        from locoop.data import build_transform

        tfm = build_transform(cfg, is_train=False)
    return tfm


def run(args: argparse.Namespace) -> int:
    """Search (or apply settings) and test; 2 on bad input."""
    return run_command("setar-search", _run, args)
