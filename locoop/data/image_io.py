"""Reading images from disk, and the torch ``Dataset`` that feeds them to the data loaders.

Unreadable images (corrupt, truncated, not an image at all) are a fact of life with ImageNet-scale
folders. By default an unreadable image does not stop a run: :class:`DatasetWrapper` returns a
*skip marker* for it, :func:`collate_skipping` drops the marker from the batch and lists the file
under ``batch["skipped"]``, and the loader (``locoop.data.data_manager.SkippingDataLoader``) warns
and counts it in the main process, so the count is right even with worker processes. In strict
mode the first unreadable image raises :class:`UnreadableImageError` naming the file.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from clip.transform import convert_to_rgb

from .datum import Datum

# Extensions read as images (compared case-insensitively), as torchvision's ImageFolder does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Key of the skip marker returned by DatasetWrapper for an unreadable image.
_SKIP_KEY = "_unreadable"


class UnreadableImageError(RuntimeError):
    """An image file cannot be decoded (raised in strict mode)."""


class CorruptImageWarning(UserWarning):
    """An unreadable image was skipped."""


def is_image_file(name: str) -> bool:
    """True for a visible file name with an image extension (any letter case).

    Hidden files (``.DS_Store``, macOS ``._x.jpg`` resource forks) are not images.
    """
    base = os.path.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def list_images(folder: str, recursive: bool = False) -> list[str]:
    """Image files under ``folder``, as sorted absolute paths.

    Sorting makes the item order (and thus labels, few-shot samples and results) identical on
    every file system. Hidden sub-folders are skipped when ``recursive``.
    """
    folder = os.path.abspath(folder)
    if not recursive:
        with os.scandir(folder) as it:
            return sorted(e.path for e in it if e.is_file() and is_image_file(e.name))
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
    return sorted(found)


def count_non_images(folder: str, recursive: bool = False) -> int:
    """Number of visible files under ``folder`` that are not images (for check-data)."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        n += sum(1 for f in filenames if not f.startswith(".") and not is_image_file(f))
        if not recursive:
            break
    return n


def read_image(path: str) -> Image.Image:
    """Read an image file fully and return it as 8-bit RGB.

    The pixels are decoded here (not lazily), so a truncated or corrupt file fails now with an
    ``OSError``/``ValueError`` instead of later inside a transform. Grayscale, palette, CMYK,
    16-bit and transparent images are converted as CLIP's preprocessing does (alpha dropped).

    Raises:
        FileNotFoundError: the file does not exist.
        OSError: PIL cannot decode the file (corrupt, truncated or not an image).
    """
    with Image.open(path) as img:
        img.load()
        rgb = convert_to_rgb(img)
        # convert_to_rgb returns the same object for RGB input; detach it from the file handle.
        return rgb.copy() if rgb is img else rgb


class DatasetWrapper(Dataset):
    """Torch dataset over a list of :class:`Datum` returning Dassl-style sample dicts.

    Each sample is ``{"img": tensor, "label": int, "domain": int, "impath": str, "index": int}``.
    Indexing with ``(index, seed)`` runs the transform under ``torch.manual_seed(seed)`` (in a forked
    generator state), which makes random augmentations reproducible in any process.
    For an unreadable image it returns a skip marker instead (see the module docstring), or
    raises :class:`UnreadableImageError` when ``strict``.

    Args:
        data_source: the items.
        transform: callable applied to the RGB PIL image (e.g. a torchvision ``Compose``).
        strict: raise on an unreadable image instead of skipping it.
    """

    def __init__(self, data_source: Sequence[Datum], transform: Optional[Callable] = None,
                 strict: bool = False) -> None:
        self.data_source = data_source
        self.transform = transform
        self.strict = bool(strict)

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, key) -> dict:
        # ``key`` is an index, or ``(index, seed)`` from a SeededSampler: the transform then draws
        # its randomness from ``seed`` alone, whatever process runs it.
        idx, seed = key if isinstance(key, tuple) else (key, None)
        item = self.data_source[idx]
        try:
            img = read_image(item.impath)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            # PIL raises OSError for truncated/corrupt data, SyntaxError/ValueError for some
            # malformed headers; a missing file is OSError too.
            reason = f"{type(err).__name__}: {err}"
            if self.strict:
                raise UnreadableImageError(
                    f"cannot read image {item.impath} ({reason}). Replace or delete the file, or run "
                    "without strict mode (DATASET.STRICT False) to skip unreadable images with a warning."
                ) from err
            return {_SKIP_KEY: True, "impath": item.impath, "reason": reason, "index": idx}
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with torch.random.fork_rng(devices=[]):  # leave the caller's CPU generator untouched
                    torch.manual_seed(seed)
                    img = self.transform(img)
        return {"img": img, "label": item.label, "domain": item.domain, "impath": item.impath, "index": idx}


def collate_skipping(samples: list[dict]) -> dict:
    """Collate samples into a batch dict, dropping skip markers.

    The batch always has ``skipped`` (list of image paths dropped from this batch) and
    ``skip_reasons`` (the matching error messages). A batch whose every image was unreadable has
    ``img`` set to ``None``; :class:`~locoop.data.data_manager.SkippingDataLoader` never yields it.
    """
    good = [s for s in samples if not s.get(_SKIP_KEY)]
    bad = [s for s in samples if s.get(_SKIP_KEY)]
    batch: dict[str, Any]
    if good:
        batch = default_collate(good)
    else:
        batch = {"img": None, "label": torch.empty(0, dtype=torch.long),
                 "domain": torch.empty(0, dtype=torch.long), "impath": [],
                 "index": torch.empty(0, dtype=torch.long)}
    batch["skipped"] = [s["impath"] for s in bad]
    batch["skip_reasons"] = [s["reason"] for s in bad]
    return batch
