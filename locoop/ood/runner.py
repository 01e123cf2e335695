"""The OOD benchmark: ID test set vs. every OOD set, all scores from one pass over the images.

:func:`run_ood_benchmark` is a function of (model, text features) so that every method shares it:
LoCoOp/CoOp pass their learned prompts' text features, zero-shot CLIP its hand-written prompts,
SeTAR its pruned model. Protocol (MCM / GL-MCM / LoCoOp): ID = ``cfg.DATASET`` test split with the
test transform; OOD = the folders of ``cfg.OOD.DATASETS`` under ``cfg.DATASET.ROOT``; ID is the
positive class; all ``cfg.OOD.SCORES`` use the temperature ``cfg.OOD.T`` on cosine similarities.

Everything that can be wrong with the input (score names, T, OOD folders, the ID dataset, the
number of classes) is checked before the first image is encoded.

Feature cache (:mod:`locoop.ood.cache`): with ``OOD.USE_CACHE`` (default) a set whose features
``python -m locoop extract`` stored for this very image encoder, preprocessing and file list is
read from the cache instead of encoded; a modified encoder (SeTAR-pruned, fine-tuned) has other
weights, hence another key, and is encoded as usual.

Distributed (torchrun): each rank encodes and scores a contiguous shard of every set; the scores
are gathered in rank order (= data order), so each image is scored once; rank 0 writes the files.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from locoop.engine import dist
from locoop.ood.features import iter_feature_batches, score_features

__all__ = ["run_ood_benchmark", "check_benchmark_inputs", "extraction_amp", "cache_set_name", "eval_loader",
           "SCORES_NPZ", "PLOTS_DIR"]

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


def eval_loader(cfg: Any, items: Sequence, tfm: Any, indices: Optional[Sequence[int]] = None):
    """The evaluation loader of ``items`` (in order), restricted to ``indices`` when given (a shard)."""
    from locoop.data import build_data_loader

    return build_data_loader(items, int(cfg.DATALOADER.TEST.BATCH_SIZE), tfm, is_train=False,
                             num_workers=int(cfg.DATALOADER.NUM_WORKERS), seed=0,
                             strict=bool(cfg.DATASET.STRICT), shuffle=False, sampler=indices)



def extraction_amp(cfg: Any, device: Union[str, torch.device]) -> bool:
    """Whether image features are computed under fp16 autocast: ``TRAINER.LOCOOP.PREC amp`` on CUDA."""
    return str(getattr(cfg.TRAINER.LOCOOP, "PREC", "")) == "amp" and torch.device(device).type == "cuda"


def cache_set_name(cfg: Any, set_name: str) -> str:
    """Name of a set in the feature cache: ``ID-<DATASET.NAME>`` for the ID test set, else the OOD set's."""
    return f"ID-{cfg.DATASET.NAME}" if set_name == "ID" else set_name


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
                      verbose: bool = True, use_cache: Optional[bool] = None) -> Dict[str, Any]:
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
        use_cache: read matching entries of the feature cache (``OOD.CACHE_DIR``); None =
            ``OOD.USE_CACHE``. Entries are keyed by the image encoder's weights, so a modified
            encoder never matches; False also skips hashing the weights.

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
    dist.init_from_env(device)  # no-op without torchrun
    distributed, main = dist.is_distributed(), dist.is_main_process()
    verbose = verbose and main
    tfm = build_transform(cfg, is_train=False)
    amp = extraction_amp(cfg, device)
    use_cache = bool(getattr(cfg.OOD, "USE_CACHE", False)) if use_cache is None else bool(use_cache)
    cache = None
    if use_cache:
        from locoop.ood.cache import FeatureCache, resolve_cache_dir

        cache = FeatureCache(resolve_cache_dir(cfg), verbose=verbose)
    visual_fp: list = []  # computed at most once, and only when the cache has an entry for some set
    batch_size = int(cfg.DATALOADER.TEST.BATCH_SIZE)
    logit_scale = float(clip_model.logit_scale.exp().item()) if hasattr(clip_model, "logit_scale") else 100.0
    text_features = text_features.detach().to(device)
    was_training = clip_model.training
    clip_model.eval()

    def cached_entry(name: str, items: Sequence):
        """The matching cache entry of a set (rank 0 decides for all ranks), or None."""
        from locoop.ood.cache import CachedFeatures, FeatureCache, make_key, visual_fingerprint

        path = None
        if main and cache.entries(cache_set_name(cfg, name)):
            if not visual_fp:
                visual_fp.append(visual_fingerprint(clip_model))
                if visual_fp[0] is None and verbose:
                    print("Feature cache not used: the image encoder has forward hooks")
            key = make_key(clip_model, tfm, items, device, amp, visual=visual_fp[0]) if visual_fp[0] else None
            hit = cache.lookup(cache_set_name(cfg, name), key, need_local=checked["with_local"])
            path = str(hit.path) if hit is not None else None
        path = dist.broadcast_object(path)
        if not path:
            return None
        try:
            entry = CachedFeatures(Path(path), FeatureCache.read_manifest(Path(path)))
        except ValueError:
            entry = None  # e.g. a cache folder that is not shared between nodes
        if not all(dist.all_gather_object(entry is not None)):
            if verbose:
                print(f"{name}: cached features in {path} are not readable on every rank; encoding the images")
            return None
        return entry

    def encode_and_score(name: str, items: Sequence):
        """Stream one set (this rank's shard) through the model or from the cache; keep only scores."""
        from locoop.ood.cache import format_bytes

        entry = cached_entry(name, items) if cache is not None else None
        if entry is not None:
            if verbose:
                print(f"{name}: using cached features from {entry.path} ({entry.num_rows:,} images, "
                      f"{format_bytes(entry.size_bytes)})")
            shard = dist.shard_indices(entry.num_rows, align=batch_size)
            batches = entry.iter_batches(shard.start, shard.stop, batch_size, with_local=checked["with_local"])
            loader = None
        else:
            if verbose:
                print(f"Encoding {name}: {len(items):,} images"
                      + (f" on {dist.get_world_size()} processes" if distributed else ""))
            # Shards of whole batches: each rank encodes exactly the batches one process would.
            shard = dist.shard_indices(len(items), align=batch_size) if distributed else None
            loader = eval_loader(cfg, items, tfm, shard)
            batches = iter_feature_batches(clip_model, loader, device, with_local=checked["with_local"], amp=amp,
                                           desc=name, progress=None if verbose else False)
        parts, preds, labels = {s: [] for s in scores}, [], []
        for batch in batches:
            batch_scores, batch_preds = score_features(batch, text_features, scores, T=T, logit_scale=logit_scale,
                                                       lambda_local=float(cfg.OOD.LAMBDA_LOCAL), device=device)
            for s, v in batch_scores.items():
                parts[s].append(v)
            preds.append(batch_preds)
            labels.append(batch.labels.numpy())
        skipped_map = entry.skipped_paths if entry is not None else dict(getattr(loader, "skipped", {}) or {})
        if distributed:  # shards in rank order = data order; an empty shard adds nothing
            gathered = dist.all_gather_object((parts, preds, labels, skipped_map))
            parts = {s: [a for g in gathered for a in g[0][s]] for s in scores}
            preds = [a for g in gathered for a in g[1]]
            labels = [a for g in gathered for a in g[2]]
            skipped_map = {k: v for g in gathered for k, v in g[3].items()}
        preds = [p for p in preds if len(p)]
        skipped = sorted(skipped_map)
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
    if not main:  # rank 0 writes the files; the others wait for them and return the same numbers
        dist.barrier()
        return {"metrics": metrics, "id_accuracy": id_accuracy, "files": {}, "plots": [], "id_scores": id_scores,
                "ood_scores": ood_scores, "num_images": num_images, "num_skipped": num_skipped,
                "seconds": time.time() - t0}
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
    dist.barrier()  # the other ranks return once the files exist
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
