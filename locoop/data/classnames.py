"""Class names: reading ``classnames.txt``, the shipped CLIP ImageNet names, folder matching.

A wrong or missing class-name file is the most common set-up failure of CoOp-style code, so this
module (1) ships the CLIP ImageNet class names (``imagenet_classnames.txt``, one name per line in
sorted-wnid order, from the ``IMAGENET_CLASSNAMES`` tuple of open_clip's
``zero_shot_metadata.py``; MIT licence) and (2) compares the class keys of a class-name file with
the class folders on disk, reporting both directions of a mismatch.

Every resolution returns a :class:`ClassNames` with the file used and its sha256, which result
files record.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

SHIPPED_IMAGENET_CLASSNAMES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classnames.txt")

# Pascal-VOC class folder names. SeTAR (and GL-MCM's single-label VOC subset it reuses) keeps the
# 14 classes below as ID classes and uses the folder names themselves as prompt class names.
VOC_CLASSNAMES_20 = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
SETAR_VOC_CLASSNAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "cow", "diningtable", "dog", "horse",
    "motorbike", "sheep", "sofa", "train", "tvmonitor",
)


@dataclass
class ClassNames:
    """Resolved class list of a dataset.

    Attributes:
        keys: folder names (wnids for ImageNet) in label order (label = position).
        names: prompt class names, same order.
        source: the file used, or ``builtin:<what>`` for a list defined in code.
        sha256: sha256 of the file content (of the newline-joined names for builtin lists).
        shipped: True when the names come with the package rather than from the dataset folder.
    """

    keys: list
    names: list
    source: str
    sha256: str
    shipped: bool = False
    notes: list = field(default_factory=list)

    @property
    def key_to_label(self) -> dict:
        return {k: i for i, k in enumerate(self.keys)}


def sha256_file(path: str) -> str:
    """sha256 hex digest of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """sha256 hex digest of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_classnames_file(path: str) -> dict:
    """Read a ``<key> <class name>`` file (CoOp's ``classnames.txt``) into an ordered dict.

    The key is the first whitespace-separated token (a wnid for ImageNet, a folder name in
    general); the rest of the line, stripped, is the class name. Blank lines are ignored.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line has no class name, or a key appears twice (line numbers given).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-name file not found: {path}")
    mapping: dict = {}
    first_line: dict = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) < 2 or not parts[1].strip():
                raise ValueError(
                    f"{path}, line {lineno}: expected '<folder name> <class name>' (e.g. "
                    f"'n01440764 tench'), got {line!r}")
            key, name = parts[0], parts[1].strip()
            if key in mapping:
                raise ValueError(f"{path}, line {lineno}: {key!r} already defined on line {first_line[key]}; "
                                 "each folder must appear once")
            mapping[key] = name
            first_line[key] = lineno
    if not mapping:
        raise ValueError(f"{path} is empty; expected one '<folder name> <class name>' line per class")
    return mapping


def load_shipped_imagenet_classnames() -> list:
    """The 1000 CLIP ImageNet class names in sorted-wnid order (shipped with the package)."""
    with open(SHIPPED_IMAGENET_CLASSNAMES, "r", encoding="utf-8") as f:
        names = [line.rstrip("\n") for line in f if line.strip()]
    if len(names) != 1000:  # guards against a damaged install
        raise RuntimeError(f"{SHIPPED_IMAGENET_CLASSNAMES} has {len(names)} names, expected 1000; reinstall the package")
    return names


def _few(items: Sequence[str], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def compare_keys(file_keys: Sequence[str], folder_keys: Sequence[str]) -> tuple[list, list]:
    """Keys of a class-name file without a folder, and folders without a key (both sorted)."""
    fk, dk = set(file_keys), set(folder_keys)
    return sorted(fk - dk), sorted(dk - fk)


def mismatch_message(file_path: str, no_folder: Sequence[str], no_name: Sequence[str], folder: str) -> str:
    """Human-readable description of a class-name file / class-folder mismatch."""
    parts = []
    if no_folder:
        parts.append(f"{len(no_folder)} classes in {file_path} have no folder under {folder}: {_few(no_folder)}")
    if no_name:
        parts.append(f"{len(no_name)} folders under {folder} are not in {file_path}: {_few(no_name)}")
    return "; ".join(parts)


def resolve_imagenet_classnames(dataset_dir: str, folder_keys: Sequence[str]) -> ClassNames:
    """Class list of ImageNet from ``<dataset_dir>/classnames.txt`` or the shipped names.

    Labels follow the sorted folder names (CoOp's convention), whatever the order of the file.

    Args:
        dataset_dir: the ``imagenet`` folder.
        folder_keys: the class folder names found on disk.

    Raises:
        ValueError: the file's classes and the folders disagree, or (without a file) there are
            not exactly 1000 class folders so the shipped names cannot be mapped.
    """
    keys = sorted(folder_keys)
    user_file = os.path.join(dataset_dir, "classnames.txt")
    if os.path.isfile(user_file):
        mapping = read_classnames_file(user_file)
        no_folder, no_name = compare_keys(list(mapping), keys)
        if no_folder or no_name:
            raise ValueError(
                mismatch_message(user_file, no_folder, no_name, os.path.join(dataset_dir, "images", "<split>"))
                + f". Make {user_file} list exactly the class folders (one '<wnid> <class name>' line each), "
                "or add/remove the folders.")
        return ClassNames(keys=keys, names=[mapping[k] for k in keys], source=user_file,
                          sha256=sha256_file(user_file), shipped=False)
    if len(keys) != 1000:
        raise ValueError(
            f"{user_file} not found and there are {len(keys)} class folders, not 1000, so the shipped "
            f"CLIP ImageNet class names (1000, in sorted-wnid order) cannot be used. Create {user_file} "
            "with one '<wnid> <class name>' line per class folder (e.g. 'n01440764 tench').")
    names = load_shipped_imagenet_classnames()
    return ClassNames(keys=keys, names=names, source=SHIPPED_IMAGENET_CLASSNAMES,
                      sha256=sha256_file(SHIPPED_IMAGENET_CLASSNAMES), shipped=True)


def resolve_voc_classnames(dataset_dir: str, folder_keys: Sequence[str], folder_desc: Optional[str] = None) -> ClassNames:
    """Class list of Pascal-VOC from ``<dataset_dir>/classnames.txt`` or the built-in VOC lists.

    Without a file the class folders must be SeTAR's 14 ID classes or the 20 VOC classes; the
    folder names are the class names (as SeTAR uses them). Labels follow the sorted folder names.

    Args:
        dataset_dir: folder that may hold ``classnames.txt``.
        folder_keys: the class folder names found on disk.
        folder_desc: where the class folders are (for messages; default ``dataset_dir``).
    """
    keys = sorted(folder_keys)
    folder_desc = folder_desc or dataset_dir
    user_file = os.path.join(dataset_dir, "classnames.txt")
    if os.path.isfile(user_file):
        mapping = read_classnames_file(user_file)
        no_folder, no_name = compare_keys(list(mapping), keys)
        if no_folder or no_name:
            raise ValueError(mismatch_message(user_file, no_folder, no_name, folder_desc)
                             + f". Make {user_file} list exactly the class folders.")
        return ClassNames(keys=keys, names=[mapping[k] for k in keys], source=user_file,
                          sha256=sha256_file(user_file))
    for label, builtin in (("setar_voc14", SETAR_VOC_CLASSNAMES), ("voc20", VOC_CLASSNAMES_20)):
        if set(keys) == set(builtin):
            names = sorted(builtin)
            return ClassNames(keys=keys, names=names, source=f"builtin:{label}",
                              sha256=sha256_text("\n".join(names) + "\n"), shipped=True)
    unknown = sorted(set(keys) - set(VOC_CLASSNAMES_20))
    missing = sorted(set(SETAR_VOC_CLASSNAMES) - set(keys))
    detail = []
    if unknown:
        detail.append(f"folders that are not VOC classes: {_few(unknown)}")
    if missing:
        detail.append(f"SeTAR's VOC classes without a folder: {_few(missing)}")
    raise ValueError(
        f"the class folders under {folder_desc} ({len(keys)}) are neither SeTAR's 14 VOC ID classes nor "
        f"the 20 VOC classes ({'; '.join(detail) or 'subset of the VOC classes'}). Fix the folders, or "
        f"write {user_file} with one '<folder> <class name>' line per class folder.")
