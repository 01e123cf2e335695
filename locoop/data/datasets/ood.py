"""OOD test sets: image folders under ``DATASET.ROOT``, read recursively, label -1.

Layout (MCM / LoCoOp / GL-MCM), relative to the data root::

    iNaturalist/        e.g. iNaturalist/images/*.jpg
    SUN/                e.g. SUN/images/*.jpg
    Places/             e.g. Places/images/*.jpg
    Texture/images/     <texture class>/*.jpg (DTD)
    ImageNet-22K/       <wnid>/*.JPEG   (OOD for Pascal-VOC / COCO as ID)
    OOD_COCO/           images/*.jpg    (OOD for Pascal-VOC as ID)

SeTAR's layout (``OOD_iNaturalist/test``, ``OOD_Sun/test``, ``OOD_Places/test``,
``OOD_Texture/test/images``, ``OOD_ImageNet22K/test``, ``OOD_COCO/test``) is accepted as well,
so a data root prepared for SeTAR works unchanged. The first existing folder wins.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

from ..datum import Datum
from ..image_io import list_images

OOD_LAYOUT = {
    "iNaturalist": "iNaturalist",
    "SUN": "SUN",
    "Places": "Places",
    "Texture": "Texture/images",
    "ImageNet-22K": "ImageNet-22K",
    "COCO": "OOD_COCO",
}

# SeTAR's folder names for the same sets (its data/README.md).
SETAR_OOD_LAYOUT = {
    "iNaturalist": "OOD_iNaturalist/test",
    "SUN": "OOD_Sun/test",
    "Places": "OOD_Places/test",
    "Texture": "OOD_Texture/test/images",
    "ImageNet-22K": "OOD_ImageNet22K/test",
    "COCO": "OOD_COCO/test",
}

# The OOD sets of each ID benchmark.
IMAGENET_OOD_SETS = ("iNaturalist", "SUN", "Places", "Texture")
VOC_OOD_SETS = ("iNaturalist", "SUN", "Places", "Texture", "ImageNet-22K", "COCO")

# Other spellings used by the papers' scripts (compared case-insensitively).
_ALIASES = {
    "inaturalist": "iNaturalist", "ood_inaturalist": "iNaturalist",
    "sun": "SUN", "ood_sun": "SUN",
    "places": "Places", "places365": "Places", "ood_places": "Places",
    "texture": "Texture", "textures": "Texture", "dtd": "Texture", "ood_texture": "Texture",
    "imagenet-22k": "ImageNet-22K", "imagenet22k": "ImageNet-22K", "in22k": "ImageNet-22K",
    "ood_imagenet22k": "ImageNet-22K",
    "coco": "COCO", "ood_coco": "COCO",
}


def canonical_ood_name(name: str) -> str:
    """The canonical OOD set name for ``name`` (accepts the papers' spellings, any case).

    Raises:
        ValueError: unknown set (valid names listed).
    """
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown OOD dataset {name!r}; choose from {', '.join(OOD_LAYOUT)}")
    return _ALIASES[key]


def ood_candidate_dirs(root: str, name: str) -> list:
    """Folders tried for an OOD set, in order (our layout, then SeTAR's)."""
    canon = canonical_ood_name(name)
    root = os.path.abspath(os.path.expanduser(root))
    return [os.path.join(root, *OOD_LAYOUT[canon].split("/")), os.path.join(root, *SETAR_OOD_LAYOUT[canon].split("/"))]


def resolve_ood_dir(root: str, name: str) -> Optional[str]:
    """The existing folder of an OOD set, or None."""
    return next((d for d in ood_candidate_dirs(root, name) if os.path.isdir(d)), None)


def check_ood_folders(root: str, names: Iterable[str]) -> dict:
    """Resolve every OOD folder up front; one error lists all that are missing.

    Returns:
        canonical name -> folder.

    Raises:
        ValueError: an unknown set name.
        FileNotFoundError: one or more folders are missing (expected paths named).
    """
    found, missing = {}, []
    for name in names:
        canon = canonical_ood_name(name)
        folder = resolve_ood_dir(root, canon)
        if folder is None:
            missing.append(f"  {canon}: expected {ood_candidate_dirs(root, canon)[0]}"
                           f" (or SeTAR's {ood_candidate_dirs(root, canon)[1]})")
        else:
            found[canon] = folder
    if missing:
        raise FileNotFoundError("OOD dataset folders not found under DATASET.ROOT "
                                f"{os.path.abspath(os.path.expanduser(root))}:\n" + "\n".join(missing)
                                + "\nSee data/README.md for the layout, or run `python -m locoop check-data`.")
    return found


def build_ood_datasets(root: str, names: Iterable[str]) -> dict:
    """Items of each OOD set (label -1, classname = set name), keyed by canonical name.

    All folders are checked before any is listed, so a missing one fails fast.

    Raises:
        ValueError: unknown set name, or a folder without images.
        FileNotFoundError: missing folders (all named at once).
    """
    folders = check_ood_folders(root, list(names))
    out = {}
    for canon, folder in folders.items():
        paths = list_images(folder, recursive=True)
        if not paths:
            raise ValueError(f"OOD dataset {canon}: no images found under {folder} (searched recursively for "
                             "image files); put the images there or remove the set from OOD.DATASETS")
        out[canon] = [Datum(p, -1, canon) for p in paths]
    return out
