"""``python -m locoop visualize``: the regions LoCoOp treats as OOD in one image (``demo_visualization.py``).

    python -m locoop visualize --root DATA --trainer LoCoOp \
        --dataset-config-file configs/datasets/imagenet.yaml \
        --config-file configs/trainers/LoCoOp/vit_b16_ep50.yaml \
        --model-dir RUN_DIR --load-epoch 50 \
        --image_path DATA/imagenet/images/train/n01440764/n01440764_10026.JPEG --label 0

Writes ``<out>/visualization/<image path relative to --root>.png`` (the model's input with the OOD
regions shaded, at the input resolution) and ``..._regions.png`` (with the local max-softmax heat
map), where ``<out>`` is ``--output-dir``, else ``--model-dir``.
"""
from __future__ import annotations

import argparse

from locoop.commands._common import (add_common_arguments, build_cfg, check_model_dir, check_trainer, load_trainer_for_eval,
                                     prepare_run,
                                     run_command, trainer_needs_checkpoint)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add demo_visualization.py's flags."""
    add_common_arguments(parser, "visualize")


def _run(args: argparse.Namespace) -> int:
    from locoop.viz.regions import check_image_file, visualize_ood_regions

    check_image_file(args.image_path)
    if args.label < 0:
        raise ValueError(f"--label {args.label} is negative; give the class index in [0, number of classes)")
    if not args.output_dir and args.model_dir:
        args.output_dir = args.model_dir
    cfg = build_cfg(args)
    from locoop.models.swinv2 import refuse_swinv2_backbone

    refuse_swinv2_backbone(cfg.MODEL.BACKBONE.NAME, "visualize", "a CLIP model's class prompts and local features")
    cls = check_trainer(cfg.TRAINER.NAME)
    if trainer_needs_checkpoint(cls) or args.model_dir:
        check_model_dir(args.model_dir, args.load_epoch)
    prepare_run(cfg, args)

    from locoop.data import build_transform

    trainer, text_features = load_trainer_for_eval(cfg, args)
    num_classes = int(text_features.shape[0])
    if args.label >= num_classes:
        raise ValueError(f"--label {args.label} is outside [0, {num_classes}): the dataset has {num_classes} classes")
    from locoop.trainers.loss import check_top_k

    check_top_k("TRAINER.LOCOOP.TOPK", int(cfg.TRAINER.LOCOOP.TOPK), num_classes, str(cfg.DATASET.NAME),
                f"--topk {max(1, num_classes - 1)}")
    classnames = getattr(trainer, "classnames", None) or getattr(getattr(trainer, "dm", None), "classnames", None)
    regions = visualize_ood_regions(
        trainer.clip_model, text_features, args.image_path, args.label, build_transform(cfg, is_train=False),
        cfg.OUTPUT_DIR, top_k=int(cfg.TRAINER.LOCOOP.TOPK), root=cfg.DATASET.ROOT or None, classnames=classnames,
        device=getattr(trainer, "device", None))
    k = regions.top_k
    rows, cols = regions.grid
    print(f"{int(regions.ood_mask.sum())} of {regions.ood_mask.size} regions ({rows}x{cols} grid) "
          f"are OOD for label {regions.label} (not in their top-{k}); global prediction: {regions.global_pred}")
    print(f"wrote {regions.files['image']}\nwrote {regions.files['figure']}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Visualise; 2 on bad input."""
    return run_command("visualize", _run, args)
