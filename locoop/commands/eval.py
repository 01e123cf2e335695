"""``python -m locoop eval``: the OOD benchmark of a trained (or zero-shot) model, as ``eval_ood_detection.py``.

    python -m locoop eval --root DATA --trainer LoCoOp \
        --dataset-config-file configs/datasets/imagenet.yaml \
        --config-file configs/trainers/LoCoOp/vit_b16_ep50.yaml \
        --output-dir RUN_DIR --model-dir RUN_DIR --load-epoch 50 --T 1

    python -m locoop eval --root DATA --trainer ZeroshotCLIP \
        --dataset-config-file configs/datasets/imagenet.yaml \
        --config-file configs/trainers/LoCoOp/vit_b16_ep50.yaml --output-dir output/zeroshot

ID = the dataset's test split; OOD = ``OOD.DATASETS`` (default iNaturalist, SUN, Places, Texture)
under ``--root``; all ``OOD.SCORES`` (MCM, GL-MCM, ...) from one pass over the images with
temperature ``--T``. Writes ``ood_results.{md,csv,json}``, ``ood_scores.npz`` and ``plots/`` into
``--output-dir`` (default: ``--model-dir``).
"""
from __future__ import annotations

import argparse

from locoop.commands._common import (add_common_arguments, build_cfg, check_model_dir, check_trainer,
                                     load_trainer_for_eval, prepare_run, read_run_info, run_command,
                                     trainer_needs_checkpoint)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add eval_ood_detection.py's flags."""
    add_common_arguments(parser, "eval")


def _run(args: argparse.Namespace) -> int:
    from locoop.ood.runner import check_benchmark_inputs

    if not args.output_dir and args.model_dir:
        args.output_dir = args.model_dir  # the papers' eval.sh writes next to the checkpoints
    cfg = build_cfg(args)
    cls = check_trainer(cfg.TRAINER.NAME)
    check_benchmark_inputs(cfg)  # score names, T, every OOD folder: before CLIP is loaded
    needs_ckpt = trainer_needs_checkpoint(cls)
    if needs_ckpt or args.model_dir:
        check_model_dir(args.model_dir, args.load_epoch)
    prepare_run(cfg, args)

    from locoop.ood.runner import run_ood_benchmark

    trainer, text_features = load_trainer_for_eval(cfg, args)
    from locoop.engine.provenance import training_config_meta

    meta = {"trainer": cfg.TRAINER.NAME, "model_dir": args.model_dir or None, "load_epoch": args.load_epoch}
    meta.update(training_config_meta(trainer))
    train_info = read_run_info(args.model_dir)
    if train_info:
        meta["training"] = train_info
        # The prompts were learned on this few-shot split: record it as the run's split.
        for key in ("split_file", "split_hash"):
            if train_info.get(key):
                meta[key] = train_info[key]
    dataset = getattr(getattr(trainer, "dm", None), "dataset", None)
    # The precision the trainer's model actually runs at (its PREC after the device fallback).
    run_ood_benchmark(cfg, trainer.clip_model, text_features, cfg.OUTPUT_DIR, meta=meta,
                      device=getattr(trainer, "device", None), dataset=dataset,
                      precision=getattr(trainer, "precision", None))
    return 0


def run(args: argparse.Namespace) -> int:
    """Evaluate; 2 on bad input."""
    return run_command("eval", _run, args)
