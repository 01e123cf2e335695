"""``python -m locoop setar-search``: SeTAR's training-free low-rank search, then the OOD benchmark.

    python -m locoop setar-search --root DATA \
        --dataset-config-file configs/datasets/imagenet.yaml \
        --config-file configs/setar/imagenet/SeTAR.yaml \
        --output-dir output/setar/imagenet/SeTAR DATASET.VAL_SPLIT_FILE imagenet1k_val_data.json

1. Search (``SETAR.*``): greedy over the searcher's matrices and ``SETAR.RATIOS``, scored on the
   ID *validation* split (``DATASET.VAL_SPLIT_FILE``, SeTAR's JSON) with the LoCoOp loss, or with
   an OOD metric on ``SETAR.OOD_VAL_DATASETS``. Writes ``search_log.csv``, ``search_log.json``,
   ``best_settings.json`` and ``search_summary.json`` into ``--output-dir``.
   ``--settings FILE`` (``SETAR.SETTINGS_FILE``) applies a saved ``best_settings.json`` instead
   of searching; ``none`` evaluates the unpruned model (vanilla MCM / GL-MCM).
2. Test: the pruned model through the shared OOD benchmark runner (``OOD.SCORES``, MCM and GL-MCM
   in the SeTAR configs, and ID accuracy): ``ood_results.{md,csv,json}``, ``ood_scores.npz``,
   ``plots/``. ``--no-test`` stops after the search.

Prompts: zero-shot ``SETAR.PROMPT_TEMPLATE`` (``"a photo of a {}."``; SeTAR's code writes
``"a photo of a {}"``), or with ``--model-dir RUN`` the learned prompts
of a LoCoOp/CoOp run (``RUN/prompt_learner/model-best.pth.tar`` or ``model.pth.tar-<epoch>``;
``TRAINER.LOCOOP.N_CTX / CSC / CTX_INIT / CLASS_TOKEN_POSITION`` must match the run).
The model runs in fp32 (SeTAR's reference does too); the SVDs are fp32 in any case.
``--lambda_value`` / ``--topk`` set ``SETAR.LAMBDA`` / ``SETAR.TOPK`` (the criterion's LoCoOp loss).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional, Tuple

from locoop.commands._common import (add_common_arguments, build_cfg, check_model_dir, prepare_run, read_run_info,
                                     run_command)

NO_SETTINGS = "none"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the common flags plus the search's own."""
    parser.add_argument("--settings", type=str, default=None, metavar="JSON",
                        help="apply this best_settings.json instead of searching (SETAR.SETTINGS_FILE); "
                             "'none' = the unpruned model")
    parser.add_argument("--mode", choices=("fast", "naive"), default=None,
                        help="search implementation (SETAR.MODE): fast (cached, exact; default) or naive")
    parser.add_argument("--no-test", action="store_true", help="stop after the search (no OOD benchmark)")
    add_common_arguments(parser, "setar")


# ------------------------------------------------------------------------------------ checks
def check_setar_cfg(cfg: Any, search: bool) -> dict:
    """Validate ``cfg.SETAR`` (and what the search needs) before anything is loaded.

    Returns:
        ``{"ratios": [...], "weight_types": [...], "criterion": str}``.

    Raises:
        ValueError / FileNotFoundError: naming the key and the valid choices.
    """
    from locoop.setar.lowrank import PRUNE_TYPES
    from locoop.setar.search import CRITERIA, MODES, check_ratios
    from locoop.setar.searchers import check_weight_types, get_searcher

    s = cfg.SETAR
    out: dict = {}
    try:
        get_searcher(s.SEARCHER)
        out["weight_types"] = check_weight_types(list(s.WEIGHT_TYPES))
        out["ratios"] = check_ratios(list(s.RATIOS))
    except ValueError as e:
        raise ValueError(f"SETAR config: {e}") from None
    if s.PRUNE_TYPE not in PRUNE_TYPES:
        raise ValueError(f"SETAR.PRUNE_TYPE = {s.PRUNE_TYPE!r} is not valid; choose one of {list(PRUNE_TYPES)}")
    if s.MODE not in MODES:
        raise ValueError(f"SETAR.MODE = {s.MODE!r} is not valid; choose one of {list(MODES)}")
    criterion = str(s.CRITERION)
    if criterion not in CRITERIA:
        raise ValueError(f"SETAR.CRITERION = {criterion!r} is not valid; choose one of {list(CRITERIA)}")
    out["criterion"] = criterion
    if float(s.LAMBDA) < 0:
        raise ValueError(f"SETAR.LAMBDA must be >= 0, got {s.LAMBDA}")
    if int(s.TOPK) < 1:
        raise ValueError(f"SETAR.TOPK must be >= 1, got {s.TOPK}")
    if float(s.CACHE_GB) < 0:
        raise ValueError(f"SETAR.CACHE_GB must be >= 0 (GiB of cached block inputs), got {s.CACHE_GB}")
    if str(s.PROMPT_TEMPLATE).count("{}") != 1:
        raise ValueError(f"SETAR.PROMPT_TEMPLATE must contain '{{}}' once for the class name, "
                         f"got {s.PROMPT_TEMPLATE!r}")
    if search and criterion in ("auroc", "aupr", "fpr95"):
        if not list(s.OOD_VAL_DATASETS):
            raise ValueError(f"SETAR.CRITERION {criterion!r} needs OOD validation sets in SETAR.OOD_VAL_DATASETS; "
                             "or use SETAR.CRITERION loss (ID validation data only)")
        from locoop.data.datasets.ood import check_ood_folders
        from locoop.ood.scores import resolve_score_names

        resolve_score_names([s.SCORE], have_local=True)
        check_ood_folders(cfg.DATASET.ROOT, list(s.OOD_VAL_DATASETS))
    return out


def _settings_file(cfg: Any) -> str:
    return str(cfg.SETAR.SETTINGS_FILE or "").strip()


# ------------------------------------------------------------------------------------ model / text
def _device(cfg: Any):
    import torch

    if cfg.MODEL.DEVICE:
        return torch.device(cfg.MODEL.DEVICE)
    return torch.device("cuda" if cfg.USE_CUDA and torch.cuda.is_available() else "cpu")


def _load_clip(cfg: Any, device):
    import clip

    name = str(cfg.MODEL.BACKBONE.NAME or "").strip()
    if not name:
        raise ValueError("MODEL.BACKBONE.NAME is empty: set a CLIP model name (e.g. ViT-B/16) or a checkpoint path "
                         "(--backbone)")
    model, _ = clip.load(name, device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.float().to(device).eval()


def find_prompt_checkpoint(model_dir: str, epoch: Optional[int] = None) -> str:
    """The prompt learner checkpoint of a LoCoOp/CoOp run folder (best, else latest, or ``epoch``)."""
    from locoop.engine.checkpoint import latest_checkpoint

    found = check_model_dir(model_dir, epoch)
    sub = "prompt_learner" if "prompt_learner" in found else None
    if sub is None:
        raise FileNotFoundError(f"--model-dir {model_dir} has no prompt_learner/ checkpoints (found: "
                                f"{', '.join(found)}); give the --output-dir of a LoCoOp or CoOp training run")
    folder = os.path.join(model_dir, sub)
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


def build_text(cfg: Any, model, classnames: List[str], model_dir: Optional[str], epoch: Optional[int],
               dataset: Any = None):
    """Class prompts as :class:`~locoop.setar.search.TextInputs`: zero-shot or a run's learned prompts.

    Raises:
        ValueError: the checkpoint was trained for another number of classes, or another N_CTX/CSC.
    """
    import clip
    import torch

    from locoop.setar.search import TextInputs

    chunk = max(1, int(cfg.DATALOADER.TEST.BATCH_SIZE))
    chunk = max(chunk, 1000)  # text forward passes are cheap; one chunk for ImageNet-1K
    if not model_dir:
        template = str(cfg.SETAR.PROMPT_TEMPLATE)
        names = [c.replace("_", " ") for c in classnames]
        tokens = clip.tokenize([template.format(n) for n in names])
        return TextInputs(tokens=tokens, chunk_size=chunk), {"prompts": f"zero-shot '{template}'"}

    from locoop.engine.checkpoint import load_checkpoint
    from locoop.trainers.prompt_learner import PromptLearner

    path = find_prompt_checkpoint(model_dir, epoch)
    ckpt = load_checkpoint(path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["state_dict"].items()}
    n_ckpt = _checkpoint_classes(state)
    if n_ckpt is not None and n_ckpt != len(classnames):
        raise ValueError(f"the prompts in {path} were learned for {n_ckpt} classes, but the dataset "
                         f"{cfg.DATASET.NAME} has {len(classnames)}; use a run trained on the same dataset "
                         "(and DATASET.SUBSAMPLE_CLASSES)")
    info = read_run_info(model_dir) or {}
    ds_hash = getattr(dataset, "classnames_hash", None)
    if info.get("classnames_hash") and ds_hash and info["classnames_hash"] != ds_hash:
        print(f"Warning: {model_dir} was trained with class names {info.get('classnames_file')} "
              f"(sha256 {info['classnames_hash'][:12]}...), this run uses {getattr(dataset, 'classnames_file', '?')} "
              f"(sha256 {ds_hash[:12]}...)", file=sys.stderr)
    c = cfg.TRAINER.LOCOOP
    pl = PromptLearner(classnames, model, n_ctx=c.N_CTX, ctx_init=c.CTX_INIT, csc=c.CSC,
                       class_token_position=c.CLASS_TOKEN_POSITION)
    pl.load_state_dict(state, strict=True)
    with torch.no_grad():
        embeddings = pl().detach()
    meta = {"prompts": "learned", "prompt_checkpoint": path, "prompt_epoch": ckpt.get("epoch")}
    return TextInputs(embeddings=embeddings, eot_idx=pl.eot_idx.detach().clone(), chunk_size=chunk), meta


def text_features(model, text) -> "torch.Tensor":
    """Normalised class features ``[C, D]`` of ``text`` through the (pruned) model."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    feats = []
    with torch.no_grad():
        for sl in text.chunks():
            if text.tokens is not None:
                f = model.encode_text(text.tokens[sl].to(device))
            else:
                f = model.encode_text_embeddings(text.embeddings[sl].to(device), text.eot_idx[sl].to(device))
            feats.append(F.normalize(f.float(), dim=-1))
    return torch.cat(feats)


# ------------------------------------------------------------------------------------ data
def _batches(cfg: Any, items, tfm, with_labels: bool) -> list:
    from locoop.data import build_data_loader

    loader = build_data_loader(items, int(cfg.DATALOADER.TEST.BATCH_SIZE), tfm, is_train=False,
                               num_workers=int(cfg.DATALOADER.NUM_WORKERS), seed=0,
                               strict=bool(cfg.DATASET.STRICT), shuffle=False)
    out = []
    for batch in loader:
        out.append((batch["img"], batch["label"]) if with_labels else batch["img"])
    if loader.num_skipped:
        print(f"Note: skipped {loader.num_skipped} unreadable image(s)")
    return out


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
    if criterion in ("loss", "loss_id", "loss_ood") and int(cfg.SETAR.TOPK) > dataset.num_classes:
        raise ValueError(f"SETAR.TOPK {cfg.SETAR.TOPK} exceeds the {dataset.num_classes} classes of "
                         f"{cfg.DATASET.NAME}; SeTAR uses 300 of 1000 (ImageNet) and 4 of 14 (VOC)")
    return val


def build_search_data(cfg: Any, dataset: Any, text, criterion: str, mode: str):
    """Preprocess the ID validation images (and OOD validation images for metric criteria) once."""
    from locoop.data import build_ood_datasets, build_transform
    from locoop.setar.search import SearchData

    val = check_search_dataset(cfg, dataset, criterion)
    tfm = build_transform(cfg, is_train=False)
    use_ood = criterion in ("auroc", "aupr", "fpr95")

    def load() -> Tuple[list, list]:
        id_batches = _batches(cfg, val, tfm, True)
        ood_batches: list = []
        if use_ood:
            for items in build_ood_datasets(cfg.DATASET.ROOT, list(cfg.SETAR.OOD_VAL_DATASETS)).values():
                ood_batches.extend(_batches(cfg, items, tfm, False))
        return id_batches, ood_batches

    id_batches, ood_batches = load()
    print(f"SeTAR validation data: {sum(len(b[1]) for b in id_batches)} ID images"
          + (f", {sum(len(b) for b in ood_batches)} OOD images" if use_ood else ""))
    # The naive mode decodes the images again for every candidate, as the reference does.
    return SearchData(id_batches, text, ood_batches=ood_batches, reload=load if mode == "naive" else None)


# ------------------------------------------------------------------------------------ run
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
    cfg.freeze()
    settings_file = _settings_file(cfg)
    search = not settings_file
    checked = check_setar_cfg(cfg, search)
    settings = None
    if settings_file and settings_file.lower() != NO_SETTINGS:
        from locoop.setar.settings import load_settings

        settings = load_settings(settings_file)  # format checked now, layers once the model is loaded
    if not args.no_test:
        from locoop.ood.runner import check_benchmark_inputs

        check_benchmark_inputs(cfg)
    if args.model_dir:
        find_prompt_checkpoint(args.model_dir, args.load_epoch)
    if not cfg.OUTPUT_DIR:
        raise ValueError("OUTPUT_DIR is empty; pass --output-dir")
    prepare_run(cfg, args)

    import torch

    from locoop.config import dump_cfg
    from locoop.data import build_dataset
    from locoop.setar.lowrank import LowRankEditor
    from locoop.setar.search import run_search
    from locoop.setar.settings import apply_settings, nonzero, save_settings

    device = _device(cfg)
    dataset = build_dataset(cfg, need_train=False)
    if search:
        check_search_dataset(cfg, dataset, checked["criterion"])  # before the model is loaded
    model = _load_clip(cfg, device)
    text, text_meta = build_text(cfg, model, list(dataset.classnames), args.model_dir, args.load_epoch, dataset)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    dump_cfg(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    editor = LowRankEditor(model, prune_type=cfg.SETAR.PRUNE_TYPE, seed=max(int(cfg.SEED), 0))
    meta = {"setar": {"searcher": cfg.SETAR.SEARCHER, "weight_types": checked["weight_types"],
                      "prune_type": cfg.SETAR.PRUNE_TYPE, "ratios": checked["ratios"],
                      "criterion": checked["criterion"], "lambda": float(cfg.SETAR.LAMBDA),
                      "top_k": int(cfg.SETAR.TOPK), "freeze_proj": bool(cfg.SETAR.FREEZE_PROJ),
                      "mode": cfg.SETAR.MODE}, **text_meta}
    if args.model_dir:
        meta["model_dir"] = args.model_dir

    from locoop.engine import dist

    # Under torchrun every rank runs the (deterministic) search so all hold the pruned model for the
    # sharded test pass; only rank 0 shows progress and writes the search files.
    main_rank = dist.is_main_process()
    if search:
        data = build_search_data(cfg, dataset, text, checked["criterion"], cfg.SETAR.MODE)
        result = run_search(
            model, data, searcher=cfg.SETAR.SEARCHER, weight_types=checked["weight_types"],
            ratios=checked["ratios"], prune_type=cfg.SETAR.PRUNE_TYPE, seed=max(int(cfg.SEED), 0),
            freeze_proj=bool(cfg.SETAR.FREEZE_PROJ), criterion=checked["criterion"], lam=float(cfg.SETAR.LAMBDA),
            top_k=int(cfg.SETAR.TOPK), score=str(cfg.SETAR.SCORE), T=float(cfg.OOD.T), mode=cfg.SETAR.MODE,
            device=device, output_dir=cfg.OUTPUT_DIR if main_rank else None, verbose=bool(cfg.VERBOSE) and main_rank,
            cache_gib=float(cfg.SETAR.CACHE_GB), editor=editor)
        settings = result.settings
        print(f"SeTAR search done in {result.seconds:.1f} s ({cfg.SETAR.MODE} mode): {checked['criterion']} "
              f"{result.baseline:.6g} -> {result.final:.6g}; pruned matrices: {len(nonzero(settings))} of "
              f"{len(settings)}")
        print(f"Best settings: {os.path.join(cfg.OUTPUT_DIR, 'best_settings.json')}")
        meta["setar"].update({"baseline_criterion": result.baseline, "final_criterion": result.final,
                              "search_seconds": result.seconds, "counters": result.counters})
    elif settings is not None:
        settings = apply_settings(editor, settings)
        if main_rank:
            save_settings(os.path.join(cfg.OUTPUT_DIR, "best_settings.json"), settings)
        print(f"Applied {len(nonzero(settings))} non-zero settings from {settings_file}")
        meta["setar"]["settings_file"] = os.path.abspath(settings_file)
    else:
        settings = []
        print("SETAR.SETTINGS_FILE none: evaluating the unpruned model")
    meta["setar"]["settings"] = [list(s) for s in settings]

    if args.no_test:
        return 0
    from locoop.ood.runner import run_ood_benchmark

    feats = text_features(model, text)
    with torch.no_grad():
        run_ood_benchmark(cfg, model, feats, cfg.OUTPUT_DIR, meta=meta, device=device, dataset=dataset,
                          verbose=bool(cfg.VERBOSE))
    return 0


def run(args: argparse.Namespace) -> int:
    """Search (or apply settings) and test; 2 on bad input."""
    return run_command("setar-search", _run, args)
