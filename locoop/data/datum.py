"""Data items and the dataset container, with Dassl's names (``Datum``, ``DatasetBase``).

A dataset is four plain lists of :class:`Datum` (``train_x``, ``train_u``, ``val``, ``test``)
plus the class list and the provenance needed to reproduce a result: which class-name file was
used (and its sha256) and which few-shot split file (and its sha256).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence


class Datum:
    """One image: its path, integer label, class name and domain index.

    Args:
        impath: path of the image file.
        label: class index (-1 for OOD images, which have no ID class).
        classname: human-readable class name used in prompts.
        domain: domain index (kept for Dassl compatibility; 0 here).
    """

    __slots__ = ("_impath", "_label", "_classname", "_domain")

    def __init__(self, impath: str = "", label: int = 0, classname: str = "", domain: int = 0) -> None:
        if not isinstance(impath, str):
            raise TypeError(f"Datum impath must be a str, got {type(impath).__name__}")
        self._impath = impath
        self._label = int(label)
        self._classname = str(classname)
        self._domain = int(domain)

    @property
    def impath(self) -> str:
        return self._impath

    @property
    def label(self) -> int:
        return self._label

    @property
    def classname(self) -> str:
        return self._classname

    @property
    def domain(self) -> int:
        return self._domain

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Datum):
            return NotImplemented
        return (self._impath, self._label, self._classname, self._domain) == (
            other._impath, other._label, other._classname, other._domain)

    def __hash__(self) -> int:
        return hash((self._impath, self._label, self._classname, self._domain))

    def __repr__(self) -> str:
        return f"Datum(impath={self._impath!r}, label={self._label}, classname={self._classname!r}, domain={self._domain})"


class DatasetBase:
    """Container of the splits of one dataset (Dassl's ``DatasetBase``).

    Args:
        train_x: labelled training items (the few-shot set for few-shot datasets).
        train_u: unlabelled training items (unused by our methods; kept for Dassl compatibility).
        val: validation items.
        test: test items.
        classnames: the full class list, index = label. When omitted it is derived from the
            labels present in the first non-empty split, as Dassl does.

    Attributes set by subclasses for provenance (``None`` when not applicable):
        classnames_file: the class-name file used (a path, or a ``builtin:`` label).
        classnames_hash: sha256 of that file's content.
        split_file: the few-shot split file used.
        split_hash: sha256 of that file's content.
        val_split_file / val_split_hash: the validation-split JSON used, if any.
    """

    dataset_dir: str = ""
    domains: Sequence[str] = ()

    def __init__(
        self,
        train_x: Optional[list] = None,
        train_u: Optional[list] = None,
        val: Optional[list] = None,
        test: Optional[list] = None,
        *,
        classnames: Optional[Sequence[str]] = None,
    ) -> None:
        self._train_x = list(train_x or [])
        self._train_u = list(train_u or [])
        self._val = list(val or [])
        self._test = list(test or [])
        if classnames is not None:
            self._classnames = [str(c) for c in classnames]
            self._lab2cname = {i: c for i, c in enumerate(self._classnames)}
        else:
            source = next((s for s in (self._train_x, self._val, self._test) if s), [])
            self._lab2cname, self._classnames = self.get_lab2cname(source)
        self._num_classes = len(self._classnames)
        # Provenance, filled in by concrete datasets.
        self.classnames_file: Optional[str] = None
        self.classnames_hash: Optional[str] = None
        self.split_file: Optional[str] = None
        self.split_hash: Optional[str] = None
        self.val_split_file: Optional[str] = None
        self.val_split_hash: Optional[str] = None

    @property
    def train_x(self) -> list:
        return self._train_x

    @property
    def train_u(self) -> list:
        return self._train_u

    @property
    def val(self) -> list:
        return self._val

    @property
    def test(self) -> list:
        return self._test

    @property
    def lab2cname(self) -> dict:
        return self._lab2cname

    @property
    def classnames(self) -> list:
        return self._classnames

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @staticmethod
    def get_num_classes(data_source: Iterable[Datum]) -> int:
        """Number of classes as Dassl counts them: ``max(label) + 1``."""
        labels = [d.label for d in data_source]
        return max(labels) + 1 if labels else 0

    @staticmethod
    def get_lab2cname(data_source: Iterable[Datum]) -> tuple[dict, list]:
        """Map label -> class name from the items, and the class names in label order."""
        mapping = {}
        for d in data_source:
            mapping.setdefault(d.label, d.classname)
        labels = sorted(mapping)
        return {lab: mapping[lab] for lab in labels}, [mapping[lab] for lab in labels]

    def provenance(self) -> dict:
        """The reproducibility record of this dataset (for result files)."""
        return {
            "classnames_file": self.classnames_file,
            "classnames_sha256": self.classnames_hash,
            "fewshot_split_file": self.split_file,
            "fewshot_split_sha256": self.split_hash,
            "val_split_file": self.val_split_file,
            "val_split_sha256": self.val_split_hash,
        }
