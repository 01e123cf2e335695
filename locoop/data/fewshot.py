"""Few-shot sampling (K images per class for a seed), the split cache, and base/new class subsets.

Sampling is Dassl's ``generate_fewshot_dataset`` as CoOp / LoCoOp run it: the items are grouped by label
in the order the labels first appear in the listing (Dassl's ``split_dataset_by_label``), and each class
with at least K items gets ``random.sample(items, K)`` from Python's ``random`` seeded with the run's seed
(a class with fewer keeps all of its items and draws nothing). The papers seed ``random`` with
``set_random_seed(SEED)`` and build the dataset before anything else draws from it, so a private
``random.Random(SEED)`` gives the same images, in the same order, for the same listing.

Cache file: ``<dataset_dir>/split_fewshot/shot_<K>-seed_<seed>.pkl`` (CoOp's name and place).

Format and safety: CoOp pickles Dassl ``Datum`` objects, and unpickling runs arbitrary code. Our
file keeps CoOp's name but holds only plain Python data written with ``torch.save`` (a dict of
lists of str/int) and is read with ``torch.load(weights_only=True)``. A file written by CoOp / LoCoOp
(a plain pickle of ``{"train": [Datum, ...], "val": [...]}``) is read with the restricted unpickler of
:mod:`locoop.engine.safe_load`, which accepts only Dassl ``Datum`` records in plain containers and never
executes anything; its absolute image paths are re-rooted under the current dataset folder.
Our image paths are stored relative to the dataset folder with ``/`` separators, so the cache keeps
working after the dataset folder is moved or mounted elsewhere. Writes go to a temporary file in
the same folder followed by ``os.replace``, so a killed run never leaves half a file behind.
"""
from __future__ import annotations

import math
import os
import random
import re
import warnings
from typing import Callable, Optional, Sequence

import torch

from ..engine.fileio import atomic_torch_save
from .classnames import sha256_file
from .datum import Datum

SPLIT_FORMAT = "locoop-fewshot-split/1"


class FewShotWarning(UserWarning):
    """Some classes have fewer images than the requested number of shots."""


def split_by_label(data_source: Sequence[Datum]) -> dict:
    """Group items by label as Dassl's ``split_dataset_by_label``: labels in the order they first appear,
    items in their original order."""
    groups: dict = {}
    for d in data_source:
        groups.setdefault(d.label, []).append(d)
    return groups


def check_fewshot_feasible(class_sizes: dict, num_shots: int, what: str = "the training set") -> list:
    """Check that ``num_shots`` images per class can be drawn; return the classes that fall short.

    Args:
        class_sizes: class name (or label) -> number of images.
        num_shots: K.
        what: description of the data for the messages.

    Returns:
        Sorted ``(class, size)`` pairs of the classes with fewer than K images (all their images
        will be used).

    Raises:
        ValueError: K is larger than every class (nothing would be a K-shot class), or no class
            has any image.
    """
    if not class_sizes:
        raise ValueError(f"{what} has no classes")
    largest = max(class_sizes.values())
    if largest == 0:
        raise ValueError(f"every class of {what} is empty; add images to the class folders")
    if num_shots > largest:
        raise ValueError(
            f"DATASET.NUM_SHOTS={num_shots} is larger than every class of {what} (the largest has "
            f"{largest} images). Lower DATASET.NUM_SHOTS to at most {largest}, or add images.")
    return sorted(((c, n) for c, n in class_sizes.items() if n < num_shots), key=lambda x: str(x[0]))


def generate_fewshot_dataset(data_source: Sequence[Datum], num_shots: int, seed: int,
                             warn: bool = True) -> list:
    """Draw ``num_shots`` items per class exactly as Dassl does for ``seed`` (see the module docstring).

    The result depends on the order of ``data_source`` (as in the papers' code): list the images as the
    papers do to get their split. A class with fewer than K images contributes all of them, with a
    :class:`FewShotWarning` naming the classes. ``num_shots < 1`` returns the data unchanged; ``seed < 0``
    (not seeded, as the papers' ``SEED -1``) draws from fresh entropy.

    Raises:
        ValueError: ``num_shots`` is larger than every class.
    """
    if num_shots < 1:
        return list(data_source)
    groups = split_by_label(data_source)
    sizes = {items[0].classname or lab: len(items) for lab, items in groups.items()}
    short = check_fewshot_feasible(sizes, num_shots)
    if short and warn:
        shown = ", ".join(f"{c} ({n})" for c, n in short[:10])
        more = f", ... ({len(short)} classes in all)" if len(short) > 10 else ""
        warnings.warn(f"{len(short)} classes have fewer than NUM_SHOTS={num_shots} images; all of their "
                      f"images are used: {shown}{more}", FewShotWarning, stacklevel=2)
    # random.seed(seed) right after seeding, as Dassl's set_random_seed leaves it for the sampling.
    rng = random.Random(int(seed)) if int(seed) >= 0 else random.Random()
    out = []
    for items in groups.values():
        out.extend(rng.sample(items, num_shots) if len(items) >= num_shots else list(items))
    return out


def fewshot_split_path(dataset_dir: str, num_shots: int, seed: int) -> str:
    """CoOp's cache path ``<dataset_dir>/split_fewshot/shot_<K>-seed_<seed>.pkl``."""
    return os.path.join(dataset_dir, "split_fewshot", f"shot_{num_shots}-seed_{seed}.pkl")


def _to_relative(items: Sequence[Datum], dataset_dir: str) -> list:
    base = os.path.abspath(dataset_dir)
    rows = []
    for d in items:
        rel = os.path.relpath(os.path.abspath(d.impath), base)
        if rel.startswith(".."):
            raise ValueError(f"{d.impath} is outside the dataset folder {base}; the few-shot cache stores "
                             "paths relative to it")
        rows.append({"impath": rel.replace(os.sep, "/"), "label": d.label, "classname": d.classname,
                     "domain": d.domain})
    return rows


def save_fewshot_split(path: str, dataset_dir: str, train: Sequence[Datum], val: Optional[Sequence[Datum]] = None,
                       meta: Optional[dict] = None) -> None:
    """Write a split atomically with paths relative to ``dataset_dir`` (see module docstring)."""
    payload = {"format": SPLIT_FORMAT, "train": _to_relative(train, dataset_dir),
               "val": None if val is None else _to_relative(val, dataset_dir), "meta": dict(meta or {})}
    atomic_torch_save(payload, path)


DASSL_SPLIT_CONTENTS = "Dassl Datum records in plain lists and dicts"


def _reroot(stored: str, dataset_dir: str, prefix: Optional[list]) -> tuple:
    """``(path under dataset_dir, number of leading components dropped)`` for a path stored elsewhere, or
    ``(None, None)``. The longest tail of ``stored`` that exists under ``dataset_dir`` wins."""
    parts = [p for p in re.split(r"[\\/]+", stored) if p and p != "."]
    if prefix is not None and parts[:len(prefix)] == prefix:
        candidate = os.path.join(dataset_dir, *parts[len(prefix):])
        if os.path.isfile(candidate):
            return candidate, len(prefix)
    for i in range(len(parts)):
        candidate = os.path.join(dataset_dir, *parts[i:])
        if os.path.isfile(candidate):
            return candidate, i
    return None, None


def _dassl_items(path: str, records: Optional[list], base: str, what: str) -> tuple:
    """Our Datum items for a list of Dassl Datum records, re-rooted under ``base``; and the old root."""
    from locoop.engine.safe_load import DasslDatum

    if records is None:
        return None, None
    if not isinstance(records, list) or not all(isinstance(r, DasslDatum) for r in records):
        raise ValueError(f"{path}: '{what}' is not a list of Dassl Datum objects; delete the file to regenerate it")
    items, missing, prefix, old_root = [], [], None, None
    for r in records:
        stored = str(r.impath)
        new, dropped = _reroot(stored, base, prefix)
        if new is None:
            missing.append(stored)
            continue
        if prefix is None:
            prefix = [p for p in re.split(r"[\\/]+", stored) if p and p != "."][:dropped]
            old_root = stored[: len(stored) - len(os.path.relpath(new, base))].rstrip("/\\") or "/"
        items.append(Datum(new, int(r.label), str(r.classname), int(r.domain or 0)))
    if missing:
        raise ValueError(
            f"the few-shot split {path} (written by CoOp/LoCoOp) lists {len(missing)} images that are not under "
            f"{base} (first: {missing[0]}). Put the dataset there in the layout the split was made with, or "
            "delete the file to draw a new split.")
    return items, old_root


def load_fewshot_split(path: str, dataset_dir: str) -> dict:
    """Read a split written by :func:`save_fewshot_split`, or by CoOp / LoCoOp (a pickle of Dassl ``Datum``).

    Paths become absolute under ``dataset_dir`` (a CoOp / LoCoOp file's absolute paths are re-rooted there).

    Returns:
        ``{"train": [Datum], "val": [Datum] or None, "meta": dict, "format": "locoop" or "dassl"}``; a Dassl
        file also has ``"old_root"``, the folder its paths were re-rooted from.

    Raises:
        ValueError: the file is neither format, holds other objects (named; never executed), is damaged, or
            lists an image that does not exist.
    """
    from locoop.engine.safe_load import SPLIT_ALLOWLIST, file_kind, load_foreign_file, restricted_pickle_load

    base = os.path.abspath(dataset_dir)
    if file_kind(path) == "pickle":  # CoOp / LoCoOp: pickle.dump of Dassl Datum objects
        payload = load_foreign_file(path, "few-shot split", lambda p: restricted_pickle_load(p, SPLIT_ALLOWLIST),
                                    DASSL_SPLIT_CONTENTS)
        if not isinstance(payload, dict) or "train" not in payload:
            raise ValueError(f"{path} is not a few-shot split written by this framework or by CoOp/LoCoOp: "
                             f"expected a dict with 'train', found {type(payload).__name__}; delete it to regenerate")
        train, old_root = _dassl_items(path, payload["train"], base, "train")
        val, _ = _dassl_items(path, payload.get("val"), base, "val")
        return {"train": train, "val": val, "meta": {}, "format": "dassl", "old_root": old_root}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged, or a zip archive that is not one of ours
        raise ValueError(
            f"{path} is not a few-shot split written by this framework, or it is damaged "
            f"({type(err).__name__}). It is never unpickled with code: delete or move it, and the split is "
            "regenerated (deterministically for the seed).") from None
    if not isinstance(payload, dict) or payload.get("format") != SPLIT_FORMAT:
        raise ValueError(f"{path} does not have the expected format {SPLIT_FORMAT!r}; delete it to regenerate")

    def rows_to_items(rows: Optional[list]) -> Optional[list]:
        if rows is None:
            return None
        items, missing = [], []
        for r in rows:
            p = os.path.join(base, *r["impath"].split("/"))
            if not os.path.isfile(p):
                missing.append(p)
            items.append(Datum(p, int(r["label"]), str(r["classname"]), int(r.get("domain", 0))))
        if missing:
            raise ValueError(
                f"the few-shot split {path} lists {len(missing)} images that do not exist under {base} "
                f"(first: {missing[0]}). The dataset changed since the split was made: delete the file to "
                "regenerate it, or restore the images.")
        return items

    return {"train": rows_to_items(payload["train"]), "val": rows_to_items(payload.get("val")),
            "meta": dict(payload.get("meta") or {}), "format": "locoop"}


def load_or_create_fewshot(dataset_dir: str, num_shots: int, seed: int,
                           make_source: Callable[[], Sequence[Datum]]) -> tuple:
    """The K-shot training split for a seed, from the cache or generated and cached.

    Args:
        dataset_dir: the dataset folder holding ``split_fewshot/``.
        num_shots: K (>= 1).
        seed: sampling seed.
        make_source: returns the full training list; only called when no cache exists.

    Returns:
        ``(train_items, cache_path, sha256_of_cache_file, created)``.
    """
    path = fewshot_split_path(dataset_dir, num_shots, seed)
    created = False
    if os.path.isfile(path):
        split = load_fewshot_split(path, dataset_dir)
        train = split["train"]
        if split["format"] == "dassl":
            print(f"Using the few-shot split written by CoOp/LoCoOp at {path} ({len(train)} Dassl Datum records, "
                  f"read without executing code; image paths re-rooted from {split['old_root']} to "
                  f"{os.path.abspath(dataset_dir)})")
    else:
        train = generate_fewshot_dataset(make_source(), num_shots, seed)
        save_fewshot_split(path, dataset_dir, train, meta={"num_shots": num_shots, "seed": seed})
        created = True
    return train, path, sha256_file(path), created


def select_subsample_labels(labels: Sequence[int], subsample: str = "all") -> list:
    """The labels kept by CoOp's base-to-new protocol: sorted labels split at ``ceil(n / 2)``.

    Raises:
        ValueError: ``subsample`` is not one of all/base/new.
    """
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"DATASET.SUBSAMPLE_CLASSES must be one of 'all', 'base', 'new'; got {subsample!r}")
    labels = sorted(set(labels))
    if subsample == "all":
        return labels
    m = math.ceil(len(labels) / 2)
    return labels[:m] if subsample == "base" else labels[m:]


def subsample_classes(*data_sources: Sequence[Datum], subsample: str = "all",
                      num_classes: Optional[int] = None) -> list:
    """Keep the first (``base``) or second (``new``) half of the classes, relabelled from 0.

    The class set is ``range(num_classes)`` when given, else the labels of the first non-empty
    list (CoOp takes the training list). ``all`` returns the lists unchanged.

    Raises:
        ValueError: ``subsample`` is not one of all/base/new.
    """
    if num_classes is not None:
        labels = list(range(num_classes))
    else:
        first = next((ds for ds in data_sources if len(ds)), [])
        labels = [d.label for d in first]
    selected = select_subsample_labels(labels, subsample)
    if subsample == "all":
        return [list(ds) for ds in data_sources]
    relabel = {lab: i for i, lab in enumerate(selected)}
    return [[Datum(d.impath, relabel[d.label], d.classname, d.domain) for d in ds if d.label in relabel]
            for ds in data_sources]


def subsample_dataset(train_x: Sequence[Datum], val: Sequence[Datum], test: Sequence[Datum], num_classes: int,
                      subsample: str = "all") -> tuple:
    """CoOp's base/new class split applied to the three splits of a dataset.

    Returns:
        ``(train_x, val, test, kept)``: the splits relabelled from 0, and the original labels kept
        (in their new order), e.g. to select the class names.
    """
    kept = select_subsample_labels(range(num_classes), subsample)
    if subsample != "all":
        train_x, val, test = subsample_classes(train_x, val, test, subsample=subsample, num_classes=num_classes)
    return train_x, val, test, kept
