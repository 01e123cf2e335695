"""``python -m locoop extract``: store the image features of the ID test set and the OOD sets.

    python -m locoop extract --root DATA \\
        --dataset-config-file configs/datasets/imagenet.yaml \\
        --config-file configs/trainers/LoCoOp/vit_b16_ep50.yaml [--datasets ID iNaturalist ...]

    torchrun --nproc_per_node 4 -m locoop extract ...      # each GPU encodes a shard

Writes one entry per set into the feature cache (``OOD.CACHE_DIR``, default
``~/.cache/locoop/features``; see :mod:`locoop.ood.cache`): normalised global (float32) and local
(float16) features, keyed by the image encoder's weights, the test preprocessing and the file
list. ``python -m locoop eval`` (and the SeTAR test pass of an unpruned encoder) then reads them
and only computes the text side. ``OOD.CACHE_LOCAL_DTYPE float32`` stores exact local features
(twice the disk; cached L-MCM / GL-MCM then equal uncached ones bit for bit). Sets whose entry is already valid are skipped (``--force``
rewrites them). The backbone is loaded as the trainers load it (``MODEL.BACKBONE.NAME``,
``TRAINER.LOCOOP.PREC``); ZeroshotCLIP runs ``amp`` as ``fp16``, so pass ``--prec fp16`` to
prepare its evaluation on a GPU with ``PREC amp``.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

from locoop.commands._common import build_cfg, prepare_run, run_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the extract flags."""
    p = parser
    p.add_argument("--root", type=str, default=None, help="path to the datasets (DATASET.ROOT)")
    p.add_argument("--config-file", type=str, default=None, help="method config (backbone, INPUT.*, PREC)")
    p.add_argument("--dataset-config-file", type=str, default=None,
                   help="dataset config, e.g. configs/datasets/imagenet.yaml")
    p.add_argument("--backbone", type=str, default=None,
                   help="CLIP model name or checkpoint path (MODEL.BACKBONE.NAME)")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1 (MODEL.DEVICE; default automatic)")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="images per forward pass (DATALOADER.TEST.BATCH_SIZE; use the evaluation's for "
                        "bit-identical scores)")
    p.add_argument("--datasets", nargs="+", default=None, metavar="SET",
                   help="sets to extract: ID (the ID test split) and OOD set names (default: ID + OOD.DATASETS)")
    p.add_argument("--cache-dir", type=str, default=None,
                   help="cache folder (OOD.CACHE_DIR; default $LOCOOP_FEATURE_CACHE or ~/.cache/locoop/features)")
    p.add_argument("--prec", choices=("fp16", "fp32", "amp"), default=None,
                   help="encoder precision (default TRAINER.LOCOOP.PREC; fp16/amp need CUDA, else fp32)")
    p.add_argument("--no-local", action="store_true",
                   help="store global features only (no L-MCM / GL-MCM from this cache)")
    p.add_argument("--chunk-images", type=int, default=10000, help="images per part file (bounds the memory)")
    p.add_argument("--force", action="store_true", help="rewrite entries that are already valid")
    p.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="trailing config overrides: KEY VALUE pairs")


def _sets(cfg: Any, names: List[str]) -> Dict[str, list]:
    """``{set name: items}`` for ``names`` (checked before the model is loaded)."""
    from locoop.data import build_dataset
    from locoop.ood.runner import benchmark_ood_sets

    if not cfg.DATASET.ROOT:
        raise ValueError("DATASET.ROOT is empty; pass --root DATA (the folder holding the ID dataset and the OOD sets)")
    ood_names = [n for n in names if n != "ID"]
    out: Dict[str, list] = {}
    if "ID" in names:
        if not cfg.DATASET.NAME:
            raise ValueError("ID requested but DATASET.NAME is empty; pass --dataset-config-file "
                             "(e.g. configs/datasets/imagenet.yaml)")
        ds = build_dataset(cfg, need_train=False)
        if not ds.test:
            raise ValueError(f"the ID dataset {cfg.DATASET.NAME} has no test images")
        out["ID"] = list(ds.test)
    if ood_names:
        out.update(benchmark_ood_sets(cfg, ood_names))  # folders, or the lists of OOD.BENCHMARK
    return out


def _run(args: argparse.Namespace) -> int:
    from locoop.ood.cache import FeatureCache, extract_to_cache, format_bytes, make_key, resolve_cache_dir

    if args.cache_dir:
        args.opts = list(args.opts or []) + ["OOD.CACHE_DIR", args.cache_dir]
    if args.chunk_images < 1:
        raise ValueError(f"--chunk-images must be >= 1, got {args.chunk_images}")
    cfg = build_cfg(args)
    from locoop.models.swinv2 import refuse_swinv2_backbone

    refuse_swinv2_backbone(cfg.MODEL.BACKBONE.NAME, "extract", "CLIP image features to cache")
    names = list(args.datasets) if args.datasets else ["ID"] + list(cfg.OOD.DATASETS)
    if len(set(names)) != len(names):
        raise ValueError(f"--datasets lists a set twice: {names}")
    sets = _sets(cfg, names)  # every folder checked before CLIP is loaded
    prepare_run(cfg)

    import torch

    from locoop.engine import dist
    from locoop.engine.trainer import select_device
    from locoop.data import build_transform
    from locoop.ood.runner import cache_local_dtype, cache_set_name, eval_loader, extraction_amp
    from locoop.trainers.clip_backbone import load_clip

    device = select_device(cfg)
    dist.init_from_env(device)
    main = dist.is_main_process()
    prec = args.prec or cfg.TRAINER.LOCOOP.PREC
    model, used = load_clip(cfg, device, prec, verbose=bool(cfg.VERBOSE) and main)
    model.eval()
    tfm = build_transform(cfg, is_train=False)
    amp = extraction_amp(cfg, device, used)  # the precision the model was loaded with
    local_dtype = cache_local_dtype(cfg)
    cache = FeatureCache(resolve_cache_dir(cfg), verbose=main)
    if main:
        print(f"Feature cache: {cache.directory} (backbone {cfg.MODEL.BACKBONE.NAME}, {used}"
              f"{', fp16 autocast' if amp else ''}, on {device}"
              + (f" x {dist.get_world_size()} processes" if dist.is_distributed() else "")
              + f"; local features stored as {str(local_dtype).replace('torch.', '')})")
    from locoop.ood.cache import visual_fingerprint

    visual = visual_fingerprint(model)
    meta = {"backbone": str(cfg.MODEL.BACKBONE.NAME), "precision": used, "device": str(device)}
    total_t = time.time()
    for name, items in sets.items():
        cname = cache_set_name(cfg, name)
        key = make_key(model, tfm, items, device, amp, visual=visual, local_dtype=local_dtype)
        existing = None
        if main and not args.force:
            existing = cache.lookup(cname, key, need_local=not args.no_local)
        if dist.broadcast_object(existing is not None):
            if main:
                print(f"{name}: already cached in {existing.path} ({existing.num_rows:,} images, "
                      f"{format_bytes(existing.size_bytes)}); --force rewrites it")
            continue
        if main:
            print(f"{name}: encoding {len(items):,} images")
        t0 = time.time()
        with torch.inference_mode():
            path = extract_to_cache(
                cache, cname, items, model, lambda it, idx: eval_loader(cfg, it, tfm, idx), tfm, device, amp=amp,
                with_local=not args.no_local, chunk_images=args.chunk_images,
                batch_size=int(cfg.DATALOADER.TEST.BATCH_SIZE), meta=dict(meta, set=name),
                progress=None if (main and cfg.VERBOSE) else False, local_dtype=local_dtype)
        if main:
            m = FeatureCache.read_manifest(path)
            skipped = len(m.get("skipped_paths") or {})
            print(f"{name}: wrote {path} ({m['num_rows']:,} images"
                  + (f", {skipped} unreadable skipped" if skipped else "")
                  + f", {format_bytes(m['size_bytes'])}, {time.time() - t0:.1f} s)")
    if main:
        print(f"Done in {time.time() - total_t:.1f} s. Cache folder {cache.directory}: "
              f"{format_bytes(cache.disk_usage())} on disk")
    return 0


def run(args: argparse.Namespace) -> int:
    """Extract; 2 on bad input."""
    return run_command("extract", _run, args)


def main(argv=None) -> int:
    """``python -m locoop.commands.extract`` (the same as ``python -m locoop extract``)."""
    parser = argparse.ArgumentParser(prog="python -m locoop extract", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
