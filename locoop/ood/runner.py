"""The OOD benchmark: ID test set vs. every OOD set, all scores from one pass over the images.

:func:`run_ood_benchmark` is a function of (model, text features) so that every method shares it:
LoCoOp/CoOp pass their learned prompts' text features, zero-shot CLIP its hand-written prompts,
SeTAR its pruned model. Protocol (MCM / GL-MCM / LoCoOp): ID = ``cfg.DATASET`` test split with the
test transform; OOD = the folders of ``cfg.OOD.DATASETS`` under ``cfg.DATASET.ROOT``; ID is the
positive class; all ``cfg.OOD.SCORES`` use the temperature ``cfg.OOD.T`` on cosine similarities.

Everything that can be wrong with the input (score names, T, OOD folders, the ID dataset, the
number of classes) is checked before the first image is encoded.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from locoop.ood.features import iter_feature_batches, score_features

__all__ = ["run_ood_benchmark", "check_benchmark_inputs", "SCORES_NPZ", "PLOTS_DIR"]

SCORES_NPZ = "ood_scores.npz"  # raw per-image scores, to recompute metrics without the model
PLOTS_DIR = "plots"  # histograms of ID vs OOD scores per score and OOD set
FPR_CONVENTIONS = ("mcm", "openood")


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def check_benchmark_inputs(cfg: Any) -> Dict[str, Any]:
    """Validate the OOD settings of ``cfg`` without touching any image.

    Checks the score names, ``OOD.T``, ``OOD.FPR_CONVENTION`` and that every folder of
    ``OOD.DATASETS`` exists under ``DATASET.ROOT`` (all missing ones named in one error).

    Returns:
        ``{"scores": canonical score names, "ood_folders": {set: folder}, "T": float,
        "convention": str, "with_local": bool}``.

    Raises:
        ValueError: unknown score or OOD set, bad temperature or convention, empty lists.
        FileNotFoundError: OOD folders missing.
    """
    from locoop.data.datasets.ood import check_ood_folders
    from locoop.ood.scores import get_score, resolve_score_names

    names = list(cfg.OOD.SCORES)
    if not names:
        raise ValueError("OOD.SCORES is empty; list at least one score, e.g. OOD.SCORES \"['MCM', 'GL-MCM']\"")
    scores = resolve_score_names(names, have_local=True)
    try:
        T = float(cfg.OOD.T)
    except (TypeError, ValueError):
        raise ValueError(f"OOD.T (--T) must be a number, got {cfg.OOD.T!r}") from None
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"OOD.T (--T) must be a finite number > 0, got {cfg.OOD.T!r}")
    convention = str(cfg.OOD.FPR_CONVENTION).lower()
    if convention not in FPR_CONVENTIONS:
        raise ValueError(f"OOD.FPR_CONVENTION = {cfg.OOD.FPR_CONVENTION!r} is not valid; choose one of "
                         f"{list(FPR_CONVENTIONS)}")
    sets = list(cfg.OOD.DATASETS)
    if not sets:
        raise ValueError("OOD.DATASETS is empty; list the OOD sets, e.g. OOD.DATASETS \"['iNaturalist', 'SUN']\"")
    if not cfg.DATASET.ROOT:
        raise ValueError("DATASET.ROOT is empty; pass --root DATA (the folder holding imagenet/ and the OOD sets)")
    folders = check_ood_folders(cfg.DATASET.ROOT, sets)
    return {"scores": scores, "ood_folders": folders, "T": T, "convention": convention,
            "with_local": any(get_score(s).needs_local for s in scores)}


def _loader(cfg: Any, items: Sequence, tfm: Any):
    from locoop.data import build_data_loader

    return build_data_loader(items, int(cfg.DATALOADER.TEST.BATCH_SIZE), tfm, is_train=False,
                             num_workers=int(cfg.DATALOADER.NUM_WORKERS), seed=0,
                             strict=bool(cfg.DATASET.STRICT), shuffle=False)


def _dataset_meta(dataset: Any) -> Dict[str, Any]:
    out = {}
    for key in ("classnames_file", "classnames_hash", "split_file", "split_hash", "val_split_file", "val_split_hash"):
        value = getattr(dataset, key, None)
        if value is not None:
            out[key] = value
    return out


def run_ood_benchmark(cfg: Any, clip_model: torch.nn.Module, text_features: torch.Tensor,
                      output_dir: Union[str, Path], meta: Optional[Mapping[str, Any]] = None,
                      device: Optional[Union[str, torch.device]] = None, dataset: Any = None,
                      verbose: bool = True) -> Dict[str, Any]:
    """Evaluate OOD detection of ``(clip_model, text_features)`` and write the result files.

    Args:
        cfg: config (``DATASET.*``, ``DATALOADER.TEST.BATCH_SIZE``, ``DATALOADER.NUM_WORKERS``,
            ``INPUT.*`` for the test transform, ``OOD.DATASETS``, ``OOD.SCORES``, ``OOD.T``,
            ``OOD.FPR_CONVENTION``, ``OOD.PLOT``, ``TRAINER.LOCOOP.PREC`` (amp -> autocast)).
        clip_model: CLIP model with ``encode_image(images, return_local=True)`` in eval mode.
        text_features: ``[C, D]`` class text features (normalised or not; normalised here).
        output_dir: where ``ood_results.{md,csv,json}``, ``ood_scores.npz`` and ``plots/`` go.
        meta: extra provenance for ``ood_results.json`` (model dir, epoch, trainer, ...);
            the config, dataset hashes, image counts and environment are added here.
        device: where the model runs (default: the model's device).
        dataset: a ready ID dataset (default: built from ``cfg`` without its training split).
        verbose: print progress lines and the results table.

    Returns:
        ``{"metrics": {score: {set: {fpr95, auroc, aupr, ...}}} (fractions), "id_accuracy":
        fraction, "files": {md, csv, json, npz}, "plots": [paths], "id_scores": {score: [N]},
        "ood_scores": {set: {score: [M]}}, "num_images": {set: n}, "num_skipped": {set: n},
        "seconds": float}``.

    Raises:
        ValueError / FileNotFoundError: bad settings or missing folders (before any image is
        encoded); a text-feature count that differs from the dataset's classes.
    """
    from locoop.config import cfg_to_dict
    from locoop.data import build_dataset, build_ood_datasets, build_transform
    from locoop.ood.metrics import ood_metrics
    from locoop.ood.results import format_table, write_results

    t0 = time.time()
    checked = check_benchmark_inputs(cfg)
    scores, T, convention = checked["scores"], checked["T"], checked["convention"]
    if dataset is None:
        dataset = build_dataset(cfg, need_train=False)
    if not isinstance(text_features, torch.Tensor) or text_features.ndim != 2:
        raise ValueError("text_features must be a [C, D] tensor of class text features")
    if text_features.shape[0] != dataset.num_classes:
        raise ValueError(f"text_features has {text_features.shape[0]} rows but the ID dataset "
                         f"{cfg.DATASET.NAME} has {dataset.num_classes} classes; build the text features "
                         "from the same dataset's class names")
    if not dataset.test:
        raise ValueError(f"the ID dataset {cfg.DATASET.NAME} has no test images")
    ood_items = build_ood_datasets(cfg.DATASET.ROOT, list(cfg.OOD.DATASETS))
    device = torch.device(device) if device is not None else _model_device(clip_model)
    tfm = build_transform(cfg, is_train=False)
    amp = str(getattr(cfg.TRAINER.LOCOOP, "PREC", "")) == "amp" and device.type == "cuda"
    logit_scale = float(clip_model.logit_scale.exp().item()) if hasattr(clip_model, "logit_scale") else 100.0
    text_features = text_features.detach().to(device)
    was_training = clip_model.training
    clip_model.eval()

    def encode_and_score(name: str, items: Sequence):
        """Stream one set through the model; keep only scores, predictions and labels."""
        if verbose:
            print(f"Encoding {name}: {len(items):,} images")
        loader = _loader(cfg, items, tfm)
        parts, preds, labels = {s: [] for s in scores}, [], []
        for batch in iter_feature_batches(clip_model, loader, device, with_local=checked["with_local"], amp=amp,
                                          desc=name, progress=None if verbose else False):
            batch_scores, batch_preds = score_features(batch, text_features, scores, T=T, logit_scale=logit_scale,
                                                       device=device)
            for s, v in batch_scores.items():
                parts[s].append(v)
            preds.append(batch_preds)
            labels.append(batch.labels.numpy())
        skipped = sorted(getattr(loader, "skipped", {}) or {})
        if not preds:
            raise ValueError(f"{name}: none of the {len(items)} images could be read ({len(skipped)} skipped)")
        num_images[name], num_skipped[name], skipped_paths[name] = sum(len(p) for p in preds), len(skipped), skipped
        return {s: np.concatenate(v) for s, v in parts.items()}, np.concatenate(preds), np.concatenate(labels)

    num_images: Dict[str, int] = {}
    num_skipped: Dict[str, int] = {}
    skipped_paths: Dict[str, list] = {}
    try:
        id_scores, preds, labels = encode_and_score("ID", dataset.test)
        id_accuracy = float((preds == labels).mean())
        ood_scores: Dict[str, Dict[str, np.ndarray]] = {}
        for set_name, items in ood_items.items():
            ood_scores[set_name], _, _ = encode_and_score(set_name, items)
    finally:
        clip_model.train(was_training)

    include_openood = convention == "openood"
    metrics = {s: {o: ood_metrics(id_scores[s], per[s], include_openood=include_openood)
                   for o, per in ood_scores.items()} for s in scores}

    full_meta: Dict[str, Any] = {
        "id_dataset": cfg.DATASET.NAME,
        "ood_datasets": list(ood_scores),
        "ood_folders": checked["ood_folders"],
        "scores": scores,
        "T": T,
        "logit_scale": logit_scale,
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "trainer": cfg.TRAINER.NAME,
        "device": str(device),
        "num_images": num_images,
        "num_skipped": num_skipped,
        "skipped_images": {k: v[:50] for k, v in skipped_paths.items() if v},
        "openood_metrics_included": include_openood,
    }
    full_meta.update(_dataset_meta(dataset))
    full_meta.update(dict(meta or {}))  # the caller knows better (e.g. the training few-shot split)
    full_meta["config"] = cfg_to_dict(cfg)

    out = Path(output_dir)
    files = write_results(out, metrics, meta=full_meta, id_accuracy=id_accuracy)
    npz = {"id_labels": labels, "id_predictions": preds}
    for s, v in id_scores.items():
        npz[f"ID/{s}"] = v
    for o, per in ood_scores.items():
        for s, v in per.items():
            npz[f"{o}/{s}"] = v
    npz_path = out / SCORES_NPZ
    tmp = out / f".{SCORES_NPZ}.tmp.npz"
    np.savez_compressed(tmp, **npz)
    os.replace(tmp, npz_path)
    files = dict(files, npz=npz_path)

    plots = []
    if bool(cfg.OOD.PLOT):
        from locoop.viz.plots import plot_all_histograms

        by_score = {s: {o: ood_scores[o][s] for o in ood_scores} for s in scores}
        for paths in plot_all_histograms(id_scores, by_score, out / PLOTS_DIR).values():
            plots.extend(paths)

    if verbose:
        print(format_table(metrics, id_accuracy))
        print(f"\nResults: {files['md']}, {files['csv']}, {files['json']}"
              + (f"\nHistograms: {out / PLOTS_DIR}/ ({len(plots)} PNG)" if plots else ""))
    return {
        "metrics": metrics,
        "id_accuracy": id_accuracy,
        "files": files,
        "plots": plots,
        "id_scores": id_scores,
        "ood_scores": ood_scores,
        "num_images": num_images,
        "num_skipped": num_skipped,
        "seconds": time.time() - t0,
    }
