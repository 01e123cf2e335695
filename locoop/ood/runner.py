"""The OOD benchmark: ID test set vs. every OOD set, all scores from one pass over the images.

:func:`run_ood_benchmark` is a function of (model, text features) so that every method shares it:
LoCoOp/CoOp pass their learned prompts' text features, zero-shot CLIP its hand-written prompts,
SeTAR its pruned model. Protocol (MCM / GL-MCM / LoCoOp): ID = ``cfg.DATASET`` test split with the
test transform; OOD = the folders of ``cfg.OOD.DATASETS`` under ``cfg.DATASET.ROOT``; ID is the
positive class; all ``cfg.OOD.SCORES`` use the temperature ``cfg.OOD.T`` on cosine similarities.

Everything that can be wrong with the input (score names, T, OOD folders or image lists, the ID
dataset, the number of classes, a negative-label score's lexicon) is checked before the first image
is encoded.

Image-list benchmarks (``OOD.BENCHMARK``, e.g. ``openood_v1.5_imagenet``): the OOD sets are read
from the benchmark's ``path label`` lists instead of folders (:func:`benchmark_ood_sets`), and the
result tables are grouped near / far with their averages.

Scores that need extra text features (NegLabel, CSP: negative labels; :mod:`locoop.ood.textbank`)
get them from :func:`build_text_side`, once per evaluation, before the first image is encoded; their
cosines come from the global image features, so a re-evaluation from the feature cache only
recomputes this text side.

Feature cache (:mod:`locoop.ood.cache`): with ``OOD.USE_CACHE`` (default) a set whose features
``python -m locoop extract`` stored for this very image encoder, preprocessing and file list is
read from the cache instead of encoded; a modified encoder (SeTAR-pruned, fine-tuned) has other
weights, hence another key, and is encoded as usual.

Distributed (torchrun): each rank encodes and scores a contiguous shard of every set; the scores
are gathered in rank order (= data order), so each image is scored once; rank 0 writes the files.

The steps of :func:`run_ood_benchmark` (checks, one pass per set, records, files) are described in
docs/ARCHITECTURE.md, "Data flow of the commands".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from locoop.engine import dist
from locoop.engine.fileio import atomic_write
from locoop.engine.precision import half_supported
from locoop.engine.provenance import dataset_provenance
from locoop.ood.features import iter_feature_batches, score_features

__all__ = ["run_ood_benchmark", "check_benchmark_inputs", "benchmark_precision", "extraction_amp", "cache_set_name",
           "cache_local_dtype", "eval_loader", "score_set", "SetResult", "benchmark_meta", "write_scores_npz",
           "write_plots", "SCORES_NPZ", "PLOTS_DIR", "check_benchmark_lists", "benchmark_ood_sets", "build_text_side",
           "run_bootstrap"]

SCORES_NPZ = "ood_scores.npz"  # raw per-image scores, to recompute metrics without the model
PLOTS_DIR = "plots"  # histograms of ID vs OOD scores per score and OOD set


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def check_benchmark_inputs(cfg: Any) -> Dict[str, Any]:
    """Validate the OOD settings of ``cfg`` without touching any image.

    Checks the score names, ``OOD.T``, ``OOD.FPR_CONVENTION``, that every folder of ``OOD.DATASETS``
    exists under ``DATASET.ROOT`` (all missing ones named in one error) -- or, with ``OOD.BENCHMARK``,
    every image list of the benchmark (:func:`check_benchmark_lists`) -- and reads what the scores
    with extra text features need (a negative-label score's lexicon, ``OOD.NEGLABEL.*``).

    Returns:
        ``{"scores": canonical score names, "ood_folders": {set: folder or image list}, "T": float,
        "convention": str, "lambda_local": float, "with_local": bool, "benchmark": name or None,
        "groups": {"near": [sets], "far": [sets]} or None, "text_banks": {score: plan}}``.

    Raises:
        ValueError: unknown score or OOD set, bad temperature or convention, empty lists, a bad lexicon.
        FileNotFoundError: OOD folders, image lists or the lexicon missing.
    """
    from locoop.config.checks import check_sections
    from locoop.data.datasets.ood import check_ood_folders
    from locoop.ood.scores import check_lambda_local, get_score, resolve_score_names
    from locoop.ood.textbank import prepare_text_banks

    check_sections(cfg, ("OOD", "OOD.NEGLABEL"))  # T, FPR convention, cache dtype (declared with the config)
    names = list(cfg.OOD.SCORES)
    if not names:
        raise ValueError("OOD.SCORES is empty; list at least one score, e.g. OOD.SCORES \"['MCM', 'GL-MCM']\"")
    scores = resolve_score_names(names, have_local=True, have_banks=True)
    T = float(cfg.OOD.T)
    convention = str(cfg.OOD.FPR_CONVENTION).lower()
    sets = list(cfg.OOD.DATASETS)
    if not sets:
        raise ValueError("OOD.DATASETS is empty; list the OOD sets, e.g. OOD.DATASETS \"['iNaturalist', 'SUN']\"")
    if not cfg.DATASET.ROOT:
        raise ValueError("DATASET.ROOT is empty; pass --root DATA (the folder holding imagenet/ and the OOD sets)")
    benchmark, groups = None, None
    if str(getattr(cfg.OOD, "BENCHMARK", "") or "").strip():
        folders, groups = check_benchmark_lists(cfg)
        benchmark = str(cfg.OOD.BENCHMARK).strip().lower()
    else:
        folders = check_ood_folders(cfg.DATASET.ROOT, sets)
    return {"scores": scores, "ood_folders": folders, "T": T, "convention": convention,
            "lambda_local": check_lambda_local(cfg.OOD.LAMBDA_LOCAL),
            "with_local": any(get_score(s).needs_local for s in scores),
            "benchmark": benchmark, "groups": groups, "text_banks": prepare_text_banks(cfg, scores)}


# ------------------------------------------------------------------------------------ image-list benchmarks
def check_benchmark_lists(cfg: Any) -> Tuple[Dict[str, str], Dict[str, list]]:
    """The image lists of ``OOD.DATASETS`` in the benchmark ``OOD.BENCHMARK`` (all missing ones named at once).

    Returns:
        ``({set: list file}, {"near": [sets], "far": [sets]})`` in the benchmark's order.

    Raises:
        ValueError: an unknown benchmark or set name. FileNotFoundError: missing lists (with the download hint).
    """
    import os

    from locoop.data.datasets.openood import DOWNLOAD_HINT, OPENOOD_LAYOUT, get_openood_benchmark

    bench = get_openood_benchmark(str(cfg.OOD.BENCHMARK))
    try:
        names = bench.resolve(list(cfg.OOD.DATASETS))
    except ValueError as e:
        raise ValueError(f"OOD.DATASETS: {e}") from None
    root = os.path.abspath(os.path.expanduser(str(cfg.DATASET.ROOT)))
    lists = {n: bench.list_for(n).list_path(root) for n in names}
    missing = [p for p in lists.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"OOD.BENCHMARK {bench.name}: image lists not found under DATASET.ROOT {root}: "
                                + ", ".join(missing) + f"; {DOWNLOAD_HINT}.\n{OPENOOD_LAYOUT}")
    return lists, bench.groups(names)


def benchmark_ood_sets(cfg: Any, names: Optional[Sequence[str]] = None) -> Dict[str, list]:
    """Items of the OOD sets (label -1): the folders of ``names`` (default ``OOD.DATASETS``) under
    ``DATASET.ROOT``, or, with ``OOD.BENCHMARK``, the benchmark's image lists of those names.

    Raises:
        ValueError / FileNotFoundError: unknown names, missing folders or lists, sets without images.
    """
    from locoop.data import build_ood_datasets
    from locoop.data.datasets.openood import build_openood_ood_sets, get_openood_benchmark

    names = list(cfg.OOD.DATASETS) if names is None else list(names)
    if str(getattr(cfg.OOD, "BENCHMARK", "") or "").strip():
        return build_openood_ood_sets(str(cfg.DATASET.ROOT), get_openood_benchmark(str(cfg.OOD.BENCHMARK)), names)
    return build_ood_datasets(cfg.DATASET.ROOT, names)


def eval_loader(cfg: Any, items: Sequence, tfm: Any, indices: Optional[Sequence[int]] = None):
    """The evaluation loader of ``items`` (in order), restricted to ``indices`` when given (a shard).

    :func:`locoop.data.build_eval_loader`, the one evaluation-loader builder, under the name the
    benchmark and the feature cache have always used.
    """
    from locoop.data import build_eval_loader

    return build_eval_loader(cfg, items, tfm, indices)


def benchmark_precision(cfg: Any, precision: Optional[str] = None) -> str:
    """The precision the evaluated model runs at: ``precision`` when given, else ``TRAINER.LOCOOP.PREC``.

    The default keeps the behaviour of callers that do not pass one yet; a caller whose model is
    not built from ``TRAINER.LOCOOP.PREC`` (SeTAR's fp32 search model, SeTAR+FT's ``SETAR.FT.PREC``)
    passes its own.
    """
    prec = str(getattr(cfg.TRAINER.LOCOOP, "PREC", "")) if precision is None else str(precision)
    return prec


def extraction_amp(cfg: Any, device: Union[str, torch.device], precision: Optional[str] = None) -> bool:
    """Whether image features are computed under fp16 autocast: precision ``amp`` where fp16 runs (CUDA).

    ``precision`` defaults to :func:`benchmark_precision` (``TRAINER.LOCOOP.PREC``).
    """
    return benchmark_precision(cfg, precision) == "amp" and half_supported(device)


def cache_set_name(cfg: Any, set_name: str) -> str:
    """Name of a set in the feature cache: ``ID-<DATASET.NAME>`` for the ID test set, else the OOD set's
    (``<OOD.BENCHMARK>-<set>`` for an image-list benchmark, so its lists never meet a folder of the same name)."""
    if set_name == "ID":
        return f"ID-{cfg.DATASET.NAME}"
    bench = str(getattr(cfg.OOD, "BENCHMARK", "") or "").strip().lower()
    return f"{bench}-{set_name}" if bench else set_name


def cache_local_dtype(cfg: Any, model: Optional[torch.nn.Module] = None) -> torch.dtype:
    """``OOD.CACHE_LOCAL_DTYPE`` as a torch dtype (float16 by default); float32 for a classifier.

    float16 suits CLIP's unit-length local features (error ~1e-4 on cosines); a classifier's local
    *logits* (Swin-V2) are unbounded, so they are cached exactly, whatever the key says.
    """
    from locoop.ood.heads import outputs_logits

    if model is not None and outputs_logits(model):
        return torch.float32
    return {"float16": torch.float16, "float32": torch.float32}[str(getattr(cfg.OOD, "CACHE_LOCAL_DTYPE", "float16"))]


# ------------------------------------------------------------------------------------ checks
def _check_text_features(cfg: Any, text_features: Optional[torch.Tensor], dataset: Any,
                         model: Optional[torch.nn.Module] = None, checked: Optional[Mapping[str, Any]] = None) -> None:
    from locoop.ood.heads import outputs_logits

    if model is not None and outputs_logits(model):  # a classifier: its logits are the similarities
        if text_features is not None:
            raise ValueError(f"{type(model).__name__} outputs class logits; pass text_features=None")
        if (checked or {}).get("text_banks"):
            raise ValueError(f"the scores {sorted(checked['text_banks'])} need text features (negative labels); "
                             f"{type(model).__name__} has no text side; drop them from OOD.SCORES")
        k = int(model.num_classes)
        if k != dataset.num_classes:
            raise ValueError(f"the classifier has {k} classes but the ID dataset {cfg.DATASET.NAME} has "
                             f"{dataset.num_classes}; evaluate it on the dataset it was trained on")
        if not dataset.test:
            raise ValueError(f"the ID dataset {cfg.DATASET.NAME} has no test images")
        return
    if not isinstance(text_features, torch.Tensor) or text_features.ndim != 2:
        raise ValueError("text_features must be a [C, D] tensor of class text features")
    if text_features.shape[0] != dataset.num_classes:
        raise ValueError(f"text_features has {text_features.shape[0]} rows but the ID dataset "
                         f"{cfg.DATASET.NAME} has {dataset.num_classes} classes; build the text features "
                         "from the same dataset's class names")
    if not dataset.test:
        raise ValueError(f"the ID dataset {cfg.DATASET.NAME} has no test images")


# ------------------------------------------------------------------------------------ one pass
@dataclass
class _Context:
    """What every set's pass shares: settings, model, transform, device, the cache lookup."""

    cfg: Any
    clip_model: torch.nn.Module
    text_features: Optional[torch.Tensor]  # None: the model outputs class logits (locoop.ood.heads)
    scores: list
    T: float
    logit_scale: float
    lambda_local: float
    with_local: bool
    tfm: Any
    device: torch.device
    amp: bool
    batch_size: int
    verbose: bool
    cache: Any = None
    local_dtype: torch.dtype = torch.float16
    banks: Dict[str, Any] = field(default_factory=dict)  # {score: TextBank} of NegLabel, CSP, ...
    _visual: Optional[list] = None  # the encoder's weight hash, computed at most once


@dataclass
class SetResult:
    """Scores of one set, gathered over the ranks in data order."""

    scores: Dict[str, np.ndarray]
    preds: np.ndarray
    labels: np.ndarray
    skipped: list = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(len(self.preds))


def _cached_entry(ctx: _Context, name: str, items: Sequence):
    """The matching cache entry of a set (rank 0 decides for all ranks), or None."""
    from locoop.ood.cache import CachedFeatures, FeatureCache, make_key, visual_fingerprint

    path = None
    if dist.is_main_process() and ctx.cache.entries(cache_set_name(ctx.cfg, name)):
        if ctx._visual is None:
            ctx._visual = [visual_fingerprint(ctx.clip_model)]
            if ctx._visual[0] is None and ctx.verbose:
                print("Feature cache not used: the image encoder has forward hooks")
        key = (make_key(ctx.clip_model, ctx.tfm, items, ctx.device, ctx.amp, visual=ctx._visual[0],
                        local_dtype=ctx.local_dtype) if ctx._visual[0] else None)
        hit = ctx.cache.lookup(cache_set_name(ctx.cfg, name), key, need_local=ctx.with_local)
        path = str(hit.path) if hit is not None else None
    path = dist.broadcast_object(path)
    if not path:
        return None
    try:
        entry = CachedFeatures(Path(path), FeatureCache.read_manifest(Path(path)))
    except ValueError:
        entry = None  # e.g. a cache folder that is not shared between nodes
    if not all(dist.all_gather_object(entry is not None)):
        if ctx.verbose:
            print(f"{name}: cached features in {path} are not readable on every rank; encoding the images")
        return None
    return entry


def _feature_batches(ctx: _Context, name: str, items: Sequence) -> Tuple[Iterable, Callable[[], Dict[str, str]]]:
    """This rank's feature batches of a set (from the cache or the model) and a getter of its skipped images."""
    from locoop.ood.cache import format_bytes

    entry = _cached_entry(ctx, name, items) if ctx.cache is not None else None
    if entry is not None:
        if ctx.verbose:
            print(f"{name}: using cached features from {entry.path} ({entry.num_rows:,} images, "
                  f"{format_bytes(entry.size_bytes)})")
        shard = dist.shard_indices(entry.num_rows, align=ctx.batch_size)
        batches = entry.iter_batches(shard.start, shard.stop, ctx.batch_size, with_local=ctx.with_local)
        return batches, lambda: entry.skipped_paths
    distributed = dist.is_distributed()
    if ctx.verbose:
        print(f"Encoding {name}: {len(items):,} images"
              + (f" on {dist.get_world_size()} processes" if distributed else ""))
    # Shards of whole batches: each rank encodes exactly the batches one process would.
    shard = dist.shard_indices(len(items), align=ctx.batch_size) if distributed else None
    loader = eval_loader(ctx.cfg, items, ctx.tfm, shard)
    # Local features stay float32: scores see what the model computed (fp16 only inside the cache).
    batches = iter_feature_batches(ctx.clip_model, loader, ctx.device, with_local=ctx.with_local, amp=ctx.amp,
                                   local_dtype=torch.float32, desc=name, progress=None if ctx.verbose else False)
    return batches, lambda: dict(getattr(loader, "skipped", {}) or {})


def _gather_set(parts: Dict[str, list], preds: list, labels: list, skipped: Dict[str, str]):
    """Concatenate the ranks' shards in rank order (= data order); an empty shard adds nothing."""
    gathered = dist.all_gather_object((parts, preds, labels, skipped))
    parts = {s: [a for g in gathered for a in g[0][s]] for s in parts}
    preds = [a for g in gathered for a in g[1]]
    labels = [a for g in gathered for a in g[2]]
    skipped = {k: v for g in gathered for k, v in g[3].items()}
    return parts, preds, labels, skipped


def score_set(ctx: _Context, name: str, items: Sequence) -> SetResult:
    """Stream one set through the model (or from the cache), keeping only its scores and predictions."""
    batches, skipped_of = _feature_batches(ctx, name, items)
    parts: Dict[str, list] = {s: [] for s in ctx.scores}
    preds, labels = [], []
    for batch in batches:
        batch_scores, batch_preds = score_features(batch, ctx.text_features, ctx.scores, T=ctx.T,
                                                   logit_scale=ctx.logit_scale, lambda_local=ctx.lambda_local,
                                                   device=ctx.device, banks=ctx.banks)
        for s, v in batch_scores.items():
            parts[s].append(v)
        preds.append(batch_preds)
        labels.append(batch.labels.numpy())
    skipped = skipped_of()
    if dist.is_distributed():
        parts, preds, labels, skipped = _gather_set(parts, preds, labels, skipped)
    preds = [p for p in preds if len(p)]
    if not preds:
        raise ValueError(f"{name}: none of the {len(items)} images could be read ({len(skipped)} skipped)")
    return SetResult({s: np.concatenate(v) for s, v in parts.items()}, np.concatenate(preds),
                     np.concatenate(labels), sorted(skipped))


# ------------------------------------------------------------------------------------ text side
def build_text_side(cfg: Any, checked: Mapping[str, Any], clip_model: torch.nn.Module, text_features: torch.Tensor,
                    dataset: Any, device: torch.device, use_cache: bool, verbose: bool) -> Dict[str, Any]:
    """The extra text features of the scores that need them (``{score: TextBank}``; NegLabel, CSP), built once
    per evaluation before any image is encoded (:mod:`locoop.ood.textbank`).

    The negative-label banks are cached as text features under the feature-cache folder (``neglabel/``),
    keyed by the text tower's weights, the lexicon, the recipe and the ID label features, unless
    ``use_cache`` is False.
    """
    plans = checked.get("text_banks") or {}
    if not plans:
        return {}
    from locoop.ood.cache import resolve_cache_dir
    from locoop.ood.textbank import build_text_banks

    cache_dir = resolve_cache_dir(cfg) if use_cache else None
    return build_text_banks(plans, clip_model, text_features, list(dataset.classnames), device, cache_dir,
                            verbose=verbose)


def run_bootstrap(cfg: Any, results: Mapping[str, "SetResult"], scores: Sequence[str],
                  convention: str) -> Optional[Dict[str, Any]]:
    """Per-run bootstrap intervals over images (``OOD.BOOTSTRAP`` replicates, ``OOD.BOOTSTRAP_SEED``), or None."""
    n = int(getattr(cfg.OOD, "BOOTSTRAP", 0) or 0)
    if n < 2:
        return None
    from locoop.ood.bootstrap import MCM_METRICS, OPENOOD_METRICS, bootstrap_benchmark

    metrics = list(MCM_METRICS) + (list(OPENOOD_METRICS) if convention == "openood" else [])
    return bootstrap_benchmark({s: results["ID"].scores[s] for s in scores},
                               {o: r.scores for o, r in results.items() if o != "ID"}, n_resamples=n,
                               seed=int(cfg.OOD.BOOTSTRAP_SEED), metrics=metrics)


# ------------------------------------------------------------------------------------ records and files
def benchmark_meta(cfg: Any, checked: Mapping[str, Any], dataset: Any, results: Mapping[str, SetResult],
                   logit_scale: float, device: torch.device, precision: str,
                   meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``meta`` of ``ood_results.json``: settings, counts, dataset provenance, the caller's ``meta``, config."""
    from locoop.config import cfg_to_dict

    ood_sets = [n for n in results if n != "ID"]
    full: Dict[str, Any] = {
        "id_dataset": cfg.DATASET.NAME,
        "ood_datasets": ood_sets,
        "ood_folders": checked["ood_folders"],
        "scores": checked["scores"],
        "T": checked["T"],
        "logit_scale": logit_scale,
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "trainer": cfg.TRAINER.NAME,
        "device": str(device),
        "precision": precision,
        "num_images": {n: r.num_images for n, r in results.items()},
        "num_skipped": {n: len(r.skipped) for n, r in results.items()},
        "skipped_images": {n: r.skipped[:50] for n, r in results.items() if r.skipped},
        "openood_metrics_included": checked["convention"] == "openood",
    }
    if checked.get("benchmark"):
        from locoop.data.classnames import sha256_file

        full["benchmark"] = checked["benchmark"]
        full["ood_groups"] = checked.get("groups")
        full["ood_lists"] = {n: {"file": p, "sha256": sha256_file(p)} for n, p in checked["ood_folders"].items()}
    full.update(dataset_provenance(dataset))
    full.update(dict(meta or {}))  # the caller knows better (e.g. the training few-shot split)
    full["config"] = cfg_to_dict(cfg)
    return full


def write_scores_npz(out: Path, results: Mapping[str, SetResult]) -> Path:
    """``ood_scores.npz``: ID labels and predictions, and every set's per-image scores (``<set>/<score>``)."""
    npz = {"id_labels": results["ID"].labels, "id_predictions": results["ID"].preds}
    for name, r in results.items():
        for s, v in r.scores.items():
            npz[f"{name}/{s}"] = v
    return atomic_write(out / SCORES_NPZ, lambda f: np.savez_compressed(f, **npz))


def write_plots(out: Path, results: Mapping[str, SetResult], scores: Sequence[str],
                metrics: Optional[Mapping[str, Mapping[str, Mapping[str, float]]]] = None) -> list:
    """ID-vs-OOD histograms per score and OOD set under ``out/plots`` (each with its AUROC / FPR95 and
    the FPR95 threshold), and the one-page ``plots/overview.png``; returns the PNG paths.

    Args:
        metrics: ``{score: {set: ood_metrics(...)}}`` already computed (shown, not recomputed).
    """
    from locoop.viz.plots import OVERVIEW_NAME, plot_all_histograms, plot_overview

    id_scores = {s: results["ID"].scores[s] for s in scores}
    by_score = {s: {o: r.scores[s] for o, r in results.items() if o != "ID"} for s in scores}
    paths = [p for ps in plot_all_histograms(id_scores, by_score, out / PLOTS_DIR, metrics=metrics).values()
             for p in ps]
    paths.append(plot_overview(id_scores, by_score, out / PLOTS_DIR / OVERVIEW_NAME, metrics=metrics))
    return paths


# ------------------------------------------------------------------------------------ the benchmark
def run_ood_benchmark(cfg: Any, clip_model: torch.nn.Module, text_features: Optional[torch.Tensor],
                      output_dir: Union[str, Path], meta: Optional[Mapping[str, Any]] = None,
                      device: Optional[Union[str, torch.device]] = None, dataset: Any = None,
                      verbose: bool = True, use_cache: Optional[bool] = None,
                      precision: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate OOD detection of ``(clip_model, text_features)`` and write the result files.

    Args:
        cfg: config (``DATASET.*``, ``DATALOADER.TEST.BATCH_SIZE``, ``DATALOADER.NUM_WORKERS``,
            ``INPUT.*`` for the test transform, ``OOD.DATASETS``, ``OOD.SCORES``, ``OOD.T``,
            ``OOD.FPR_CONVENTION``, ``OOD.PLOT``, ``OOD.CACHE_*``, ``OOD.BENCHMARK``,
            ``OOD.BOOTSTRAP*``, ``OOD.NEGLABEL.*``).
        clip_model: CLIP model with ``encode_image(images, return_local=True)`` in eval mode, or a
            classifier with ``class_logits`` (a Swin-V2; :mod:`locoop.ood.heads`).
        text_features: ``[C, D]`` class text features (normalised or not; normalised here); None for
            a classifier (its logits are the similarities, ``logit_scale`` 1).
        output_dir: where ``ood_results.{md,csv,json}``, ``ood_scores.npz`` and ``plots/`` go.
        meta: extra provenance for ``ood_results.json`` (model dir, epoch, trainer, ...);
            the config, dataset hashes, image counts and environment are added here.
        device: where the model runs (default: the model's device).
        dataset: a ready ID dataset (default: built from ``cfg`` without its training split).
        verbose: print progress lines and the results table.
        use_cache: read matching entries of the feature cache (``OOD.CACHE_DIR``); None =
            ``OOD.USE_CACHE``. Entries are keyed by the image encoder's weights, so a modified
            encoder never matches; False also skips hashing the weights.
        precision: the precision the model runs at (``fp16``, ``fp32``, ``amp``: amp -> fp16
            autocast where supported); None = ``TRAINER.LOCOOP.PREC`` (see :func:`benchmark_precision`).

    Returns:
        ``{"metrics": {score: {set: {fpr95, auroc, aupr, ...}}} (fractions), "id_accuracy":
        fraction, "files": {md, csv, json, npz}, "plots": [paths], "id_scores": {score: [N]},
        "ood_scores": {set: {score: [M]}}, "num_images": {set: n}, "num_skipped": {set: n},
        "groups": {"near": [...], "far": [...]} or None, "bootstrap": intervals or None,
        "text_banks": {score: TextBank}, "seconds": float}`` (``files`` also has ``text_banks``, the
        ``text_bank_<score>.tsv`` paths, when a score has a bank).

    Raises:
        ValueError / FileNotFoundError: bad settings, missing folders, lists or lexicon (before any
        image is encoded); a text-feature count that differs from the dataset's classes.
    """
    from locoop.data import build_dataset, build_transform
    from locoop.ood.heads import head_logit_scale
    from locoop.ood.metrics import ood_metrics
    from locoop.ood.results import format_table, write_results

    t0 = time.time()
    checked = check_benchmark_inputs(cfg)
    if dataset is None:
        dataset = build_dataset(cfg, need_train=False)
    _check_text_features(cfg, text_features, dataset, clip_model, checked)
    ood_items = benchmark_ood_sets(cfg)
    device = torch.device(device) if device is not None else _model_device(clip_model)
    dist.init_from_env(device)  # no-op without torchrun
    main = dist.is_main_process()
    verbose = verbose and main
    precision = benchmark_precision(cfg, precision)
    ctx = _Context(cfg=cfg, clip_model=clip_model,
                   text_features=None if text_features is None else text_features.detach().to(device),
                   scores=checked["scores"], T=checked["T"], lambda_local=checked["lambda_local"],
                   with_local=checked["with_local"], logit_scale=head_logit_scale(clip_model),
                   tfm=build_transform(cfg, is_train=False), device=device,
                   amp=extraction_amp(cfg, device, precision), batch_size=int(cfg.DATALOADER.TEST.BATCH_SIZE),
                   verbose=verbose, local_dtype=cache_local_dtype(cfg, clip_model))
    use_cache = bool(getattr(cfg.OOD, "USE_CACHE", False)) if use_cache is None else bool(use_cache)
    if use_cache:
        from locoop.ood.cache import FeatureCache, resolve_cache_dir

        ctx.cache = FeatureCache(resolve_cache_dir(cfg), verbose=verbose)

    was_training = clip_model.training
    clip_model.eval()
    try:
        ctx.banks = build_text_side(cfg, checked, clip_model, ctx.text_features, dataset, device, use_cache, verbose)
        results = {"ID": score_set(ctx, "ID", dataset.test)}
        for set_name, items in ood_items.items():
            results[set_name] = score_set(ctx, set_name, items)
    finally:
        clip_model.train(was_training)

    id_res = results["ID"]
    id_accuracy = float((id_res.preds == id_res.labels).mean())
    include_openood = checked["convention"] == "openood"
    metrics = {s: {o: ood_metrics(id_res.scores[s], r.scores[s], include_openood=include_openood)
                   for o, r in results.items() if o != "ID"} for s in checked["scores"]}
    groups = checked.get("groups")
    out = {"metrics": metrics, "id_accuracy": id_accuracy, "files": {}, "plots": [], "id_scores": id_res.scores,
           "ood_scores": {o: r.scores for o, r in results.items() if o != "ID"},
           "num_images": {n: r.num_images for n, r in results.items()},
           "num_skipped": {n: len(r.skipped) for n, r in results.items()}, "groups": groups, "bootstrap": None,
           "text_banks": ctx.banks}
    if main:  # rank 0 writes the files; the others wait for them and return the same numbers
        from locoop.ood.textbank import describe_text_banks, write_bank_labels

        run_dir = Path(output_dir)
        full_meta = benchmark_meta(cfg, checked, dataset, results, ctx.logit_scale, device, precision, meta)
        if ctx.banks:
            full_meta["text_banks"] = describe_text_banks(ctx.banks)
        out["bootstrap"] = run_bootstrap(cfg, results, checked["scores"], checked["convention"])
        files = write_results(run_dir, metrics, meta=full_meta, id_accuracy=id_accuracy, groups=groups,
                              bootstrap=out["bootstrap"])
        out["files"] = dict(files, npz=write_scores_npz(run_dir, results))
        if ctx.banks:
            out["files"]["text_banks"] = write_bank_labels(run_dir, ctx.banks)
        if bool(cfg.OOD.PLOT):
            out["plots"] = write_plots(run_dir, results, checked["scores"], metrics)
        if verbose:
            print(format_table(metrics, id_accuracy))
            if groups:
                from locoop.ood.groups import format_grouped_table

                print(f"\n{checked['benchmark']}: near / far OOD")
                print(format_grouped_table(metrics, groups))
            if out["bootstrap"]:
                from locoop.ood.bootstrap import format_intervals_table

                print("\n" + format_intervals_table(out["bootstrap"]))
            print(f"\nResults: {files['md']}, {files['csv']}, {files['json']}"
                  + (f"\nHistograms: {run_dir / PLOTS_DIR}/ ({len(out['plots'])} PNG)" if out["plots"] else ""))
    dist.barrier()  # the other ranks return once the files exist
    out["seconds"] = time.time() - t0
    return out
