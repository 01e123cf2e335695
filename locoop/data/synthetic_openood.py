"""A small generated data root in OpenOOD v1.5's ImageNet layout (image lists + real JPEGs).

For tests and the demo: the lists are written exactly as OpenOOD lays them out
(``benchmark_imglist/imagenet/*.txt`` with ``<relative path> <label>`` lines, ID images under
``images_largescale/imagenet_1k/``, Textures under ``images_classic/texture/``), the images are the
same class-coloured stripes / OOD checkerboards as :mod:`locoop.data.synthetic`. The sub-paths of
the OOD images are only plausible, not OpenOOD's; readers must (and do) take them from the lists.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

from .datasets.openood import OPENOOD_V15_IMAGENET, OpenOODBenchmark
from .synthetic import _save, class_image, ood_image, synthetic_classname, synthetic_wnid

__all__ = ["make_openood_imagenet"]

# Where each OOD set's images go below its list's image folder (for generated data only).
_SUBPATH = {"ssb_hard": "ssb_hard/{wnid}/{wnid}_{j}.JPEG", "ninco": "ninco/ninco_oodclasses/{cls}/{cls}_{j}.jpeg",
            "inaturalist": "inaturalist/images/{j:08d}.jpg", "textures": "texture/{cls}/{cls}_{j:04d}.jpg",
            "openimage_o": "openimage_o/images/{j:016x}.jpg"}


def make_openood_imagenet(root: str, num_classes: int = 3, test_per_class: int = 2, val_per_class: int = 1,
                          train_per_class: int = 0, ood_per_set: int = 3, sets: Optional[Sequence[str]] = None,
                          image_size: tuple = (32, 32), seed: int = 0, write_classnames: bool = True,
                          ood_label: int = -1, benchmark: OpenOODBenchmark = OPENOOD_V15_IMAGENET) -> Dict[str, object]:
    """Write an OpenOOD-layout data root.

    Args:
        root: the data root (``DATASET.ROOT``).
        num_classes: ID classes (wnids ``n0144xxxx``, labels in sorted-wnid order).
        test_per_class / val_per_class / train_per_class: ID images per class in ``test_imagenet.txt``
            (flat ``imagenet_1k/val/ILSVRC2012_val_*.JPEG``), ``val_imagenet.txt`` and
            ``train_imagenet.txt`` (``imagenet_1k/train/<wnid>/...``); 0 skips that list.
        ood_per_set: images per OOD list.
        sets: OOD sets to write (display names or OpenOOD keys; None = all five).
        image_size: (height, width).
        seed: random seed.
        write_classnames: write ``images_largescale/imagenet_1k/classnames.txt``.
        ood_label: the label column written in OOD lists (OpenOOD ignores it).
        benchmark: the benchmark whose lists are written.

    Returns:
        ``{"root", "lists": {name: list path}, "wnids", "classnames", "counts": {name: images}}``.
    """
    root = os.path.abspath(root)
    rng = np.random.default_rng(seed)
    wnids = [synthetic_wnid(i) for i in range(num_classes)]
    names = [synthetic_classname(i, num_classes) for i in range(num_classes)]
    lists: Dict[str, str] = {}
    counts: Dict[str, int] = {}

    def write_list(image_list, lines):
        path = image_list.list_path(root)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{rel} {label}\n" for rel, label in lines)
        lists[image_list.name], counts[image_list.name] = path, len(lines)

    serial = 0
    for image_list, per_class in ((benchmark.id_test, test_per_class), (benchmark.id_val, val_per_class),
                                  (benchmark.id_train, train_per_class)):
        if per_class <= 0:
            continue
        lines = []
        for label, wnid in enumerate(wnids):
            for j in range(per_class):
                if image_list is benchmark.id_train:
                    rel = f"imagenet_1k/train/{wnid}/{wnid}_{j}.JPEG"
                else:
                    serial += 1
                    rel = f"imagenet_1k/val/ILSVRC2012_val_{serial:08d}.JPEG"
                _save(class_image(label, num_classes, image_size, rng), os.path.join(image_list.image_dir(root), rel))
                lines.append((rel, label))
        write_list(image_list, lines)
    for k, name in enumerate(benchmark.resolve(sets)):
        image_list = benchmark.list_for(name)
        lines = []
        for j in range(ood_per_set):
            cls = ("banded", "striped", "waffled")[j % 3]
            rel = _SUBPATH[image_list.key].format(wnid=f"n0950{j:04d}", cls=cls, j=j)
            _save(ood_image(k, image_size, rng), os.path.join(image_list.image_dir(root), rel))
            lines.append((rel, ood_label))
        write_list(image_list, lines)
    if write_classnames:
        d = os.path.join(root, "images_largescale", "imagenet_1k")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "classnames.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{w} {n}\n" for w, n in zip(wnids, names))
    return {"root": root, "lists": lists, "wnids": wnids, "classnames": names, "counts": counts}
