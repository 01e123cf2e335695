"""``python -m locoop check-data --root DATA [--dataset imagenet|voc|openood|none] [--ood [NAME ...]] ...``.

Checks a data root against the layouts the datasets expect (see data/README.md), prints what is
present and what is missing with the fix for every problem, and exits with 1 when a problem
blocks training or evaluation (0 otherwise).
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the check-data arguments."""
    parser.add_argument("--root", required=True, help="the data root (DATASET.ROOT)")
    parser.add_argument("--dataset", default="imagenet", type=str.lower, choices=["imagenet", "voc", "openood", "none"],
                        help="ID dataset to check: imagenet (imagenet/images/{train,val}), voc (ID_VOC/), openood "
                             "(OpenOOD v1.5's ImageNet-1K image lists benchmark_imglist/imagenet/*.txt and the images "
                             "they name; ID and OOD lists together) or none")
    parser.add_argument("--ood", nargs="*", default=None, metavar="NAME",
                        help="OOD sets to check (iNaturalist SUN Places Texture ImageNet-22K COCO; openood: SSB-hard "
                             "NINCO iNaturalist Textures OpenImage-O, all by default); --ood alone checks the "
                             "benchmark's sets for --dataset")
    parser.add_argument("--num-shots", type=int, default=None, metavar="K",
                        help="check that K images per class can be drawn (DATASET.NUM_SHOTS; openood: that its "
                             "training list train_imagenet.txt is there)")
    parser.add_argument("--seed", type=int, default=None,
                        help="with --num-shots: also check the cached few-shot split of this seed")
    parser.add_argument("--val-split", default=None, metavar="JSON",
                        help="check a validation-split JSON {class folder: [file names]} (DATASET.VAL_SPLIT_FILE)")
    parser.add_argument("--eval-only", action="store_true",
                        help="the ImageNet training folder is not required")
    parser.add_argument("--verify-images", action="store_true", help="decode every image (slow on full datasets)")
    parser.add_argument("--workers", type=int, default=None, help="threads for --verify-images (default: up to 8)")
    parser.add_argument("--strict", action="store_true",
                        help="treat unreadable images and classes with fewer than K images as errors")


def run(args: argparse.Namespace) -> int:
    """Print the report; 1 when something blocks training/evaluation, else 0."""
    from locoop.data.check import check_data

    if args.num_shots is not None and args.num_shots < 1:
        print("check-data: --num-shots must be >= 1")
        return 2
    report = check_data(args.root, dataset=args.dataset, ood=args.ood, num_shots=args.num_shots, seed=args.seed,
                        verify_images=args.verify_images, strict=args.strict, need_train=not args.eval_only,
                        val_split_file=args.val_split, workers=args.workers)
    print(report.render())
    return 0 if report.ok else 1
