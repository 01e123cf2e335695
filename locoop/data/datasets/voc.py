"""Pascal-VOC as the ID dataset, in SeTAR's layout (registered as ``"PascalVOC"``).

SeTAR evaluates with GL-MCM's single-label Pascal-VOC subset (images whose ID objects belong to
one class), 14 classes, split 1:9 per class into validation (94 images) and test (906). The class
folder names are the prompt class names. Layouts accepted under ``DATASET.ROOT``::

    ID_VOC/                     SeTAR
      test/<class>/*.jpg
      val/<class>/*.jpg         optional validation set (DATASET.VAL_SPLIT_FILE, if set, wins; neither: val = test)
      train/<class>/*.jpg       optional few-shot training images
      classnames.txt            optional '<folder> <class name>' lines (else the folder names)
    ID_VOC_single/<class>/*.jpg GL-MCM's download (used as the test set when ID_VOC/ is absent)

With ``DATASET.VAL_SPLIT_FILE`` (SeTAR's ``voc_val_data.json``) the listed images are looked up in
``ID_VOC/val``, the test folder and ``ID_VOC_single`` and removed from the test set, which turns
GL-MCM's folder into exactly SeTAR's val/test split.
"""
from __future__ import annotations

import os

from ...engine.registry import DATASET_REGISTRY
from ..classnames import compare_keys, resolve_voc_classnames
from ..datum import DatasetBase
from ..fewshot import load_or_create_fewshot, select_subsample_labels, subsample_dataset
from .imagenet import check_file_order, drop_overlap, few, list_class_folders, read_class_folders, relabel_cached
from .valsplit import load_val_split

VOC_LAYOUT = """Expected layout under DATASET.ROOT (SeTAR's):
  ID_VOC/test/<class>/*.jpg    test images, one folder per class (aeroplane, bicycle, ..., tvmonitor)
  ID_VOC/val/<class>/*.jpg     (optional) validation images (DATASET.VAL_SPLIT_FILE, if set, wins)
  ID_VOC/train/<class>/*.jpg   (optional) few-shot training images
or GL-MCM's ID_VOC_single/<class>/*.jpg as the test set.
See data/README.md; `python -m locoop check-data --root DATA --dataset voc` reports what to fix."""


def voc_paths(root: str) -> dict:
    """The folders of the VOC layouts under ``root`` (whether or not they exist)."""
    root = os.path.abspath(os.path.expanduser(root))
    d = os.path.join(root, "ID_VOC")
    return {"dataset_dir": d, "test": os.path.join(d, "test"), "val": os.path.join(d, "val"),
            "train": os.path.join(d, "train"), "single": os.path.join(root, "ID_VOC_single")}


def voc_test_dir(paths: dict) -> str:
    """The test folder in use: ``ID_VOC/test`` if present, else ``ID_VOC_single`` (or None)."""
    for key in ("test", "single"):
        if os.path.isdir(paths[key]):
            return paths[key]
    return None


@DATASET_REGISTRY.register()
class PascalVOC(DatasetBase):
    """Pascal-VOC ID set (see module docstring).

    Args:
        cfg: config (``DATASET.ROOT``, ``DATASET.NUM_SHOTS``, ``DATASET.VAL_SPLIT_FILE``,
            ``DATASET.SUBSAMPLE_CLASSES``, ``SEED``).
        need_train: ``None`` (default): use ``ID_VOC/train`` when it exists, else no training
            items; ``True``: require it; ``False``: ignore it.
    """

    dataset_dir = "ID_VOC"

    def __init__(self, cfg, need_train=None) -> None:
        if not cfg.DATASET.ROOT:
            raise ValueError("DATASET.ROOT is empty; set it to the folder that holds ID_VOC/.\n" + VOC_LAYOUT)
        paths = voc_paths(cfg.DATASET.ROOT)
        self.dataset_dir = paths["dataset_dir"]
        subsample = str(cfg.DATASET.SUBSAMPLE_CLASSES)
        select_subsample_labels([], subsample)
        file_order = check_file_order(str(cfg.DATASET.FEWSHOT_FILE_ORDER))
        test_dir = voc_test_dir(paths)
        if test_dir is None:
            raise FileNotFoundError(f"Pascal-VOC folders not found: {paths['test']} (or {paths['single']})\n"
                                    + VOC_LAYOUT)
        if need_train and not os.path.isdir(paths["train"]):
            raise FileNotFoundError(f"Pascal-VOC training folder not found: {paths['train']}\n" + VOC_LAYOUT)
        use_train = os.path.isdir(paths["train"]) if need_train is None else bool(need_train)

        keys = list_class_folders(test_dir)
        if not keys:
            raise FileNotFoundError(f"no class folders in {test_dir}\n" + VOC_LAYOUT)
        # classnames.txt lives next to the split folders (ID_VOC/ or ID_VOC_single/).
        names_dir = self.dataset_dir if test_dir == paths["test"] else test_dir
        classes = resolve_voc_classnames(names_dir, keys, folder_desc=test_dir)
        for split in ("val", "train") if use_train else ("val",):
            if os.path.isdir(paths[split]):
                a, b = compare_keys(keys, list_class_folders(paths[split]))
                if a or b:
                    raise ValueError(f"the class folders of {paths[split]} differ from those of {test_dir} "
                                     f"(missing: {few(a) or '-'}; extra: {few(b) or '-'})")

        train_x: list = []
        split_file = split_hash = None
        if use_train:
            num_shots, seed = int(cfg.DATASET.NUM_SHOTS), int(cfg.SEED)
            if num_shots >= 1:
                train_x, split_file, split_hash, created = load_or_create_fewshot(
                    self.dataset_dir, num_shots, seed,
                    lambda: read_class_folders(paths["train"], classes, order=file_order))
                train_x = relabel_cached(train_x, classes, split_file)
                print(f"{'Saved' if created else 'Loaded'} few-shot split {split_file}")
            else:
                train_x = read_class_folders(paths["train"], classes)

        test = read_class_folders(test_dir, classes)
        if not test:
            raise ValueError(f"no images found under {test_dir}/<class>/\n" + VOC_LAYOUT)
        val_split_file = val_split_hash = None
        if cfg.DATASET.VAL_SPLIT_FILE:
            search = [d for d in (paths["val"], test_dir, paths["single"]) if os.path.isdir(d)]
            val, val_split_file, val_split_hash = load_val_split(
                cfg.DATASET.VAL_SPLIT_FILE, classes.key_to_label, classes.names, search,
                base_dirs=(self.dataset_dir, os.path.dirname(self.dataset_dir)))
            test = drop_overlap(test, val, "PascalVOC")
        elif os.path.isdir(paths["val"]):
            val = read_class_folders(paths["val"], classes)
        else:
            val = test

        train_x, val, test, kept = subsample_dataset(train_x, val, test, len(classes.names), subsample)
        names = [classes.names[i] for i in kept]
        super().__init__(train_x=train_x, val=val, test=test, classnames=names)
        self.classnames_file, self.classnames_hash = classes.source, classes.sha256
        self.split_file, self.split_hash = split_file, split_hash
        self.val_split_file, self.val_split_hash = val_split_file, val_split_hash
        self.class_keys = [classes.keys[i] for i in kept]
        self.train_dir = paths["train"] if use_train else None  # names an empty class's folder in refusals
