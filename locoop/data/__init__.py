"""Data layer: items, datasets in the papers' folder layouts, few-shot splits, transforms, loaders.

See data/README.md for the expected folder layouts and ``python -m locoop check-data``, and
docs/ARCHITECTURE.md for where the data layer sits.
"""
from .classnames import ClassNames, read_classnames_file, sha256_file
from .data_manager import (DataManager, SkippingDataLoader, build_data_loader, build_dataset, build_eval_loader,
                           get_dataset_class, list_datasets)
from .datum import DatasetBase, Datum
from .fewshot import (FewShotWarning, fewshot_split_path, generate_fewshot_dataset, load_fewshot_split,
                      load_or_create_fewshot, save_fewshot_split, subsample_classes)
from .image_io import (IMG_EXTENSIONS, CorruptImageWarning, DatasetWrapper, UnreadableImageError,
                       collate_skipping, list_images, read_image)
from .transforms import AVAILABLE_TRANSFORMS, build_test_transform, build_train_transform, build_transform

# Import last: dataset modules register themselves in DATASET_REGISTRY.
from .datasets import (IMAGENET_OOD_SETS, OOD_LAYOUT, VOC_OOD_SETS, ImageNet, PascalVOC,  # noqa: E402
                       build_ood_datasets, load_val_split)

__all__ = [
    "Datum", "DatasetBase", "ClassNames", "read_classnames_file", "sha256_file",
    "DataManager", "SkippingDataLoader", "build_data_loader", "build_eval_loader", "build_dataset", "list_datasets", "get_dataset_class",
    "FewShotWarning", "fewshot_split_path", "generate_fewshot_dataset", "load_fewshot_split",
    "load_or_create_fewshot", "save_fewshot_split", "subsample_classes",
    "IMG_EXTENSIONS", "CorruptImageWarning", "DatasetWrapper", "UnreadableImageError", "collate_skipping",
    "list_images", "read_image",
    "AVAILABLE_TRANSFORMS", "build_test_transform", "build_train_transform", "build_transform",
    "ImageNet", "PascalVOC", "build_ood_datasets", "load_val_split", "OOD_LAYOUT", "IMAGENET_OOD_SETS",
    "VOC_OOD_SETS",
]
