"""Evaluators (Dassl's ``Classification``): accuracy, error, macro F1, optional per-class results."""
from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from typing import Any, Optional

import numpy as np
import torch

from .fileio import atomic_torch_save
from .registry import Registry

__all__ = ["EVALUATOR_REGISTRY", "EvaluatorBase", "Classification", "build_evaluator"]

EVALUATOR_REGISTRY = Registry("EVALUATOR")


class EvaluatorBase:
    """Accumulates model outputs with :meth:`process`, summarises with :meth:`evaluate`."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, mo: torch.Tensor, gt: torch.Tensor) -> None:
        raise NotImplementedError

    def evaluate(self) -> "OrderedDict[str, float]":
        raise NotImplementedError


@EVALUATOR_REGISTRY.register()
class Classification(EvaluatorBase):
    """Top-1 accuracy (%), error (%) and macro F1 (%) of class logits."""

    def __init__(self, cfg: Any, lab2cname: Optional[dict] = None, **kwargs: Any):
        super().__init__(cfg)
        self._lab2cname = lab2cname
        self._per_class = bool(getattr(cfg.TEST, "PER_CLASS_RESULT", False))
        self._cmat = bool(getattr(cfg.TEST, "COMPUTE_CMAT", False))
        self.reset()

    def reset(self) -> None:
        self._correct = 0
        self._total = 0
        self._y_true: list[int] = []
        self._y_pred: list[int] = []
        self._per_class_res: dict[int, list[bool]] = defaultdict(list)

    def process(self, mo: torch.Tensor, gt: torch.Tensor) -> None:
        """Add a batch: ``mo`` logits [B, C], ``gt`` labels [B]."""
        if mo.dim() != 2 or mo.shape[0] != gt.shape[0]:
            raise ValueError(f"Classification evaluator expects logits [B, C] and labels [B]; "
                             f"got {tuple(mo.shape)} and {tuple(gt.shape)}.")
        pred = mo.argmax(dim=1)
        matches = pred.eq(gt).cpu()
        self._correct += int(matches.sum().item())
        self._total += gt.shape[0]
        self._y_true.extend(gt.cpu().tolist())
        self._y_pred.extend(pred.cpu().tolist())
        if self._per_class:
            for label, ok in zip(gt.cpu().tolist(), matches.tolist()):
                self._per_class_res[label].append(bool(ok))

    def evaluate(self) -> "OrderedDict[str, float]":
        """Print and return ``accuracy``, ``error`` and ``macro_f1`` (percentages)."""
        if self._total == 0:
            raise ValueError("Nothing to evaluate: the evaluation loader yielded no samples.")
        from sklearn.metrics import confusion_matrix, f1_score

        acc = 100.0 * self._correct / self._total
        labels = np.unique(self._y_true)
        macro_f1 = 100.0 * f1_score(self._y_true, self._y_pred, average="macro", labels=labels)
        results: "OrderedDict[str, float]" = OrderedDict(accuracy=acc, error=100.0 - acc, macro_f1=float(macro_f1))
        print(f"=> result\n* total: {self._total:,}\n* correct: {self._correct:,}\n"
              f"* accuracy: {acc:.1f}%\n* error: {100.0 - acc:.1f}%\n* macro_f1: {macro_f1:.1f}%")
        if self._per_class:
            print("=> per-class result")
            accs = []
            for label in sorted(self._per_class_res):
                res = self._per_class_res[label]
                a = 100.0 * sum(res) / len(res)
                accs.append(a)
                name = self._lab2cname.get(label, str(label)) if self._lab2cname else str(label)
                print(f"* class: {label} ({name})\ttotal: {len(res):,}\tcorrect: {sum(res):,}\tacc: {a:.1f}%")
            results["perclass_accuracy"] = float(np.mean(accs))
            print(f"* average: {results['perclass_accuracy']:.1f}%")
        if self._cmat:
            cmat = confusion_matrix(self._y_true, self._y_pred, normalize="true")
            out = os.path.join(self.cfg.OUTPUT_DIR, "cmat.pt")
            atomic_torch_save(torch.from_numpy(cmat), out)
            print(f"Confusion matrix is saved to {out}")
        return results


def build_evaluator(cfg: Any, **kwargs: Any) -> EvaluatorBase:
    """Instantiate the evaluator named by ``cfg.TEST.EVALUATOR`` (``lab2cname=`` etc. passed on)."""
    return EVALUATOR_REGISTRY.get(cfg.TEST.EVALUATOR)(cfg, **kwargs)
