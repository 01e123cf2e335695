"""Validation splits given as JSON ``{class folder: [file names]}`` (SeTAR's format).

SeTAR searches its low-rank settings on a small ID validation set: one image per ImageNet class
(picked from the *training* images, e.g. ``"n01440764": ["n01440764_10026.JPEG"]``), and for
Pascal-VOC about 10% of the images of each class. The JSON names files only; they are looked up
as ``<base>/<class folder>/<file name>`` in a list of base folders (for ImageNet: the
``images/val`` folder, then ``images/train``), the first match wins.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from ..classnames import sha256_file
from ..datum import Datum


def resolve_split_path(path: str, base_dirs: Sequence[str] = ()) -> str:
    """Find a split JSON given as an absolute path, or relative to the working folder or one of ``base_dirs``.

    Raises:
        FileNotFoundError: none of the candidates exists (all are listed).
    """
    path = os.path.expanduser(path)
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path)]
    if not os.path.isabs(path):
        candidates += [os.path.join(b, path) for b in base_dirs if b]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"DATASET.VAL_SPLIT_FILE {path!r} not found (looked at: {', '.join(candidates)}). "
                            "Give the path of a JSON file {class folder: [file names]}.")


def read_split_json(path: str) -> dict:
    """Read and type-check a split JSON; returns ``{class folder: [file names]}``.

    Raises:
        ValueError: not valid JSON, not an object of lists of strings, or a file name that
            leaves its class folder (absolute, ``..``).
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected {{class folder: [file names]}}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object {{class folder: [file names]}}, got {type(data).__name__}")
    for key, files in data.items():
        if not isinstance(files, list) or not all(isinstance(x, str) for x in files):
            raise ValueError(f"{path}: the value of {key!r} must be a list of file names")
        for name in files:
            norm = os.path.normpath(name)
            if os.path.isabs(name) or norm.startswith("..") or not norm or norm == ".":
                raise ValueError(f"{path}: {key!r} lists {name!r}; entries must be file names inside the class folder")
        if len(set(files)) != len(files):
            raise ValueError(f"{path}: {key!r} lists a file more than once")
    return data


def load_val_split(path: str, key_to_label: Mapping[str, int], classnames: Sequence[str],
                   search_dirs: Sequence[str], base_dirs: Sequence[str] = ()) -> tuple:
    """Build the validation items from a split JSON.

    Args:
        path: the JSON file (see :func:`resolve_split_path`).
        key_to_label: class folder name -> label of the dataset.
        classnames: class names by label.
        search_dirs: base folders holding ``<class folder>/<file>``, tried in order.
        base_dirs: also try a relative ``path`` relative to these folders (e.g. the dataset folder
            and the data root).

    Returns:
        ``(items, resolved_path, sha256)``; items are in label order, then JSON order.

    Raises:
        FileNotFoundError: the JSON, or a file it lists, is missing.
        ValueError: malformed JSON or a class folder name the dataset does not have.
    """
    resolved = resolve_split_path(path, base_dirs)
    data = read_split_json(resolved)
    unknown = sorted(k for k in data if k not in key_to_label)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
        raise ValueError(f"{resolved} names classes the dataset does not have: {shown}. Use the dataset's class "
                         "folder names (wnids for ImageNet) as keys.")
    items, missing = [], []
    for key in sorted(data, key=lambda k: key_to_label[k]):
        label = key_to_label[key]
        for name in data[key]:
            found = None
            for base in search_dirs:
                p = os.path.join(base, key, name)
                if os.path.isfile(p):
                    found = p
                    break
            if found is None:
                missing.append(f"{key}/{name}")
            else:
                items.append(Datum(os.path.abspath(found), label, classnames[label]))
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{resolved} lists files that were not found in {', '.join(search_dirs)}: {shown}. "
                                "Restore them (or fix the JSON).")
    return items, resolved, sha256_file(resolved)


def write_val_split(path: str, mapping: Mapping[str, Sequence[str]]) -> None:
    """Write ``{class folder: [file names]}`` as indented JSON (used by the demo-data tool)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: list(v) for k, v in mapping.items()}, f, indent=2)
        f.write("\n")
