"""OpenOOD v1.5 image lists and its ImageNet-1K benchmark (registered as ``"OpenOODImageNet"``).

OpenOOD (Jingkang50/OpenOOD, ``openood/evaluation_api/datasets.py`` and
``openood/datasets/imglist_dataset.py``; read, not copied) describes every split as a text file of
``<relative path> <label>`` lines under ``benchmark_imglist/<benchmark>/``; a path is joined to a
per-list image folder under the data root (``images_largescale/`` for ImageNet and most OOD sets,
``images_classic/`` for Textures). The line is split at its first space; a path must not start with
``/``. The ID label is the class index (sorted-wnid order, as ImageNet); for OOD lists the label
column is ignored -- OpenOOD's evaluator sets every OOD label to -1, and so do we.

Layout under ``DATASET.ROOT`` (what OpenOOD's ``scripts/download/download.py`` writes)::

    benchmark_imglist/imagenet/test_imagenet.txt      ID test (45,000 images of the ImageNet val set)
    benchmark_imglist/imagenet/{train,val}_imagenet.txt
    benchmark_imglist/imagenet/test_{ssb_hard,ninco,inaturalist,textures,openimage_o}.txt
    images_largescale/imagenet_1k/...                 ImageNet-1K images the lists name
    images_largescale/{ssb_hard,ninco,inaturalist,openimage_o}/...
    images_classic/texture/...                        Textures (DTD)
    images_largescale/imagenet_1k/classnames.txt      optional '<wnid> <class name>' lines (else the
                                                      shipped CLIP ImageNet names)

Benchmark (:data:`OPENOOD_V15_IMAGENET`): near-OOD SSB-hard and NINCO, far-OOD iNaturalist,
Textures and OpenImage-O, reported per set and averaged per group, with OpenOOD's metric
convention (OOD positive, ``fpr95_openood``, AUROC, AUPR-In / AUPR-Out).
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ...engine.registry import DATASET_REGISTRY
from ..classnames import (SHIPPED_IMAGENET_CLASSNAMES, ClassNames, load_shipped_imagenet_classnames,
                          read_classnames_file, sha256_file)
from ..datum import DatasetBase, Datum
from ..fewshot import load_or_create_fewshot, subsample_dataset

__all__ = ["ImageList", "OpenOODBenchmark", "OPENOOD_V15_IMAGENET", "OPENOOD_BENCHMARKS", "OPENOOD_LAYOUT",
           "get_openood_benchmark", "parse_imglist", "read_imglist", "openood_classnames", "build_openood_ood_sets",
           "OpenOODImageNet", "DOWNLOAD_HINT"]

DOWNLOAD_HINT = ("download them with OpenOOD's own script (github.com/Jingkang50/OpenOOD: python "
                 "scripts/download/download.py --contents datasets --datasets ood_v1.5 --save_dir DATA_ROOT "
                 "--dataset_mode benchmark), or copy an existing OpenOOD data folder")

OPENOOD_LAYOUT = """Expected OpenOOD v1.5 layout under DATASET.ROOT:
  benchmark_imglist/imagenet/test_imagenet.txt and test_{ssb_hard,ninco,inaturalist,textures,openimage_o}.txt
                            '<relative path> <label>' per line
  images_largescale/        imagenet_1k/, ssb_hard/, ninco/, inaturalist/, openimage_o/ (paths of the lists)
  images_classic/           texture/ (the Textures list)
See data/README.md; `python -m locoop check-data --root DATA --dataset openood` reports what to fix."""


@dataclass(frozen=True)
class ImageList:
    """One OpenOOD image list.

    Attributes:
        name: our display name (``SSB-hard``); results use it.
        key: OpenOOD's name (``ssb_hard``).
        imglist: the list file, relative to the data root.
        data_dir: the folder its paths are relative to, relative to the data root.
        group: ``id``, ``near`` or ``far``.
    """

    name: str
    key: str
    imglist: str
    data_dir: str
    group: str

    def list_path(self, root: str) -> str:
        return os.path.join(root, *self.imglist.split("/"))

    def image_dir(self, root: str) -> str:
        return os.path.join(root, *self.data_dir.strip("/").split("/"))


@dataclass(frozen=True)
class OpenOODBenchmark:
    """An OpenOOD benchmark: its ID lists, OOD lists with their groups, and its conventions."""

    name: str
    num_classes: int
    id_test: ImageList
    id_train: ImageList
    id_val: ImageList
    ood: Tuple[ImageList, ...]
    fpr_convention: str = "openood"

    @property
    def ood_names(self) -> List[str]:
        return [x.name for x in self.ood]

    def groups(self, names: Optional[Iterable[str]] = None) -> Dict[str, List[str]]:
        """``{"near": [...], "far": [...]}`` in benchmark order, restricted to ``names`` when given."""
        keep = set(self.resolve(names)) if names is not None else set(self.ood_names)
        out: Dict[str, List[str]] = {}
        for x in self.ood:
            if x.name in keep:
                out.setdefault(x.group, []).append(x.name)
        return out

    def resolve(self, names: Optional[Iterable[str]]) -> List[str]:
        """Display names of ``names`` (display names or OpenOOD keys, any case; None = all), in benchmark order.

        Raises:
            ValueError: an unknown name (the valid ones listed).
        """
        if names is None:
            return self.ood_names
        lookup = {}
        for x in self.ood:
            for alias in (x.name, x.key, x.key.replace("_", ""), x.name.replace("-", "")):
                lookup[alias.lower()] = x.name
        wanted, unknown = set(), []
        for n in names:
            hit = lookup.get(str(n).strip().lower())
            (unknown.append(n) if hit is None else wanted.add(hit))
        if unknown:
            raise ValueError(f"unknown OOD set(s) {unknown} for the {self.name} benchmark; choose from "
                             f"{', '.join(self.ood_names)} (or OpenOOD's names {', '.join(x.key for x in self.ood)})")
        return [n for n in self.ood_names if n in wanted]

    def list_for(self, name: str) -> ImageList:
        display = self.resolve([name])[0]
        return next(x for x in self.ood if x.name == display)


def _lst(name: str, key: str, group: str, data_dir: str = "images_largescale/",
         fname: Optional[str] = None) -> ImageList:
    return ImageList(name, key, f"benchmark_imglist/imagenet/{fname or 'test_' + key + '.txt'}", data_dir, group)


OPENOOD_V15_IMAGENET = OpenOODBenchmark(
    name="openood_v1.5_imagenet",
    num_classes=1000,
    id_test=_lst("ImageNet", "imagenet", "id"),
    id_train=_lst("ImageNet-train", "imagenet", "id", fname="train_imagenet.txt"),
    id_val=_lst("ImageNet-val", "imagenet", "id", fname="val_imagenet.txt"),
    ood=(_lst("SSB-hard", "ssb_hard", "near"), _lst("NINCO", "ninco", "near"),
         _lst("iNaturalist", "inaturalist", "far"), _lst("Textures", "textures", "far", data_dir="images_classic/"),
         _lst("OpenImage-O", "openimage_o", "far")),
)
OPENOOD_BENCHMARKS = {OPENOOD_V15_IMAGENET.name: OPENOOD_V15_IMAGENET}


def get_openood_benchmark(name: str) -> OpenOODBenchmark:
    """The benchmark called ``name`` (``openood_v1.5_imagenet``).

    Raises:
        ValueError: unknown name (valid ones listed).
    """
    key = str(name).strip().lower()
    if key not in OPENOOD_BENCHMARKS:
        raise ValueError(f"unknown OpenOOD benchmark {name!r}; choose one of {', '.join(OPENOOD_BENCHMARKS)}")
    return OPENOOD_BENCHMARKS[key]


def parse_imglist(path: str) -> List[Tuple[int, str, Optional[int]]]:
    """The lines of an OpenOOD image list: ``(line number, relative path, label or None)``.

    Like OpenOOD's ``ImglistDataset`` the line is split at its first space; the rest is an integer
    label or a Python literal dict (OpenOOD's extra-data form, label None here). Blank lines are skipped.

    Raises:
        FileNotFoundError: no such list. ValueError: a line without a label, with an absolute path,
            or an unreadable label (file and line named).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"OpenOOD image list {path} not found; {DOWNLOAD_HINT}.\n{OPENOOD_LAYOUT}")
    out = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split(" ", 1)
            if len(parts) < 2 or not parts[0]:
                raise ValueError(f"{path}, line {lineno}: expected '<relative path> <label>', got {line!r}")
            rel, extra = parts[0], parts[1].strip()
            if rel.startswith("/"):
                raise ValueError(f"{path}, line {lineno}: the path {rel!r} is absolute; OpenOOD lists hold paths "
                                 "relative to their image folder")
            try:
                value = ast.literal_eval(extra)
            except (ValueError, SyntaxError):
                raise ValueError(f"{path}, line {lineno}: the label {extra!r} is neither an integer nor a "
                                 "dict") from None
            if isinstance(value, bool) or not isinstance(value, (int, dict)):
                raise ValueError(f"{path}, line {lineno}: the label {extra!r} is neither an integer nor a dict")
            out.append((lineno, rel, value if isinstance(value, int) else None))
    return out


def openood_classnames(root: str) -> ClassNames:
    """Class names by label: ``images_largescale/imagenet_1k/classnames.txt`` (``<wnid> <name>`` lines,
    labels = sorted wnids, as OpenOOD's label column) when present, else the shipped 1000 CLIP
    ImageNet names (sorted-wnid order)."""
    user = os.path.join(root, "images_largescale", "imagenet_1k", "classnames.txt")
    if os.path.isfile(user):
        mapping = read_classnames_file(user)
        keys = sorted(mapping)
        return ClassNames(keys=keys, names=[mapping[k] for k in keys], source=user, sha256=sha256_file(user))
    names = load_shipped_imagenet_classnames()
    return ClassNames(keys=[str(i) for i in range(len(names))], names=names, source=SHIPPED_IMAGENET_CLASSNAMES,
                      sha256=sha256_file(SHIPPED_IMAGENET_CLASSNAMES), shipped=True)


def read_imglist(root: str, image_list: ImageList, classnames: Optional[Sequence[str]] = None) -> List[Datum]:
    """Items of an image list: absolute paths; the class label for ID lists, -1 for OOD lists.

    Args:
        root: the data root.
        image_list: the list.
        classnames: class names by label (ID lists; their labels must index it).

    Raises:
        FileNotFoundError: the list file. ValueError: malformed lines, ID labels outside the classes,
            or an empty list.
    """
    path = image_list.list_path(root)
    base = image_list.image_dir(root)
    lines = parse_imglist(path)
    if not lines:
        raise ValueError(f"OpenOOD image list {path} is empty; {DOWNLOAD_HINT}")
    items = []
    if image_list.group == "id":
        if classnames is None:
            raise ValueError("reading an ID list needs the class names")
        n = len(classnames)
        for lineno, rel, label in lines:
            if label is None or not 0 <= label < n:
                raise ValueError(f"{path}, line {lineno}: ID label {label!r} is not a class index in [0, {n}) "
                                 f"({n} class names); fix the list, or the class-name file "
                                 "images_largescale/imagenet_1k/classnames.txt")
            items.append(Datum(os.path.join(base, rel), label, classnames[label]))
    else:
        items = [Datum(os.path.join(base, rel), -1, image_list.name) for _, rel, _ in lines]
    return items


def build_openood_ood_sets(root: str, benchmark: OpenOODBenchmark = OPENOOD_V15_IMAGENET,
                           names: Optional[Iterable[str]] = None) -> Dict[str, List[Datum]]:
    """Items of the benchmark's OOD sets (label -1), keyed by display name in benchmark order.

    Every list file is checked before any is read, so a missing one fails fast with all missing named.

    Raises:
        ValueError: unknown set names, malformed lists. FileNotFoundError: missing list files.
    """
    root = os.path.abspath(os.path.expanduser(root))
    chosen = [benchmark.list_for(n) for n in benchmark.resolve(names)]
    missing = [x.list_path(root) for x in chosen if not os.path.isfile(x.list_path(root))]
    if missing:
        raise FileNotFoundError("OpenOOD image lists not found: " + ", ".join(missing) + f"; {DOWNLOAD_HINT}.\n"
                                + OPENOOD_LAYOUT)
    return {x.name: read_imglist(root, x) for x in chosen}


@DATASET_REGISTRY.register()
class OpenOODImageNet(DatasetBase):
    """ImageNet-1K as OpenOOD v1.5 lists it: ``test`` = ``test_imagenet.txt``; ``val`` =
    ``val_imagenet.txt`` when present (else the test set); ``train_x`` = K shots per class of
    ``train_imagenet.txt`` (CoOp's sampling and split cache under ``images_largescale/imagenet_1k``).

    Args:
        cfg: config with ``DATASET.ROOT``, ``DATASET.NUM_SHOTS``, ``DATASET.SUBSAMPLE_CLASSES``, ``SEED``.
        need_train: read the training list (False for evaluation only).

    Raises:
        FileNotFoundError: a missing list (with the download command). ValueError: malformed lists.
    """

    benchmark = OPENOOD_V15_IMAGENET

    def __init__(self, cfg, need_train: bool = True) -> None:
        if not cfg.DATASET.ROOT:
            raise ValueError("DATASET.ROOT is empty; set it to OpenOOD's data folder (the one holding "
                             "benchmark_imglist/ and images_largescale/).\n" + OPENOOD_LAYOUT)
        root = os.path.abspath(os.path.expanduser(str(cfg.DATASET.ROOT)))
        bench = self.benchmark
        needed = [bench.id_test] + ([bench.id_train] if need_train else [])
        missing = [x.list_path(root) for x in needed if not os.path.isfile(x.list_path(root))]
        if missing:
            raise FileNotFoundError("OpenOOD image lists not found: " + ", ".join(missing) + f"; {DOWNLOAD_HINT}.\n"
                                    + OPENOOD_LAYOUT)
        self.dataset_dir = os.path.join(root, "images_largescale", "imagenet_1k")
        classes = openood_classnames(root)
        test = read_imglist(root, bench.id_test, classes.names)
        val = read_imglist(root, bench.id_val, classes.names) if os.path.isfile(bench.id_val.list_path(root)) else test
        train_x: list = []
        split_file = split_hash = None
        if need_train:
            num_shots = int(cfg.DATASET.NUM_SHOTS)
            source = lambda: read_imglist(root, bench.id_train, classes.names)  # noqa: E731
            if num_shots >= 1:
                train_x, split_file, split_hash, created = load_or_create_fewshot(self.dataset_dir, num_shots,
                                                                                  int(cfg.SEED), source)
                print(f"{'Saved' if created else 'Loaded'} few-shot split {split_file}")
            else:
                train_x = source()
        subsample = str(cfg.DATASET.SUBSAMPLE_CLASSES)
        train_x, val, test, kept = subsample_dataset(train_x, val, test, len(classes.names), subsample)
        super().__init__(train_x=train_x, val=val, test=test, classnames=[classes.names[i] for i in kept])
        self.classnames_file, self.classnames_hash = classes.source, classes.sha256
        self.split_file, self.split_hash = split_file, split_hash
        self.imglist_file = bench.id_test.list_path(root)
        self.imglist_hash = sha256_file(self.imglist_file)
