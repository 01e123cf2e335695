"""``python -m locoop setar-finetune``: SeTAR+FT (or the LoRA baseline), then the OOD benchmark.

    python -m locoop setar-finetune --root DATA \
        --config-file configs/setar/finetune/imagenet/SeTAR+FT.yaml \
        --settings output/setar/imagenet/SeTAR/best_settings.json \
        --output-dir output/setar/imagenet/SeTAR+FT DATASET.VAL_SPLIT_FILE imagenet1k_val_data.json

    python -m locoop setar-finetune --root DATA \
        --config-file configs/setar/finetune/imagenet/LoRA.yaml --output-dir output/setar/imagenet/LoRA ...

1. Fine-tune (trainer ``TRAINER.NAME``: ``SeTARFT`` or ``LoRA``; empty: chosen by
   ``SETAR.FT.ADAPTER`` setar/lora) with the LoCoOp loss (``SETAR.FT.LAMBDA`` / ``TOPK``;
   ``--lambda_value`` / ``--topk`` set these here). ``--settings`` is the ``best_settings.json``
   of a SeTAR search (``SETAR.SETTINGS_FILE``; SeTARFT only). Checkpoints go to
   ``OUTPUT_DIR/adapters/``; started again, the command resumes from the latest one (a finished
   run goes straight to the test).
2. Test: the fine-tuned model through the shared OOD benchmark runner (``OOD.SCORES``, ID
   accuracy): ``ood_results.{md,csv,json}``, ``ood_scores.npz``, ``plots/``. ``--no-test`` stops
   after training.

The backbone may be a CLIP (``ViT-B/16``, ``ViT-L/14``, ...) or a Swin-V2 classifier snapshot
(``configs/setar/finetune/imagenet/swin_base/``): the runner then scores the adapted classifier's
own logits (``trainer.text_features()`` is None), with the same result files.

``--model-dir RUN [--load-epoch N]`` skips training and tests a finished run (results in
``--output-dir``, default ``RUN``); the adapters are rebuilt from the checkpoint's description,
so ``--settings`` is optional there (given, it must match).

Also written: ``config.yaml``, ``run_info.json`` (with the adapters' description) and, for
SeTARFT, ``finetune_settings.json`` (the settings used).
"""
from __future__ import annotations

import argparse
import os

from locoop.commands._common import (add_common_arguments, build_cfg, check_model_dir, check_trainer, prepare_run,
                                     read_run_info, run_command, write_run_info)

ADAPTER_TRAINERS = {"setar": "SeTARFT", "lora": "LoRA"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the common flags plus ``--settings`` and ``--no-test``."""
    parser.add_argument("--settings", type=str, default=None, metavar="JSON",
                        help="best_settings.json of a SeTAR search (SETAR.SETTINGS_FILE; SeTARFT)")
    parser.add_argument("--no-test", action="store_true", help="stop after training (no OOD benchmark)")
    add_common_arguments(parser, "setar")


def resolve_trainer(cfg) -> str:
    """``TRAINER.NAME``, or the trainer of ``SETAR.FT.ADAPTER`` when it is empty.

    Raises:
        ValueError: unknown adapter kind, or a trainer that is not an adapter fine-tuner.
    """
    name = str(cfg.TRAINER.NAME or "").strip()
    if not name:
        kind = str(cfg.SETAR.FT.ADAPTER)
        if kind not in ADAPTER_TRAINERS:
            raise ValueError(f"SETAR.FT.ADAPTER must be one of {list(ADAPTER_TRAINERS)}, got {kind!r}")
        name = ADAPTER_TRAINERS[kind]
    if name not in ADAPTER_TRAINERS.values():
        raise ValueError(f"setar-finetune trains the {' or '.join(ADAPTER_TRAINERS.values())} trainers, not "
                         f"{name!r}; use `python -m locoop train` for prompt learners")
    return name


def _run(args: argparse.Namespace) -> int:
    test_only = bool(args.model_dir)
    if test_only and not args.output_dir:
        args.output_dir = args.model_dir
    cfg = build_cfg(args, freeze=False)
    if args.settings is not None:
        cfg.SETAR.SETTINGS_FILE = args.settings
    # The shared flags set LoCoOp's keys; here they mean the fine-tuning loss.
    if args.lambda_value is not None:
        cfg.SETAR.FT.LAMBDA = float(args.lambda_value)
    if args.topk is not None:
        cfg.SETAR.FT.TOPK = int(args.topk)
    cfg.TRAINER.NAME = resolve_trainer(cfg)
    cfg.freeze()

    import locoop.setar.finetune  # noqa: F401  (registers SeTARFT and LoRA)

    check_trainer(cfg.TRAINER.NAME)
    settings_file = str(cfg.SETAR.SETTINGS_FILE or "").strip()
    if test_only:
        check_model_dir(args.model_dir, args.load_epoch)
        if args.no_test:
            raise ValueError("--model-dir tests a finished run; --no-test would leave nothing to do")
    if cfg.TRAINER.NAME == "SeTARFT" and not (test_only and not settings_file):
        if not settings_file or settings_file.lower() == "none":
            raise ValueError("SeTAR+FT needs the settings of a SeTAR search: pass --settings "
                             "OUTPUT_OF_SEARCH/best_settings.json (SETAR.SETTINGS_FILE)")
        from locoop.setar.settings import load_settings

        load_settings(settings_file)  # form and completion marker now; layers and ratios once the model is loaded
    if not args.no_test:
        from locoop.ood.runner import check_benchmark_inputs

        check_benchmark_inputs(cfg)
    if not cfg.OUTPUT_DIR:
        raise ValueError("OUTPUT_DIR is empty; pass --output-dir")
    prepare_run(cfg, args, lock=not test_only, check_resume=not test_only)

    import torch

    from locoop.engine.registry import build_trainer

    trainer = build_trainer(cfg, need_train=not test_only)  # a retest reads no training split
    if test_only:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
    else:
        described = trainer.describe()
        extra = {"adapters": described}
        if cfg.TRAINER.NAME == "SeTARFT":
            from locoop.engine import dist
            from locoop.setar.settings import save_settings

            extra["settings_file"] = os.path.abspath(settings_file)
            if dist.is_main_process():  # under torchrun rank 0 writes
                save_settings(os.path.join(cfg.OUTPUT_DIR, "finetune_settings.json"), described["settings"])
        write_run_info(cfg, trainer, extra=extra)
        trainer.final_test = False  # the benchmark below reports the ID accuracy on the same test split
        trainer.train()
        if args.no_test:
            return 0

    from locoop.engine.provenance import dataset_provenance, training_config_meta
    from locoop.ood.runner import run_ood_benchmark

    trainer.set_model_mode("eval")
    with torch.no_grad():
        text = trainer.text_features()
        meta = {"trainer": cfg.TRAINER.NAME, "adapters": trainer.describe(),
                "model_dir": args.model_dir or cfg.OUTPUT_DIR, "load_epoch": args.load_epoch,
                "final_model": cfg.TEST.FINAL_MODEL, "epochs": int(cfg.OPTIM.MAX_EPOCH)}
        info = read_run_info(args.model_dir) if test_only else None
        if info:
            meta["training"] = info
        meta.update(training_config_meta(trainer))  # a retest: the adapters' training config
        ds = trainer.dm.dataset
        meta.update(dataset_provenance(ds, ("split_file", "split_hash", "val_split_file", "val_split_hash")))
        run_ood_benchmark(cfg, trainer.clip_model, text, cfg.OUTPUT_DIR, meta=meta, device=trainer.device,
                          dataset=ds, verbose=bool(cfg.VERBOSE), precision=trainer.precision)
    return 0


def run(args: argparse.Namespace) -> int:
    """Fine-tune and test; 2 on bad input."""
    return run_command("setar-finetune", _run, args)
