"""Datasets; importing this package registers them in ``DATASET_REGISTRY``.

- ``ImageNet`` (:mod:`.imagenet`): CoOp's layout, few-shot training split, SeTAR validation JSON.
- ``PascalVOC`` (:mod:`.voc`): SeTAR's Pascal-VOC ID layout.
- OOD image folders (:mod:`.ood`): :func:`build_ood_datasets`.
"""
from .imagenet import IMAGENET_LAYOUT, ImageNet
from .openood import OPENOOD_V15_IMAGENET, OpenOODImageNet, build_openood_ood_sets  # noqa: F401 (registers)
from .ood import (IMAGENET_OOD_SETS, OOD_LAYOUT, SETAR_OOD_LAYOUT, VOC_OOD_SETS, build_ood_datasets,
                  canonical_ood_name, check_ood_folders, resolve_ood_dir)
from .valsplit import load_val_split, read_split_json, write_val_split
from .voc import VOC_LAYOUT, PascalVOC

__all__ = [
    "ImageNet", "PascalVOC", "IMAGENET_LAYOUT", "VOC_LAYOUT",
    "OOD_LAYOUT", "SETAR_OOD_LAYOUT", "IMAGENET_OOD_SETS", "VOC_OOD_SETS",
    "build_ood_datasets", "canonical_ood_name", "check_ood_folders", "resolve_ood_dir",
    "load_val_split", "read_split_json", "write_val_split",
]
