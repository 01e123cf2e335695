#!/usr/bin/env python
"""Write a small generated data root in the real dataset layouts (for demos and tests).

Examples:
    python tools/make_demo_data.py --root /tmp/demo-data
    python tools/make_demo_data.py --root /tmp/demo-data --classes 10 --train-per-class 16 --ood --voc --val-split
    python tools/make_demo_data.py --root /tmp/demo-data --size 224 224 --ood --val-split --scenes
    python -m locoop check-data --root /tmp/demo-data --ood
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locoop.data.datasets.ood import IMAGENET_OOD_SETS, OOD_LAYOUT  # noqa: E402

VAL_SPLIT = "imagenet1k_val_data.json"  # SeTAR's name; DATASET.VAL_SPLIT_FILE finds it in the dataset folder
from locoop.data.synthetic import (make_imagenet_like, make_ood_sets, make_scenes, make_val_split,  # noqa: E402
                                   make_voc_like)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="data root to write (DATASET.ROOT)")
    parser.add_argument("--classes", type=int, default=5, help="ImageNet-like classes (default 5)")
    parser.add_argument("--train-per-class", type=int, default=6, help="training images per class (default 6)")
    parser.add_argument("--val-per-class", type=int, default=4, help="test (images/val) images per class (default 4)")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"), help="image size")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no-classnames", action="store_true", help="do not write imagenet/classnames.txt")
    parser.add_argument("--ood", nargs="*", default=None, metavar="NAME",
                        help=f"write OOD sets (default with no names: {' '.join(IMAGENET_OOD_SETS)}; "
                             f"any of {' '.join(OOD_LAYOUT)})")
    parser.add_argument("--ood-per-set", type=int, default=8, help="images per OOD set (default 8)")
    parser.add_argument("--ood-layout", choices=["mcm", "setar"], default="mcm", help="OOD folder layout")
    parser.add_argument("--voc", action="store_true", help="also write a Pascal-VOC ID set (SeTAR's layout)")
    parser.add_argument("--val-split", action="store_true",
                        help=f"write imagenet/{VAL_SPLIT}: one training image per class (SeTAR's file and format)")
    parser.add_argument("--scenes", action="store_true",
                        help="write scenes/<wnid>_scene.jpg: each class's pattern on an OOD background (for visualize)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = tuple(args.size)
    info = make_imagenet_like(args.root, num_classes=args.classes, train_per_class=args.train_per_class,
                              val_per_class=args.val_per_class, image_size=size, seed=args.seed,
                              write_classnames=not args.no_classnames)
    print(f"ImageNet-like: {info['dataset_dir']} ({args.classes} classes)")
    if args.ood is not None:
        folders = make_ood_sets(args.root, args.ood or IMAGENET_OOD_SETS, per_set=args.ood_per_set,
                                image_size=size, seed=args.seed, layout=args.ood_layout)
        for name, folder in folders.items():
            print(f"OOD {name}: {folder}")
    if args.voc:
        voc = make_voc_like(args.root, image_size=size, seed=args.seed)
        print(f"Pascal-VOC: {voc['dataset_dir']} ({len(voc['classes'])} classes)")
    if args.val_split:
        out = os.path.join(info["dataset_dir"], VAL_SPLIT)
        make_val_split(out, os.path.join(info["dataset_dir"], "images", "train"), per_class=1, seed=args.seed)
        print(f"Validation split: {out} (use DATASET.VAL_SPLIT_FILE {VAL_SPLIT})")
    if args.scenes:
        paths = make_scenes(args.root, args.classes, size, seed=args.seed)
        print(f"Scenes: {os.path.dirname(paths[0])}/ ({len(paths)} images; class i = label i)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
