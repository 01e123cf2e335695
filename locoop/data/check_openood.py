"""Layout checker of an OpenOOD v1.5 data root (the ``check-data`` findings for ``--dataset openood``).

For each image list of the benchmark (the ID test list, optionally the training list, and the OOD
lists): is the list there, are its lines well formed, how many images it names, how many of them are
missing (with the first few), whether the ID labels fit the class names, duplicated lines; the class-
name file used and its sha256. Every problem comes with a ``fix:`` line. ``verify_images`` decodes
every listed image that exists.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Optional

from .check import CheckReport, _verify
from .datasets.imagenet import few
from .datasets.openood import (DOWNLOAD_HINT, OPENOOD_LAYOUT, OPENOOD_V15_IMAGENET, ImageList, OpenOODBenchmark,
                               openood_classnames, parse_imglist)

__all__ = ["check_openood", "check_openood_data"]


def _check_list(report: CheckReport, section: str, root: str, image_list: ImageList, num_classes: Optional[int],
                verify_images: bool, strict: bool, workers: Optional[int], required: bool = True) -> None:
    path = image_list.list_path(root)
    rel = os.path.relpath(path, root)
    if not os.path.isfile(path):
        level = "error" if required else "info"
        report.add(level, section, f"{image_list.name}: list {rel} not found"
                   + ("" if required else " (only needed for training)"),
                   f"{DOWNLOAD_HINT}; the lists go to {os.path.join(root, 'benchmark_imglist')}" if required else "")
        return
    try:
        lines = parse_imglist(path)
    except ValueError as err:
        report.add("error", section, f"{image_list.name}: {err}",
                   "restore the list from OpenOOD's benchmark_imglist download (lines are '<relative path> <label>')")
        return
    if not lines:
        report.add("error", section, f"{image_list.name}: list {rel} is empty", DOWNLOAD_HINT)
        return
    base = image_list.image_dir(root)
    paths = [os.path.join(base, r) for _, r, _ in lines]
    missing = [r for (_, r, _), p in zip(lines, paths) if not os.path.isfile(p)]
    found = len(paths) - len(missing)
    group = {"id": "ID", "near": "near-OOD", "far": "far-OOD"}[image_list.group]
    if missing:
        folder = os.path.relpath(base, root)
        report.add("error", section, f"{image_list.name} ({group}): {len(missing):,} of {len(paths):,} images "
                   f"listed in {rel} are missing under {folder}/: {few(missing)}",
                   f"put OpenOOD's {image_list.key} images under {os.path.join(base, '')} ({DOWNLOAD_HINT})")
    else:
        report.add("ok", section, f"{image_list.name} ({group}): {len(paths):,} images ({rel})")
    dup = [r for r, n in Counter(r for _, r, _ in lines).items() if n > 1]
    if dup:
        report.add("warn", section,
                   f"{image_list.name}: {len(dup)} images are listed more than once in {rel}: {few(dup)}",
                   "they are scored once per line, as OpenOOD does; remove the repeated lines to count them once")
    if image_list.group == "id" and num_classes is not None:
        bad = [f"line {n}: {lab!r}" for n, _, lab in lines if lab is None or not 0 <= lab < num_classes]
        if bad:
            report.add("error", section, f"{image_list.name}: {len(bad)} labels are not class indices in "
                       f"[0, {num_classes}): {few(bad)}",
                       "fix the list, or the class-name file images_largescale/imagenet_1k/classnames.txt")
    if verify_images and found:
        _verify(report, section, [p for p in paths if os.path.isfile(p)], strict, workers, label=f"{image_list.name}: ")


def check_openood(report: CheckReport, root: str, benchmark: OpenOODBenchmark = OPENOOD_V15_IMAGENET,
                  sets: Optional[Iterable[str]] = None, need_train: bool = False, verify_images: bool = False,
                  strict: bool = False, workers: Optional[int] = None) -> None:
    """Add the findings for an OpenOOD data root to ``report``.

    Args:
        report: the report (``locoop.data.check.CheckReport``).
        root: the data root.
        benchmark: the benchmark (OpenOOD v1.5 ImageNet-1K).
        sets: OOD sets to check (display names or OpenOOD keys; None = all of the benchmark).
        need_train: the training list is required (few-shot training on OpenOOD's lists).
        verify_images: decode every listed image.
        strict: unreadable images are errors.
        workers: threads for ``verify_images``.
    """
    sec_id, sec_ood = f"OpenOOD {benchmark.name}: ID", f"OpenOOD {benchmark.name}: OOD lists"
    if not os.path.isdir(os.path.join(root, "benchmark_imglist")):
        report.add("error", sec_id, f"{os.path.join(root, 'benchmark_imglist')} not found",
                   f"{DOWNLOAD_HINT}. " + OPENOOD_LAYOUT.replace("\n", " "))
        return
    num_classes = None
    try:
        classes = openood_classnames(root)
        num_classes = len(classes.names)
        where = "the shipped CLIP ImageNet names" if classes.shipped else "class names"
        report.add("ok", sec_id, f"{where} {classes.source} ({num_classes} classes, sha256 {classes.sha256})")
    except ValueError as err:
        report.add("error", sec_id, str(err), "write one '<wnid> <class name>' line per class")
    _check_list(report, sec_id, root, benchmark.id_test, num_classes, verify_images, strict, workers)
    _check_list(report, sec_id, root, benchmark.id_train, num_classes, verify_images, strict, workers,
                required=need_train)
    try:
        names = benchmark.resolve(sets)
    except ValueError as err:
        report.add("error", sec_ood, str(err), f"use names from: {', '.join(benchmark.ood_names)}")
        return
    groups = benchmark.groups(names)
    report.add("info", sec_ood, "groups: " + "; ".join(f"{g}-OOD {', '.join(v)}" for g, v in groups.items())
               + f"; metric convention {benchmark.fpr_convention} (OOD positive)")
    for name in names:
        _check_list(report, sec_ood, root, benchmark.list_for(name), None, verify_images, strict, workers)


def check_openood_data(root: str, benchmark: OpenOODBenchmark = OPENOOD_V15_IMAGENET,
                       sets: Optional[Iterable[str]] = None, need_train: bool = False, verify_images: bool = False,
                       strict: bool = False, workers: Optional[int] = None) -> CheckReport:
    """Check an OpenOOD data root and return the report (what ``check-data --dataset openood`` prints)."""
    root = os.path.abspath(os.path.expanduser(root))
    report = CheckReport(root)
    if not os.path.isdir(root):
        report.add("error", "Data root", f"{root} does not exist", "create it or pass the right --root")
        return report
    check_openood(report, root, benchmark, sets, need_train, verify_images, strict, workers)
    return report
