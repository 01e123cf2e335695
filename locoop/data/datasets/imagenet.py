"""ImageNet-1K in CoOp's layout (registered as ``"ImageNet"``).

Layout under ``DATASET.ROOT``::

    imagenet/
      classnames.txt            optional: '<wnid> <class name>' per line (else the shipped CLIP names)
      images/train/<wnid>/*.JPEG
      images/val/<wnid>/*.JPEG  the 50,000 validation images sorted into class folders
      split_fewshot/            written here: shot_<K>-seed_<seed>.pkl

Splits, as CoOp/LoCoOp: ``train_x`` = K images per class from ``train`` (``DATASET.NUM_SHOTS`` >= 1;
all training images when < 1), ``test`` = the ``val`` folder, ``val`` = the images listed in
``DATASET.VAL_SPLIT_FILE`` (SeTAR's one-image-per-class JSON, looked up in ``images/val`` then
``images/train``) or else the test set. Labels are the positions of the sorted wnids.

Listing order of the few-shot source (``DATASET.FEWSHOT_FILE_ORDER``): CoOp / LoCoOp list each training
class folder with Dassl's ``listdir_nohidden``, i.e. in ``os.listdir`` order, which is the file system's
order (hash order on ext4; two copies of the same folder can differ). Dassl's sampling depends on that
order, so the default ``listdir`` lists the same way and draws the papers' images for the same seed on the
same copy of the data; ``sorted`` lists by file name, which gives the same split on every copy but not the
papers'. Only the few-shot source is affected: every other list is sorted, and metrics do not depend on it.
"""
from __future__ import annotations

import os
from typing import Sequence

from ...engine.registry import DATASET_REGISTRY
from ..classnames import ClassNames, compare_keys, resolve_imagenet_classnames
from ..datum import DatasetBase, Datum
from ..fewshot import load_or_create_fewshot, select_subsample_labels, subsample_dataset
from ..image_io import is_image_file, list_images
from .valsplit import load_val_split

IMAGENET_LAYOUT = """Expected layout under DATASET.ROOT:
  imagenet/
    classnames.txt              (optional) '<wnid> <class name>' per line; else the shipped CLIP names
    images/train/<wnid>/*.JPEG  training images, one folder per class (needed for training)
    images/val/<wnid>/*.JPEG    the 50,000 validation images, one folder per class (the test set)
See data/README.md; `python -m locoop check-data --root DATA` reports what to fix."""


FILE_ORDERS = ("listdir", "sorted")


def check_file_order(order: str) -> str:
    """``DATASET.FEWSHOT_FILE_ORDER`` checked against :data:`FILE_ORDERS`.

    Raises:
        ValueError: another value (the valid ones are listed).
    """
    if order not in FILE_ORDERS:
        raise ValueError(f"DATASET.FEWSHOT_FILE_ORDER must be one of {FILE_ORDERS} (listdir: the papers' os.listdir "
                         f"order; sorted: by file name), got {order!r}")
    return order


def list_images_listdir(folder: str) -> list:
    """Image files of ``folder`` in ``os.listdir`` order (Dassl's ``listdir_nohidden``), as absolute paths.

    Hidden entries are skipped as Dassl does; so are sub-folders and non-image files, which Dassl would
    list and then fail to read.
    """
    folder = os.path.abspath(folder)
    with os.scandir(folder) as it:  # the same readdir order as os.listdir
        return [e.path for e in it if e.is_file() and is_image_file(e.name)]


def list_class_folders(split_dir: str) -> list:
    """Sorted names of the visible sub-folders of ``split_dir`` (one per class)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def read_class_folders(split_dir: str, classes: ClassNames, recursive: bool = False, order: str = "sorted") -> list:
    """Items of ``<split_dir>/<class folder>/<image>`` for every class, in label order; within a class in
    path order (``order="sorted"``) or in ``os.listdir`` order (``"listdir"``, as CoOp / LoCoOp)."""
    check_file_order(order)
    items = []
    for label, (key, name) in enumerate(zip(classes.keys, classes.names)):
        folder = os.path.join(split_dir, key)
        if not os.path.isdir(folder):
            continue
        paths = list_images_listdir(folder) if order == "listdir" and not recursive else \
            list_images(folder, recursive=recursive)
        items.extend(Datum(p, label, name) for p in paths)
    return items


def few(items: Sequence[str], n: int = 5) -> str:
    """First ``n`` items joined, with the total when there are more."""
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def relabel_cached(items: Sequence[Datum], classes: ClassNames, split_file: str) -> list:
    """Check a cached few-shot split against the current class folders; refresh class names.

    The label of a cached item must still be the label of its class folder (the parent folder
    of the image); the class name is taken from the current class-name file, so editing names
    does not require a new split.

    Raises:
        ValueError: the split was made for another class list.
    """
    key_to_label = classes.key_to_label
    out = []
    for d in items:
        key = os.path.basename(os.path.dirname(d.impath))
        if key_to_label.get(key) != d.label:
            raise ValueError(
                f"the few-shot split {split_file} was made for a different class list ({d.impath} has label "
                f"{d.label}, but its folder {key!r} is now label {key_to_label.get(key)}). Delete the file to "
                "regenerate it for the current classes.")
        out.append(Datum(d.impath, d.label, classes.names[d.label], d.domain))
    return out


def drop_overlap(test: Sequence[Datum], val: Sequence[Datum], what: str) -> list:
    """Remove validation images from the test set so the two never share an image."""
    val_paths = {os.path.normcase(os.path.abspath(d.impath)) for d in val}
    kept = [d for d in test if os.path.normcase(os.path.abspath(d.impath)) not in val_paths]
    if len(kept) != len(test):
        print(f"{what}: {len(test) - len(kept)} images of the validation split were removed from the test set")
    return kept


@DATASET_REGISTRY.register()
class ImageNet(DatasetBase):
    """ImageNet-1K (see module docstring for layout and splits).

    Args:
        cfg: config with ``DATASET.ROOT``, ``DATASET.NUM_SHOTS``, ``DATASET.SUBSAMPLE_CLASSES``,
            ``DATASET.VAL_SPLIT_FILE`` and ``SEED``.
        need_train: whether the training folder must exist and ``train_x`` be built. ``False`` for
            evaluation-only and training-free runs (``train_x`` is then empty).

    Raises:
        FileNotFoundError: missing dataset folders (all named, with the expected layout), a missing
            validation-split file or an image it lists.
        ValueError: class folders and class names disagree, train/val class folders differ,
            NUM_SHOTS larger than every class, bad SUBSAMPLE_CLASSES, a stale few-shot split.
    """

    dataset_dir = "imagenet"

    def __init__(self, cfg, need_train: bool = True) -> None:
        root = os.path.abspath(os.path.expanduser(str(cfg.DATASET.ROOT or "")))
        if not cfg.DATASET.ROOT:
            raise ValueError("DATASET.ROOT is empty; set it to the folder that holds imagenet/ "
                             "(e.g. --root /data or DATASET.ROOT /data).\n" + IMAGENET_LAYOUT)
        self.dataset_dir = os.path.join(root, "imagenet")
        self.image_dir = os.path.join(self.dataset_dir, "images")
        self.train_dir = os.path.join(self.image_dir, "train")
        self.val_dir = os.path.join(self.image_dir, "val")
        subsample = str(cfg.DATASET.SUBSAMPLE_CLASSES)
        select_subsample_labels([], subsample)  # validates the value before any listing
        file_order = check_file_order(str(cfg.DATASET.FEWSHOT_FILE_ORDER))

        missing = [p for p in [self.val_dir] + ([self.train_dir] if need_train else []) if not os.path.isdir(p)]
        if missing:
            raise FileNotFoundError("ImageNet folders not found: " + ", ".join(missing) + "\n" + IMAGENET_LAYOUT)

        val_keys = list_class_folders(self.val_dir)
        if not val_keys:
            raise FileNotFoundError(f"no class folders in {self.val_dir}\n" + IMAGENET_LAYOUT)
        if need_train:
            train_keys = list_class_folders(self.train_dir)
            only_val, only_train = compare_keys(val_keys, train_keys)
            if only_val or only_train:
                parts = []
                if only_train:
                    parts.append(f"in train but not in val: {few(only_train)}")
                if only_val:
                    parts.append(f"in val but not in train: {few(only_val)}")
                raise ValueError(f"the class folders of {self.train_dir} and {self.val_dir} differ ("
                                 + "; ".join(parts) + "). Both must hold the same wnid folders.")
        classes = resolve_imagenet_classnames(self.dataset_dir, val_keys)

        num_shots = int(cfg.DATASET.NUM_SHOTS)
        seed = int(cfg.SEED)
        train_x: list = []
        split_file = split_hash = None
        if need_train:
            if num_shots >= 1:
                train_x, split_file, split_hash, created = load_or_create_fewshot(
                    self.dataset_dir, num_shots, seed,
                    lambda: read_class_folders(self.train_dir, classes, order=file_order))
                train_x = relabel_cached(train_x, classes, split_file)
                print(f"{'Saved' if created else 'Loaded'} few-shot split {split_file}")
            else:
                train_x = read_class_folders(self.train_dir, classes)
            if not train_x:
                raise ValueError(f"no training images found under {self.train_dir}/<wnid>/\n" + IMAGENET_LAYOUT)

        test = read_class_folders(self.val_dir, classes)
        if not test:
            raise ValueError(f"no images found under {self.val_dir}/<wnid>/\n" + IMAGENET_LAYOUT)

        val_split_file = val_split_hash = None
        if cfg.DATASET.VAL_SPLIT_FILE:
            val, val_split_file, val_split_hash = load_val_split(
                cfg.DATASET.VAL_SPLIT_FILE, classes.key_to_label, classes.names,
                [self.val_dir, self.train_dir], base_dirs=(self.dataset_dir, root))
            test = drop_overlap(test, val, "ImageNet")
        else:
            val = test

        train_x, val, test, kept = subsample_dataset(train_x, val, test, len(classes.names), subsample)
        names = [classes.names[i] for i in kept]

        super().__init__(train_x=train_x, val=val, test=test, classnames=names)
        self.classnames_file = classes.source
        self.classnames_hash = classes.sha256
        self.split_file, self.split_hash = split_file, split_hash
        self.val_split_file, self.val_split_hash = val_split_file, val_split_hash
        self.class_keys = [classes.keys[i] for i in kept]
