"""Small generated datasets in the exact on-disk layouts of the real ones (tests, demos).

Images are real JPEG/PNG files. Each ID class has its own colour and stripe orientation, so a
tiny model can learn to tell classes apart; OOD images are low-saturation checkerboards, unlike
any ID class. Everything is deterministic for a seed.
"""
from __future__ import annotations

import colorsys
import os
import random
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .classnames import SETAR_VOC_CLASSNAMES
from .datasets.ood import IMAGENET_OOD_SETS, OOD_LAYOUT, SETAR_OOD_LAYOUT, canonical_ood_name
from .datasets.valsplit import write_val_split
from .image_io import list_images

_COLOUR_WORDS = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet",
                 "purple", "magenta")


def synthetic_wnid(i: int) -> str:
    """WordNet-like id of synthetic class ``i`` (``n0144xxxx``)."""
    return f"n0144{i:04d}"


def synthetic_classname(i: int, num_classes: int) -> str:
    """Readable name of synthetic class ``i`` (its colour word and index)."""
    word = _COLOUR_WORDS[int(i * len(_COLOUR_WORDS) / max(num_classes, 1)) % len(_COLOUR_WORDS)]
    return f"{word} striped thing {i}"


def class_image(label: int, num_classes: int, size: tuple, rng: np.random.Generator) -> Image.Image:
    """An RGB image of class ``label``: class hue and stripe angle, random phase, shift and noise."""
    h, w = size
    hue = label / max(num_classes, 1)
    base = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.9))
    angle = np.pi * ((label * 0.61803) % 1.0)
    freq = 2.0 + (label % 4)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    img = base[None, None, :] * (0.55 + 0.45 * wave[..., None])
    img = img + rng.normal(0, 0.04, size=img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def ood_image(set_index: int, size: tuple, rng: np.random.Generator) -> Image.Image:
    """A low-saturation checkerboard (OOD for every synthetic ID class)."""
    h, w = size
    cell = 4 + 2 * (set_index % 4)
    yy, xx = np.mgrid[0:h, 0:w]
    board = ((yy // cell + xx // cell) % 2).astype(np.float64)
    grey = rng.uniform(0.2, 0.8)
    tint = rng.uniform(-0.05, 0.05, size=3)
    img = grey * (0.6 + 0.4 * board[..., None]) + tint[None, None, :] + rng.normal(0, 0.03, size=(h, w, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def scene_image(label: int, num_classes: int, size: tuple, rng: np.random.Generator, set_index: int = 0,
                object_fraction: float = 0.5) -> Image.Image:
    """An ID object on an OOD background, LoCoOp's picture of a training image.

    Class ``label``'s pattern (:func:`class_image`) fills a centred box covering ``object_fraction``
    of each side; the rest is the OOD checkerboard of set ``set_index`` (:func:`ood_image`). The
    regions a trained model treats as OOD should then be mostly the background.
    """
    if not 0.0 < object_fraction <= 1.0:
        raise ValueError(f"object_fraction must be in (0, 1], got {object_fraction}")
    h, w = size
    out = np.array(ood_image(set_index, size, rng))
    obj = np.array(class_image(label, num_classes, size, rng))
    bh, bw = max(1, round(h * object_fraction)), max(1, round(w * object_fraction))
    top, left = (h - bh) // 2, (w - bw) // 2
    out[top:top + bh, left:left + bw] = obj[top:top + bh, left:left + bw]
    return Image.fromarray(out, "RGB")


def make_scenes(root: str, num_classes: int, image_size: tuple = (224, 224), seed: int = 0,
                folder: str = "scenes") -> list:
    """Write one :func:`scene_image` per class as ``<root>/<folder>/<wnid>_scene.jpg`` (outside every dataset).

    Returns:
        The paths, by label.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for label in range(num_classes):
        path = os.path.join(os.path.abspath(root), folder, f"{synthetic_wnid(label)}_scene.jpg")
        _save(scene_image(label, num_classes, image_size, rng), path)
        paths.append(path)
    return paths


def _save(img: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=90)
    else:
        img.save(path)


def _per_class(value: Union[int, Sequence[int]], n: int, what: str) -> list:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what} has {len(value)} entries for {n} classes")
    return value


def make_imagenet_like(root: str, num_classes: int = 5, train_per_class: Union[int, Sequence[int]] = 6,
                       val_per_class: Union[int, Sequence[int]] = 4, image_size: tuple = (64, 64), seed: int = 0,
                       write_classnames: bool = True, ext: str = ".JPEG") -> dict:
    """Write ``<root>/imagenet/images/{train,val}/<wnid>/<wnid>_<i><ext>`` (+ ``classnames.txt``).

    Args:
        root: the data root (``DATASET.ROOT``).
        num_classes: number of classes (wnids ``n0144xxxx``).
        train_per_class / val_per_class: images per class, one count for all or one per class
            (0 skips creating the split's folder).
        image_size: (height, width).
        seed: random seed.
        write_classnames: write ``imagenet/classnames.txt``.
        ext: image file extension.

    Returns:
        ``{"dataset_dir", "wnids", "classnames"}``.
    """
    rng = np.random.default_rng(seed)
    ds = os.path.join(os.path.abspath(root), "imagenet")
    wnids = [synthetic_wnid(i) for i in range(num_classes)]
    names = [synthetic_classname(i, num_classes) for i in range(num_classes)]
    for split, counts in (("train", _per_class(train_per_class, num_classes, "train_per_class")),
                          ("val", _per_class(val_per_class, num_classes, "val_per_class"))):
        if not any(counts):
            continue
        for label, (wnid, n) in enumerate(zip(wnids, counts)):
            folder = os.path.join(ds, "images", split, wnid)
            os.makedirs(folder, exist_ok=True)
            for j in range(n):
                name = f"{wnid}_{j}{ext}" if split == "train" else f"ILSVRC2012_val_{label:04d}{j:04d}{ext}"
                _save(class_image(label, num_classes, image_size, rng), os.path.join(folder, name))
    if write_classnames:
        os.makedirs(ds, exist_ok=True)
        with open(os.path.join(ds, "classnames.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{w} {n}\n" for w, n in zip(wnids, names))
    return {"dataset_dir": ds, "wnids": wnids, "classnames": names}


def make_ood_sets(root: str, names: Iterable[str] = IMAGENET_OOD_SETS, per_set: int = 8,
                  image_size: tuple = (64, 64), seed: int = 0, layout: str = "mcm") -> dict:
    """Write OOD image folders in their real layouts (images in sub-folders, as downloaded).

    ``layout="mcm"`` uses :data:`OOD_LAYOUT` (``iNaturalist/images/*.jpg``, ...,
    ``Texture/images/<texture>/*.jpg``, ``ImageNet-22K/<wnid>/*.JPEG``, ``OOD_COCO/images/*.jpg``);
    ``layout="setar"`` uses SeTAR's folders. Returns canonical name -> the set's folder.
    """
    if layout not in ("mcm", "setar"):
        raise ValueError(f"layout must be 'mcm' or 'setar', got {layout!r}")
    table = OOD_LAYOUT if layout == "mcm" else SETAR_OOD_LAYOUT
    rng = np.random.default_rng(seed)
    out = {}
    for k, name in enumerate(names):
        canon = canonical_ood_name(name)
        folder = os.path.join(os.path.abspath(root), *table[canon].split("/"))
        for j in range(per_set):
            if canon == "Texture":
                rel = os.path.join(("banded", "striped", "waffled")[j % 3], f"{('banded', 'striped', 'waffled')[j % 3]}_{j:04d}.jpg")
            elif canon == "ImageNet-22K":
                rel = os.path.join(f"n0993{j % 2:04d}", f"n0993{j % 2:04d}_{j}.JPEG")
            else:
                rel = os.path.join("images", f"{canon.lower()}_{j:04d}.jpg")
            _save(ood_image(k, image_size, rng), os.path.join(folder, rel))
        out[canon] = folder
    return out


def make_voc_like(root: str, classes: Sequence[str] = SETAR_VOC_CLASSNAMES, test_per_class: int = 3,
                  val_per_class: int = 1, train_per_class: int = 0, image_size: tuple = (64, 64), seed: int = 0,
                  layout: str = "setar") -> dict:
    """Write Pascal-VOC ID folders.

    ``layout="setar"``: ``ID_VOC/{test,val,train}/<class>/*.jpg`` (val/train only when their count
    is > 0). ``layout="glmcm"``: every image in ``ID_VOC_single/<class>/``; the would-be val images
    are returned so a split JSON can select them.

    Returns:
        ``{"dataset_dir", "classes", "val_files": {class: [file names]}}``.
    """
    if layout not in ("setar", "glmcm"):
        raise ValueError(f"layout must be 'setar' or 'glmcm', got {layout!r}")
    rng = np.random.default_rng(seed)
    root = os.path.abspath(root)
    classes = list(classes)
    val_files: dict = {}
    for label, cls in enumerate(sorted(classes)):
        val_files[cls] = []
        for split, n in (("test", test_per_class), ("val", val_per_class), ("train", train_per_class)):
            for j in range(n):
                name = f"2008_{label:02d}{j:02d}{'tvx'['test val train'.split().index(split)]}.jpg"
                if layout == "setar":
                    path = os.path.join(root, "ID_VOC", split, cls, name)
                elif split == "train":
                    path = os.path.join(root, "ID_VOC", "train", cls, name)
                else:
                    path = os.path.join(root, "ID_VOC_single", cls, name)
                _save(class_image(label, len(classes), image_size, rng), path)
                if split == "val":
                    val_files[cls].append(name)
    ds = os.path.join(root, "ID_VOC" if layout == "setar" else "ID_VOC_single")
    return {"dataset_dir": ds, "classes": sorted(classes), "val_files": val_files}


def make_val_split(out_path: str, split_dir: str, per_class: int = 1, seed: int = 0) -> dict:
    """Write a SeTAR-style split JSON picking ``per_class`` images of every class folder of ``split_dir``.

    Returns:
        The mapping written, ``{class folder: [file names]}``.
    """
    rng = random.Random(seed)
    mapping = {}
    for cls in sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d))):
        files = [os.path.basename(p) for p in list_images(os.path.join(split_dir, cls))]
        mapping[cls] = sorted(rng.sample(files, min(per_class, len(files))))
    write_val_split(out_path, mapping)
    return mapping


def corrupt_image(path: str, mode: str = "truncate", keep: Optional[float] = 0.4) -> None:
    """Damage an image file in place.

    Args:
        path: the file.
        mode: ``truncate`` (keep the first ``keep`` fraction of the bytes: a truncated JPEG),
            ``garbage`` (random bytes, not an image) or ``empty`` (zero bytes).
        keep: fraction kept by ``truncate``.
    """
    with open(path, "rb") as f:
        data = f.read()
    if mode == "truncate":
        data = data[: max(1, int(len(data) * keep))]
    elif mode == "garbage":
        data = bytes(random.Random(len(data)).getrandbits(8) for _ in range(max(len(data), 64)))
    elif mode == "empty":
        data = b""
    else:
        raise ValueError(f"mode must be 'truncate', 'garbage' or 'empty', got {mode!r}")
    with open(path, "wb") as f:
        f.write(data)
