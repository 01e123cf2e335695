"""Dataset layout checker behind ``python -m locoop check-data``.

Unlike the dataset classes, which stop at the first kind of problem, the checker collects every
finding (what is present, what is missing, counts per class, the class-name file used and its
sha256, unreadable images, few-shot feasibility) and says for each problem exactly what to fix.
A finding at level ``error`` blocks training or evaluation; ``--strict`` also turns unreadable
images and classes with fewer than K images into errors.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from .classnames import (SHIPPED_IMAGENET_CLASSNAMES, compare_keys, load_shipped_imagenet_classnames,
                         read_classnames_file, resolve_voc_classnames, sha256_file)
from .datasets.imagenet import IMAGENET_LAYOUT, few, list_class_folders
from .datasets.ood import (IMAGENET_OOD_SETS, OOD_LAYOUT, VOC_OOD_SETS, canonical_ood_name, ood_candidate_dirs,
                           resolve_ood_dir)
from .datasets.valsplit import load_val_split
from .datasets.voc import VOC_LAYOUT, voc_paths, voc_test_dir
from .fewshot import fewshot_split_path, load_fewshot_split
from .image_io import count_non_images, list_images, read_image

LEVELS = ("ok", "info", "warn", "error")
_WNID = re.compile(r"^n\d{8}$")


@dataclass
class Finding:
    """One line of the report; ``fix`` says what to do (problems only)."""

    level: str
    section: str
    message: str
    fix: str = ""


@dataclass
class CheckReport:
    """All findings of a check, in order."""

    root: str
    findings: list = field(default_factory=list)

    def add(self, level: str, section: str, message: str, fix: str = "") -> None:
        assert level in LEVELS, level
        self.findings.append(Finding(level, section, message, fix))

    @property
    def errors(self) -> list:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list:
        return [f for f in self.findings if f.level == "warn"]

    @property
    def ok(self) -> bool:
        """True when nothing blocks training or evaluation."""
        return not self.errors

    def render(self) -> str:
        """The report as text (sections in order of first appearance)."""
        tags = {"ok": "[ok]   ", "info": "[info] ", "warn": "[WARN] ", "error": "[ERROR]"}
        lines = [f"check-data: {self.root}"]
        sections: list = []
        for f in self.findings:
            if f.section not in sections:
                sections.append(f.section)
        for sec in sections:
            lines += ["", sec]
            for f in (x for x in self.findings if x.section == sec):
                lines.append(f"  {tags[f.level]} {f.message}")
                if f.fix:
                    lines.append(f"          fix: {f.fix}")
        n_err, n_warn = len(self.errors), len(self.warnings)
        lines.append("")
        if n_err:
            lines.append(f"RESULT: {n_err} problem(s) block training/evaluation, {n_warn} warning(s). "
                         "Fix the [ERROR] lines above and run check-data again.")
        else:
            lines.append(f"RESULT: OK ({n_warn} warning(s)).")
        return "\n".join(lines)


def _count_classes(split_dir: str, keys: Sequence[str]) -> dict:
    return {k: len(list_images(os.path.join(split_dir, k))) if os.path.isdir(os.path.join(split_dir, k)) else 0
            for k in keys}


def _describe_counts(counts: dict) -> str:
    if not counts:
        return "no class folders"
    vals = list(counts.values())
    return (f"{len(counts)} class folders, {sum(vals):,} images (per class: min {min(vals)}, "
            f"max {max(vals)})")


def _verify(report: CheckReport, section: str, paths: Sequence[str], strict: bool, workers: Optional[int],
            label: str = "") -> None:
    """Decode every image; report the unreadable ones."""
    def try_read(p: str) -> Optional[str]:
        try:
            read_image(p)
            return None
        except Exception as err:  # any decoding failure makes the image unusable
            return f"{type(err).__name__}: {err}"

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(try_read, paths, chunksize=64))
    bad = [(p, r) for p, r in zip(paths, results) if r is not None]
    if not bad:
        report.add("ok", section, f"{label}all {len(paths):,} images decode")
        return
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:5]) + (f"; ... ({len(bad)} in all)" if len(bad) > 5 else "")
    report.add("error" if strict else "warn", section, f"{label}{len(bad)} of {len(paths):,} images cannot be read: {shown}",
               "replace or delete these files (they are skipped with a warning unless DATASET.STRICT is True)")


def _check_fewshot(report: CheckReport, section: str, dataset_dir: str, counts: dict, names: dict,
                   num_shots: int, seed: Optional[int], strict: bool) -> None:
    if not counts:
        return
    largest = max(counts.values())
    if num_shots > largest:
        report.add("error", section, f"NUM_SHOTS={num_shots} is larger than every class (largest: {largest} images)",
                   f"use --num-shots / DATASET.NUM_SHOTS <= {largest}, or add training images")
        return
    short = sorted((k, n) for k, n in counts.items() if n < num_shots)
    if short:
        shown = ", ".join(f"{k} '{names.get(k, k)}' ({n})" for k, n in short[:5])
        more = f", ... ({len(short)} in all)" if len(short) > 5 else ""
        report.add("error" if strict else "warn", section,
                   f"{len(short)} classes have fewer than {num_shots} training images (all of theirs are used): "
                   f"{shown}{more}", "add training images to these class folders, or accept fewer shots for them")
    else:
        report.add("ok", section, f"{num_shots}-shot sampling possible for every class")
    if seed is not None:
        path = fewshot_split_path(dataset_dir, num_shots, seed)
        if os.path.isfile(path):
            try:
                load_fewshot_split(path, dataset_dir)
                report.add("ok", section, f"few-shot split cache {path} is readable and its images exist")
            except ValueError as err:
                report.add("error", section, f"few-shot split cache {path} is unusable: {err}",
                           f"delete {path}; it is regenerated (deterministically for the seed) at the next run")
        else:
            report.add("info", section, f"no few-shot split cache yet ({path}); it is written at the first run")


def check_imagenet(report: CheckReport, root: str, num_shots: Optional[int] = None, seed: Optional[int] = None,
                   verify_images: bool = False, strict: bool = False, need_train: bool = True,
                   val_split_file: Optional[str] = None, workers: Optional[int] = None) -> None:
    """Add the findings for ``<root>/imagenet`` to ``report``."""
    sec = "ImageNet"
    ds = os.path.join(root, "imagenet")
    train_dir, val_dir = os.path.join(ds, "images", "train"), os.path.join(ds, "images", "val")
    if not os.path.isdir(ds):
        report.add("error", sec, f"{ds} not found",
                   "create it with images/train/<wnid>/ and images/val/<wnid>/ inside. " + IMAGENET_LAYOUT.replace("\n", " "))
        return
    keys: dict = {}
    counts: dict = {}
    for split, d, needed in (("val", val_dir, True), ("train", train_dir, need_train)):
        if not os.path.isdir(d):
            if needed:
                fix = (f"put the 50,000 validation images into {d}/<wnid>/ (sorted into class folders)" if split == "val"
                       else f"put the training images into {d}/<wnid>/, or pass --eval-only if you only evaluate")
                report.add("error", sec, f"{d} not found", fix)
            else:
                report.add("info", sec, f"{d} not found (not needed for evaluation only)")
            continue
        keys[split] = list_class_folders(d)
        counts[split] = _count_classes(d, keys[split])
        if not keys[split]:
            report.add("error", sec, f"{d} has no class folders", f"put the images into {d}/<wnid>/*.JPEG")
            continue
        report.add("ok", sec, f"images/{split}: {_describe_counts(counts[split])}")
        empty = [k for k, n in counts[split].items() if n == 0]
        if empty:
            report.add("error" if split == "val" or strict else "warn", sec,
                       f"images/{split}: {len(empty)} class folders have no images: {few(empty)}",
                       f"add images (any of .jpg/.jpeg/.png/... in any letter case) to these folders under {d}")
        junk = count_non_images(d, recursive=True)
        if junk:
            report.add("info", sec, f"images/{split}: {junk} files that are not images are ignored")
    if "val" in keys and "train" in keys:
        only_val, only_train = compare_keys(keys["val"], keys["train"])
        if only_val or only_train:
            report.add("error", sec, "the class folders of images/train and images/val differ ("
                       + "; ".join(x for x in (f"only in val: {few(only_val)}" if only_val else "",
                                               f"only in train: {few(only_train)}" if only_train else "") if x) + ")",
                       "both splits must hold the same <wnid> folders; add the missing ones or remove the extra ones")
    folder_keys = sorted(set(keys.get("val", [])) | set(keys.get("train", [])))
    names: dict = {}
    if folder_keys:
        user_file = os.path.join(ds, "classnames.txt")
        if os.path.isfile(user_file):
            try:
                mapping = read_classnames_file(user_file)
            except ValueError as err:
                report.add("error", sec, str(err), f"fix {user_file}: one '<wnid> <class name>' line per class")
            else:
                no_folder, no_name = compare_keys(list(mapping), folder_keys)
                if no_folder:
                    report.add("error", sec, f"{len(no_folder)} classes in {user_file} have no folder: {few(no_folder)}",
                               "create images/train/<wnid>/ and images/val/<wnid>/ for them, or delete their "
                               f"lines from {user_file}")
                if no_name:
                    report.add("error", sec, f"{len(no_name)} class folders are not in {user_file}: {few(no_name)}",
                               f"add a '<wnid> <class name>' line for each to {user_file}, or remove the folders")
                if not (no_folder or no_name):
                    names = mapping
                    report.add("ok", sec, f"class names from {user_file} (sha256 {sha256_file(user_file)})")
        elif len(folder_keys) == 1000:
            names = dict(zip(folder_keys, load_shipped_imagenet_classnames()))
            report.add("ok", sec, f"{user_file} not found: using the shipped CLIP ImageNet class names "
                       f"{SHIPPED_IMAGENET_CLASSNAMES} (sha256 {sha256_file(SHIPPED_IMAGENET_CLASSNAMES)})")
            odd = [k for k in folder_keys if not _WNID.match(k)]
            if odd:
                report.add("warn", sec, "the shipped names are mapped to the folders in sorted order, which is "
                           f"right only for ImageNet wnid folders (n########); these are not: {few(odd)}",
                           f"write {user_file} with '<folder> <class name>' lines to be sure of the mapping")
        else:
            report.add("error", sec, f"{user_file} not found, and there are {len(folder_keys)} class folders, not "
                       "1000, so the shipped CLIP ImageNet class names cannot be mapped to them",
                       f"create {user_file} with one '<wnid> <class name>' line per class folder (e.g. 'n01440764 tench')")
    if num_shots is not None and num_shots >= 1 and "train" in counts:
        _check_fewshot(report, sec, ds, counts["train"], names, num_shots, seed, strict)
    if val_split_file:
        if folder_keys:
            key_to_label = {k: i for i, k in enumerate(folder_keys)}
            try:
                items, path, sha = load_val_split(val_split_file, key_to_label, list(folder_keys),
                                                  [val_dir, train_dir], base_dirs=(ds, root))
                report.add("ok", sec, f"validation split {path}: {len(items)} images found (sha256 {sha})")
            except (ValueError, FileNotFoundError) as err:
                report.add("error", sec, f"validation split: {err}", "fix the JSON or restore the files it lists")
    if verify_images:
        paths = [p for split, d in (("train", train_dir), ("val", val_dir)) if split in keys
                 for k in keys[split] for p in list_images(os.path.join(d, k))]
        _verify(report, sec, paths, strict, workers)


def check_voc(report: CheckReport, root: str, num_shots: Optional[int] = None, seed: Optional[int] = None,
              verify_images: bool = False, strict: bool = False, val_split_file: Optional[str] = None,
              workers: Optional[int] = None) -> None:
    """Add the findings for Pascal-VOC (SeTAR's ``ID_VOC/`` or GL-MCM's ``ID_VOC_single/``)."""
    sec = "PascalVOC"
    paths = voc_paths(root)
    test_dir = voc_test_dir(paths)
    if test_dir is None:
        report.add("error", sec, f"{paths['test']} not found (nor {paths['single']})",
                   "put the test images into ID_VOC/test/<class>/. " + VOC_LAYOUT.replace("\n", " "))
        return
    keys = list_class_folders(test_dir)
    counts = _count_classes(test_dir, keys)
    report.add("ok", sec, f"test ({test_dir}): {_describe_counts(counts)}")
    names_dir = paths["dataset_dir"] if test_dir == paths["test"] else test_dir
    names: dict = {}
    try:
        classes = resolve_voc_classnames(names_dir, keys, folder_desc=test_dir)
        names = dict(zip(classes.keys, classes.names))
        report.add("ok", sec, f"class names {classes.source} (sha256 {classes.sha256})")
    except ValueError as err:
        report.add("error", sec, str(err), "rename/remove the folders, or write classnames.txt as described")
    split_counts = {}
    for split in ("val", "train"):
        d = paths[split]
        if not os.path.isdir(d):
            report.add("info", sec, f"{d} not found ({'val = ' + ('the split JSON' if val_split_file else 'the test set') if split == 'val' else 'no training images'})")
            continue
        k2 = list_class_folders(d)
        split_counts[split] = _count_classes(d, k2)
        report.add("ok", sec, f"{split}: {_describe_counts(split_counts[split])}")
        a, b = compare_keys(keys, k2)
        if a or b:
            report.add("error", sec, f"the class folders of {d} differ from the test folder (missing: {few(a) or '-'}; "
                       f"extra: {few(b) or '-'})", "use the same class folders in every split")
    if num_shots is not None and num_shots >= 1:
        if "train" in split_counts:
            _check_fewshot(report, sec, paths["dataset_dir"], split_counts["train"], names, num_shots, seed, strict)
        else:
            report.add("error", sec, f"--num-shots {num_shots} given but {paths['train']} does not exist",
                       f"put few-shot training images into {paths['train']}/<class>/")
    if val_split_file:
        search = [d for d in (paths["val"], test_dir, paths["single"]) if os.path.isdir(d)]
        try:
            items, path, sha = load_val_split(val_split_file, {k: i for i, k in enumerate(keys)}, keys, search,
                                              base_dirs=(paths["dataset_dir"], root))
            report.add("ok", sec, f"validation split {path}: {len(items)} images found (sha256 {sha})")
        except (ValueError, FileNotFoundError) as err:
            report.add("error", sec, f"validation split: {err}", "fix the JSON or restore the files it lists")
    if verify_images:
        dirs = [test_dir] + [paths[s] for s in split_counts]
        _verify(report, sec, [p for d in dirs for k in list_class_folders(d) for p in list_images(os.path.join(d, k))],
                strict, workers)


def check_ood(report: CheckReport, root: str, names: Iterable[str], verify_images: bool = False,
              strict: bool = False, workers: Optional[int] = None) -> None:
    """Add the findings for OOD sets."""
    sec = "OOD sets"
    for name in names:
        try:
            canon = canonical_ood_name(name)
        except ValueError as err:
            report.add("error", sec, str(err), f"use one of: {', '.join(OOD_LAYOUT)}")
            continue
        folder = resolve_ood_dir(root, canon)
        if folder is None:
            ours, setar = ood_candidate_dirs(root, canon)
            report.add("error", sec, f"{canon}: folder not found", f"put the {canon} images under {ours} "
                       f"(images may be in sub-folders), or use SeTAR's {setar}")
            continue
        paths = list_images(folder, recursive=True)
        if not paths:
            report.add("error", sec, f"{canon}: {folder} contains no images",
                       f"put the {canon} images under {folder} (searched recursively)")
            continue
        report.add("ok", sec, f"{canon}: {folder} ({len(paths):,} images)")
        if verify_images:
            _verify(report, sec, paths, strict, workers, label=f"{canon}: ")


#: Shipped configs per ID layout: (what they run, glob under configs/), as the README lists them.
_CONFIGS = {
    "imagenet": [("LoCoOp / CoOp training", "trainers/LoCoOp/*.yaml"),
                 ("zero-shot MCM / GL-MCM (their papers' protocol)", "zeroshot/*.yaml"),
                 ("SeTAR search, CLIP ViT-B/16", "setar/imagenet/*.yaml"),
                 ("SeTAR search, CLIP ViT-L/14", "setar/imagenet/clip_large/*.yaml"),
                 ("SeTAR search, Swin-V2-B", "setar/imagenet/swin_base/*.yaml"),
                 ("SeTAR+FT / LoRA, CLIP ViT-B/16", "setar/finetune/imagenet/*.yaml"),
                 ("SeTAR+FT / LoRA, CLIP ViT-L/14", "setar/finetune/imagenet/clip_large/*.yaml"),
                 ("SeTAR+FT / LoRA, Swin-V2-B", "setar/finetune/imagenet/swin_base/*.yaml"),
                 ("SeTAR ablations", "setar/ablations/imagenet/*/*.yaml")],
    "voc": [("SeTAR search, CLIP ViT-B/16", "setar/voc/*.yaml"),
            ("SeTAR+FT / LoRA, CLIP ViT-B/16", "setar/finetune/voc/*.yaml"),
            ("SeTAR ablations", "setar/ablations/voc/*/*.yaml")],
    "openood": [("OpenOOD v1.5 ImageNet-1K benchmark (with any method config)", "benchmarks/*.yaml")],
}


def shipped_configs(dataset: str, configs_dir: Optional[str] = None) -> list:
    """``(what, [config paths])`` of the shipped configs that run on the ``dataset`` layout.

    Args:
        dataset: ``imagenet``, ``voc`` or ``openood``.
        configs_dir: the ``configs/`` folder (default: the source checkout's; empty when absent).
    """
    import glob

    if configs_dir is None:
        configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                   "configs")
    out = []
    for what, pattern in _CONFIGS.get(dataset, []):
        files = sorted(glob.glob(os.path.join(configs_dir, pattern)))
        if files:
            out.append((what, [os.path.relpath(f, os.path.dirname(configs_dir)) for f in files]))
    return out


def _report_configs(report: CheckReport, dataset: str) -> None:
    for what, files in shipped_configs(dataset):
        shown = files if len(files) <= 6 else [os.path.dirname(files[0]) + os.sep + f"... ({len(files)} files)"]
        report.add("info", "Shipped configs for this layout", f"{what}: {', '.join(shown)}")


def check_data(root: str, dataset: Optional[str] = "imagenet", ood: Optional[Sequence[str]] = None,
               num_shots: Optional[int] = None, seed: Optional[int] = None, verify_images: bool = False,
               strict: bool = False, need_train: bool = True, val_split_file: Optional[str] = None,
               workers: Optional[int] = None) -> CheckReport:
    """Check a data root and return the report.

    Args:
        root: the data root (``DATASET.ROOT``).
        dataset: ``imagenet``, ``voc`` (also ``ImageNet``/``PascalVOC``), ``openood`` (OpenOOD v1.5's
            ImageNet-1K image lists, ``benchmark_imglist/imagenet/``) or ``None``/``none`` for OOD only.
        ood: OOD set names to check; an empty list means the benchmark's sets for ``dataset``;
            ``None`` skips them (``openood``: its image lists are always checked, all of them unless
            ``ood`` names some).
        num_shots: check K-shot feasibility (and the split cache when ``seed`` is given).
        seed: few-shot seed.
        verify_images: decode every image.
        strict: unreadable images and classes with fewer than K images are errors.
        need_train: the training folder is required (False: evaluation only).
        val_split_file: a validation-split JSON to check.
        workers: threads for ``verify_images``.
    """
    root = os.path.abspath(os.path.expanduser(root))
    report = CheckReport(root)
    if not os.path.isdir(root):
        report.add("error", "Data root", f"{root} does not exist", "create it or pass the right --root")
        return report
    key = (dataset or "none").lower()
    if key in ("imagenet",):
        check_imagenet(report, root, num_shots, seed, verify_images, strict, need_train, val_split_file, workers)
        default_ood = IMAGENET_OOD_SETS
    elif key in ("voc", "pascalvoc", "pascal-voc"):
        check_voc(report, root, num_shots, seed, verify_images, strict, val_split_file, workers)
        default_ood = VOC_OOD_SETS
    elif key in ("openood", "openoodimagenet", "openood_v1.5_imagenet"):
        from .check_openood import check_openood

        # The ID and OOD lists are one benchmark; the training list only matters for few-shot training.
        check_openood(report, root, sets=list(ood) if ood else None, need_train=need_train and num_shots is not None,
                      verify_images=verify_images, strict=strict, workers=workers)
        _report_configs(report, "openood")
        return report
    elif key == "none":
        default_ood = IMAGENET_OOD_SETS
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose imagenet, voc, openood or none")
    if ood is None:
        report.add("info", "OOD sets", "not checked (pass --ood, or --ood NAME ... for specific sets)")
    else:
        check_ood(report, root, list(ood) or list(default_ood), verify_images, strict, workers)
    if key != "none":
        _report_configs(report, "voc" if key != "imagenet" else "imagenet")
    return report
