"""``python -m locoop train``: train a prompt learner (LoCoOp, CoOp) with the papers' flags.

    python -m locoop train --root DATA --seed 1 --trainer LoCoOp \
        --dataset-config-file configs/datasets/imagenet.yaml \
        --config-file configs/trainers/LoCoOp/vit_b16_ep50.yaml \
        --output-dir output/imagenet/LoCoOp/vit_b16_ep50_16shots/nctx16_cscFalse_ctpend/seed1 \
        --lambda_value 0.25 --topk 200 DATASET.NUM_SHOTS 16

Writes ``log.txt``, ``config.yaml``, ``run_info.json``, ``<model>/model.pth.tar-<epoch>`` and, while it
runs, ``<model>/model-last.pth.tar`` and ``.lock`` into ``--output-dir``; an interrupted run resumes from
its last finished epoch when the same command is started again (refused if its training keys differ
from the recorded config, as is a second run in a locked folder).
``--eval-only --model-dir DIR [--load-epoch N]`` loads a run and reports the ID test accuracy
(the OOD benchmark is ``python -m locoop eval``).
"""
from __future__ import annotations

import argparse

from locoop.commands._common import (add_common_arguments, build_cfg, check_finished_config, check_model_dir,
                                     check_trainer, final_checkpoint, prepare_run, run_command,
                                     trainer_needs_checkpoint, write_run_info)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add train.py's flags."""
    add_common_arguments(parser, "train")


def _run(args: argparse.Namespace) -> int:
    cfg = build_cfg(args)
    cls = check_trainer(cfg.TRAINER.NAME)
    if not args.eval_only and not args.no_train and int(cfg.OPTIM.MAX_EPOCH) < 1 and trainer_needs_checkpoint(cls):
        raise ValueError(f"OPTIM.MAX_EPOCH {cfg.OPTIM.MAX_EPOCH}: training needs at least 1 epoch (0 would write "
                         f"no model); set OPTIM.MAX_EPOCH 1 or more (LoCoOp: 50), or use --eval-only / "
                         f"--trainer ZeroshotCLIP to evaluate without training")
    if args.eval_only:
        if trainer_needs_checkpoint(cls):
            check_model_dir(args.model_dir, args.load_epoch)
    elif args.skip_finished and not args.no_train:
        done = final_checkpoint(cfg.OUTPUT_DIR, cfg.OPTIM.MAX_EPOCH)
        if done:
            check_finished_config(cfg, done)  # a finished run of other settings is not this run
            print(f"The run at {cfg.OUTPUT_DIR} is finished ({done} exists); skipping it.")
            return 0
    prepare_run(cfg, args, lock=not args.eval_only, check_resume=not args.eval_only)

    from locoop.engine.registry import build_trainer

    trainer = build_trainer(cfg)
    if args.eval_only:
        if args.model_dir:
            trainer.load_model(args.model_dir, epoch=args.load_epoch)
        trainer.test()
        return 0
    write_run_info(cfg, trainer)
    if not args.no_train:
        trainer.train()
    return 0


def run(args: argparse.Namespace) -> int:
    """Train (or ``--eval-only`` test) as the papers' ``train.py``; 2 on bad input."""
    return run_command("train", _run, args)
