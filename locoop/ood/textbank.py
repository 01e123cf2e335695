"""Extra text features of a score: what a score needs besides the class prompts.

Most scores read only the image's cosines to the class text features. Some need more text: NegLabel
and CSP (:mod:`locoop.ood.neglabel`) add thousands of *negative labels* mined from a word list. Such a
score is registered with ``text_bank=SPEC`` (:func:`locoop.ood.scores.register_score`), where ``SPEC``
follows :class:`TextBankSpec`, and the OOD runner then does, for every evaluation:

1. ``plan = SPEC.check(cfg)`` in :func:`locoop.ood.runner.check_benchmark_inputs`, before any model
   is loaded or image read: settings are validated and input files (a lexicon) read, so a wrong path
   fails in seconds;
2. ``bank = SPEC.build(plan, clip_model=..., class_text=..., classnames=..., device=..., cache_dir=...,
   verbose=...)`` once, after the class text features and before the first image is encoded: a
   :class:`TextBank` whose ``features`` (``[M, D]``, L2-normalised float32) are the extra text (the
   builder caches what is expensive, keyed by what it depends on);
3. per chunk of images, ``bank_cos = image_global @ bank.features.T`` next to the class cosines; the
   score function reads ``stats.bank_cos[name]`` and ``stats.banks[name]`` (usually calling
   ``bank.score(stats.global_cos, stats.bank_cos[name])``);
4. ``bank.describe()`` goes into ``ood_results.json`` (``meta.text_banks.<score>``) and, when the bank has
   ``labels``, they are written to ``text_bank_<score>.tsv`` in the run folder.

Only global image features are involved, so a re-evaluation from the feature cache recomputes only
this text side. See docs/ARCHITECTURE.md, "How to add a score".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

__all__ = ["TextBank", "TextBankSpec", "prepare_text_banks", "build_text_banks", "describe_text_banks",
           "write_bank_labels", "bank_labels_name"]


@runtime_checkable
class TextBank(Protocol):
    """The extra text of one score, built once per evaluation."""

    features: torch.Tensor  # [M, D] normalised float32: the columns appended to the class cosines

    def score(self, class_cos: torch.Tensor, bank_cos: torch.Tensor) -> torch.Tensor:
        """Scores ``[n]`` (higher = more ID) from the class cosines ``[n, C]`` and the bank's ``[n, M]``."""

    def describe(self) -> Dict[str, Any]:
        """JSON-serialisable provenance (inputs, parameters, hashes) for the results files."""


class TextBankSpec(Protocol):
    """How a score's :class:`TextBank` is checked and built (attached to the score's registry entry)."""

    #: What the extra text is, for error messages ("negative labels").
    what: str

    def check(self, cfg: Any) -> Any:
        """Validate the settings and read the inputs; raise ValueError / FileNotFoundError naming the key."""

    def build(self, plan: Any, *, clip_model: torch.nn.Module, class_text: torch.Tensor, classnames: Sequence[str],
              device: torch.device, cache_dir: Optional[str], verbose: bool) -> TextBank:
        """The bank for this model and these class text features."""


def prepare_text_banks(cfg: Any, scores: Sequence[str]) -> Dict[str, Any]:
    """``{score: plan}`` for the scores of ``scores`` that need a text bank (``spec.check(cfg)`` each)."""
    from locoop.ood.scores import get_score

    plans: Dict[str, Any] = {}
    for name in scores:
        spec = get_score(name).text_bank
        if spec is not None:
            plans[name] = spec.check(cfg)
    return plans


@torch.no_grad()
def build_text_banks(plans: Mapping[str, Any], clip_model: torch.nn.Module, class_text: torch.Tensor,
                     classnames: Sequence[str], device: torch.device, cache_dir: Optional[str],
                     verbose: bool = True) -> Dict[str, TextBank]:
    """Build every planned bank (rank 0 first, so the other ranks of a torchrun find its cache).

    Raises:
        ValueError: the model has no text tower, or a builder's own error (e.g. too few negative labels).
    """
    from locoop.engine import dist
    from locoop.ood.scores import get_score

    if not plans:
        return {}
    if not hasattr(clip_model, "encode_text"):
        raise ValueError(f"scores {list(plans)} need a CLIP text tower (encode_text) to encode their extra text; "
                         f"{type(clip_model).__name__} has none: drop them from OOD.SCORES")

    def build() -> Dict[str, TextBank]:
        out: Dict[str, TextBank] = {}
        for name, plan in plans.items():
            out[name] = get_score(name).text_bank.build(
                plan, clip_model=clip_model, class_text=class_text, classnames=list(classnames), device=device,
                cache_dir=cache_dir, verbose=verbose and dist.is_main_process())
            d = class_text.shape[1]
            if out[name].features.ndim != 2 or out[name].features.shape[1] != d:
                raise ValueError(f"{name}: its extra text features have shape {tuple(out[name].features.shape)}; "
                                 f"[M, {d}] expected (the class text features' dimension)")
        return out

    banks = build() if dist.is_main_process() else {}
    dist.barrier()
    return banks if dist.is_main_process() else build()


def describe_text_banks(banks: Mapping[str, TextBank]) -> Dict[str, Dict[str, Any]]:
    """``{score: bank.describe()}`` (the ``meta.text_banks`` block of ``ood_results.json``)."""
    return {name: dict(bank.describe(), num_text_features=int(bank.features.shape[0])) for name, bank in banks.items()}


def bank_labels_name(score: str) -> str:
    """File name of a bank's label list in the run folder."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in score)
    return f"text_bank_{safe}.tsv"


def write_bank_labels(run_dir: Union[str, Path], banks: Mapping[str, TextBank]) -> List[Path]:
    """``text_bank_<score>.tsv`` per bank with ``labels``: one ``index, label, part of speech, group`` row each."""
    from locoop.engine.fileio import atomic_write_text

    paths = []
    for name, bank in banks.items():
        labels = getattr(bank, "labels", None)
        if not labels:
            continue
        pos = list(getattr(bank, "pos", None) or [""] * len(labels))
        group = [""] * len(labels)
        groups = getattr(bank, "groups", None)
        if groups is not None:
            for g, cols in enumerate(groups.tolist()):
                for c in cols:
                    group[c] = str(g)
        rows = ["index\tlabel\tpos\tgroup"] + [f"{i}\t{lab}\t{p}\t{g}" for i, (lab, p, g) in
                                               enumerate(zip(labels, pos, group))]
        paths.append(atomic_write_text(Path(run_dir) / bank_labels_name(name), "\n".join(rows) + "\n"))
    return paths
