"""SeTAR's greedy low-rank search: the loop.

The search (Li et al., NeurIPS 2024; X1AOX1A/SeTAR ``svd_ood/searchers.py``) visits weight
matrices in a searcher's order (:mod:`locoop.setar.searchers`). At each step it tries every
candidate ratio on the current model -- the previous steps' best ratios applied -- and keeps the
best one. Selection follows SeTAR exactly: the incumbent is the current model (ratio 0) with its
criterion, candidates are tried in ascending ratio order, and a candidate replaces the incumbent
only if it is *strictly* better; so ties go to the smallest ratio and a step whose candidates all
do worse keeps ratio 0. Ratio 0 is always a candidate (added if the list lacks it), so the first
step starts from the unpruned model's criterion instead of SeTAR's "+inf" placeholder.

The pieces: the criterion (:mod:`locoop.setar.criterion`), the evaluators of the search modes
behind one interface (:mod:`locoop.setar.evaluator`: ``fast``, exact and cached, and ``naive``,
recomputing everything like the reference; both select the same settings with the same
criteria), and the files (:mod:`locoop.setar.outputs`).

Resumable: with ``output_dir`` the progress is written atomically after every step
(``search_progress.json``); :func:`run_search` with ``resume=`` that progress continues after its
last completed step and ends with the same settings and log as an uninterrupted run. The progress
records what the results depend on (:func:`search_identity`); resuming with other values is
refused with the differing entries named.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm import tqdm

from locoop.models.head import ClassPrompts
from locoop.ood.heads import head_logit_scale

from .criterion import CRITERIA, LOSS_CRITERIA, Criterion
from .evaluator import Counter, SearchData, build_evaluator, list_modes
from .lowrank import LowRankEditor, get_linear, is_block_model, n_removed, normalize_layer, num_layers
from .outputs import LOG_COLUMNS, SearchProgress, check_identity, write_final_outputs, write_progress, write_search_log
from .searchers import Step, build_steps, get_searcher

__all__ = [
    "DEFAULT_RATIOS",
    "CRITERIA",
    "MODES",
    "LOG_COLUMNS",
    "ClassPrompts",
    "SearchData",
    "SearchResult",
    "check_ratios",
    "search_identity",
    "run_search",
]

DEFAULT_RATIOS: Tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40)
MODES: Tuple[str, ...] = list_modes()

# Row keys that are not criterion parts.
_ROW_KEYS = ("step", "tower", "weight_type", "layer", "ratio", "n_removed", "chosen", "reused")


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        settings: ``[[tower, weight_type, layer, ratio], ...]`` in visiting order, zeros included.
        log: one dict per candidate (see :mod:`locoop.setar.outputs` for the columns).
        baseline: criterion of the unpruned model.
        final: criterion of the model with ``settings`` applied.
        counters: block forward passes per sample (``visual_layer_passes``, ``text_layer_passes``)
            and ``candidates_evaluated`` / ``candidates_reused`` (summed over resumed runs).
        seconds: wall time of the search (summed over resumed runs).
        mode, criterion, higher_is_better: how it was run.
        resumed_at: the step index at which each resumed run started (empty: never interrupted).
    """

    settings: List[list]
    log: List[dict]
    baseline: float
    final: float
    counters: Dict[str, int]
    seconds: float
    mode: str
    criterion: str
    higher_is_better: bool
    resumed_at: Tuple[int, ...] = ()

    def summary(self) -> Dict[str, Any]:
        """The content of ``search_summary.json``."""
        return {"mode": self.mode, "criterion": self.criterion, "higher_is_better": self.higher_is_better,
                "baseline": self.baseline, "final": self.final, "seconds": self.seconds,
                "counters": self.counters, "settings": [list(s) for s in self.settings],
                "num_candidates": len(self.log), "resumed_at": list(self.resumed_at)}


def check_ratios(ratios: Sequence[float]) -> List[float]:
    """Validate candidate ratios; returns them sorted ascending, unique, with 0 included.

    Raises:
        ValueError: a ratio outside [0, 1) or an empty list.
    """
    if isinstance(ratios, (int, float)):
        ratios = [ratios]
    ratios = list(ratios)
    if not ratios:
        raise ValueError("no candidate ratio given; e.g. SETAR.RATIOS [0.0, 0.05, 0.1, ..., 0.4]")
    out = set()
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
            raise ValueError(f"candidate ratio {r!r} is not in [0, 1) (the fraction of singular components "
                             f"removed); got SETAR.RATIOS {ratios}")
        out.add(float(r))
    out.add(0.0)
    return sorted(out)


def search_identity(num_classes: int, searcher: str = "visual_text", weight_types: Sequence[str] = ("W_up",),
                    ratios: Sequence[float] = DEFAULT_RATIOS, prune_type: str = "small", seed: int = 0,
                    freeze_proj: bool = True, criterion: str = "loss", lam: float = 0.10, top_k: int = 300,
                    score: str = "GL-MCM", T: float = 1.0, extra: Optional[Mapping[str, Any]] = None,
                    **_ignored: Any) -> Dict[str, Any]:
    """What a search's results depend on, as recorded in its progress (:func:`run_search`'s arguments).

    Arguments that cannot change the results (mode, device, verbosity, cache budget) are ignored;
    ``extra`` adds what the caller knows (backbone, prompts, validation data, preprocessing).
    """
    out: Dict[str, Any] = {"searcher": searcher, "weight_types": list(weight_types), "ratios": check_ratios(ratios),
                           "prune_type": prune_type, "freeze_proj": bool(freeze_proj), "criterion": criterion,
                           "num_classes": int(num_classes)}
    if prune_type == "random":
        out["seed"] = int(seed)
    if criterion in LOSS_CRITERIA:
        out.update({"lambda": float(lam), "top_k": int(top_k)})
    else:
        out.update({"score": score, "T": float(T)})
    out.update(dict(extra or {}))
    return out


def _layer_num(model: nn.Module) -> Dict[str, Any]:
    if is_block_model(model):  # Swin-V2: one tower, blocks per stage (SeTAR's layer_num for Swin)
        return {"visual": list(model.depths)}
    out = {"text": num_layers(model, "text")}
    if hasattr(model.visual, "transformer"):
        out["visual"] = num_layers(model, "visual")
    return out


def _describe(step: Step) -> str:
    return f"{step.tower} {step.weight_type}" + ("" if step.layer is None else f" {step.layer}")


def _parts(row: Mapping[str, Any]) -> Dict[str, float]:
    return {k: v for k, v in row.items() if k not in _ROW_KEYS}


def _row_step(row: Mapping[str, Any]) -> Step:
    return Step(row["tower"], row["weight_type"], normalize_layer(row["layer"]))


def _restore(progress: SearchProgress, pool: List[Step], exhaustive: bool
             ) -> Tuple[List[Tuple[Step, float]], Dict[Tuple[Step, float], dict], Optional[dict]]:
    """Committed steps, known candidate results and the incumbent of a resumed search; ``pool``
    loses the committed steps.

    Raises:
        ValueError: the progress does not fit this search's steps.
    """
    committed: List[Tuple[Step, float]] = []
    for i, (tower, weight_type, layer, ratio) in enumerate(progress.settings):
        step = Step(tower, weight_type, normalize_layer(layer))  # a JSON [stage, block] -> tuple
        if step not in pool or (not exhaustive and step != pool[0]):
            raise ValueError(f"the progress's step {i} ({_describe(step)}) is not where this search's steps go; "
                             "delete the progress file to start the search over")
        pool.remove(step)
        committed.append((step, float(ratio)))
    incumbent = None
    chosen = [row for row in progress.log if row["chosen"]]
    if len(chosen) != len(committed):
        raise ValueError("the progress's log does not match its settings; delete the progress file to start over")
    if chosen:
        incumbent = _parts(chosen[-1])
    # Results of candidates evaluated on the model as it is now: the rows since the last non-zero commit.
    last_change = max((i for i, (_, r) in enumerate(committed) if r > 0), default=-1)
    known = {(_row_step(row), float(row["ratio"])): _parts(row)
             for row in progress.log if row["step"] > last_change and row["ratio"] > 0 and _row_step(row) in pool}
    return committed, known, incumbent


def run_search(
    model: nn.Module,
    data: SearchData,
    searcher: str = "visual_text",
    weight_types: Sequence[str] = ("W_up",),
    ratios: Sequence[float] = DEFAULT_RATIOS,
    prune_type: str = "small",
    seed: int = 0,
    freeze_proj: bool = True,
    criterion: str = "loss",
    lam: float = 0.10,
    top_k: int = 300,
    score: str = "GL-MCM",
    T: float = 1.0,
    mode: str = "fast",
    device: Optional[Union[str, torch.device]] = None,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    verbose: bool = True,
    cache_gib: float = 8.0,
    editor: Optional[LowRankEditor] = None,
    identity: Optional[Mapping[str, Any]] = None,
    resume: Optional[SearchProgress] = None,
) -> SearchResult:
    """Greedy SeTAR search; leaves ``model`` with the best settings applied.

    Args:
        model: a :class:`clip.model.CLIP` in eval mode (edited in place).
        data: validation images and class prompts (:class:`SearchData`).
        searcher: visiting order (:func:`locoop.setar.searchers.list_searchers`).
        weight_types: per-layer matrices searched (SeTAR: ``["W_up"]``).
        ratios: candidate ratios (0 is always added; sorted ascending).
        prune_type: ``small`` (SeTAR), ``large`` or ``random``; ``seed`` seeds ``random``.
        freeze_proj: False also searches the towers' projections ``W_p``.
        criterion: ``loss`` / ``loss_id`` / ``loss_ood`` (ID data only) or ``auroc`` / ``aupr`` /
            ``fpr95`` (needs ``data.ood_batches``).
        lam, top_k: the LoCoOp loss's lambda and top-K (SeTAR ImageNet 0.10 / 300, VOC 0.05 / 4).
        score, T: OOD score and its temperature for metric criteria.
        mode: a registered search mode, ``fast`` (cached, exact) or ``naive`` (recompute everything).
        device: where to compute (default: the model's device).
        output_dir: if given, the log and the progress are written there after every step, the
            summary and ``best_settings.json`` once the search is complete.
        verbose: tqdm bar per step.
        cache_gib: memory budget of the fast mode's cached hidden states (GiB); above it, only
            every k-th block's input is kept.
        editor: an existing :class:`LowRankEditor` of ``model`` (default: a new one).
        identity: what else the results depend on (backbone, prompts, validation data, ...),
            recorded in the progress and checked on resume (see :func:`search_identity`).
        resume: the progress of an earlier, interrupted run of this search (e.g.
            :func:`locoop.setar.outputs.read_progress`); the search continues after its last step.

    Returns:
        :class:`SearchResult`.

    Raises:
        ValueError: bad searcher, weight type, prune type, ratio, criterion, mode or top-K, a
            ratio that would remove every component of a searched matrix, or a progress of a
            search with other values -- all checked before any forward pass.
    """
    # ---------------------------------------------------------------- checks before any work
    if mode not in MODES:
        raise ValueError(f"unknown search mode {mode!r}; valid modes: {', '.join(MODES)}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown search criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)} "
                         "(loss* on ID validation data; auroc/aupr/fpr95 need OOD validation data)")
    if criterion not in LOSS_CRITERIA and not data.ood_batches:
        raise ValueError(f"criterion {criterion!r} needs OOD validation images (SETAR.OOD_VAL_DATASETS); "
                         "use criterion 'loss' to search on ID data only")
    spec = get_searcher(searcher)
    ratios = check_ratios(ratios)
    editor = editor if editor is not None else LowRankEditor(model, prune_type=prune_type, seed=seed)
    if editor.model is not model:
        raise ValueError("the editor belongs to another model")
    layer_num = _layer_num(model)
    if "visual" not in layer_num and searcher != "text_only":
        num_layers(model, "visual")  # raises the explanation for a ResNet image tower
    steps = build_steps(searcher, layer_num, weight_types, freeze_proj)
    for s in steps:
        lin = get_linear(model, *s)
        n_removed(ratios[-1], tuple(lin.weight.shape), _describe(s))
    n_classes = data.text.num_classes if data.text is not None else int(model.num_classes)
    if criterion in LOSS_CRITERIA and not 1 <= int(top_k) <= n_classes:
        raise ValueError(f"top-K {top_k} of the LoCoOp criterion must be in 1..{n_classes} (the number of classes); "
                         "set SETAR.TOPK (SeTAR: 300 for ImageNet-1K, 4 for VOC)")
    for _, labels in data.id_batches:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise ValueError(f"ID validation labels must be in 0..{n_classes - 1} (one per class prompt), "
                             f"got labels in {int(labels.min())}..{int(labels.max())}")
    ident = search_identity(n_classes, searcher=searcher, weight_types=weight_types, ratios=ratios,
                            prune_type=prune_type, seed=seed, freeze_proj=freeze_proj, criterion=criterion, lam=lam,
                            top_k=top_k, score=score, T=T, extra=identity)
    pool = list(steps)
    if resume is not None:
        check_identity(resume, ident)
        committed, known, incumbent = _restore(resume, pool, spec.exhaustive)
        progress = SearchProgress(identity=resume.identity, settings=[list(s) for s in resume.settings],
                                  log=[dict(r) for r in resume.log], num_steps=len(steps), baseline=resume.baseline,
                                  counters=dict(resume.counters), seconds=float(resume.seconds),
                                  modes=list(resume.modes) + [mode],
                                  resumed_at=list(resume.resumed_at) + ([len(committed)] if pool else []))
    else:
        committed, known, incumbent = [], {}, None
        progress = SearchProgress(identity=ident, num_steps=len(steps), modes=[mode])
    device = torch.device(device) if device is not None else next(model.parameters()).device

    counter = Counter(visual_layer_passes=0, text_layer_passes=0, candidates_evaluated=0, candidates_reused=0)
    for k, v in progress.counters.items():
        counter.add(k, v)
    crit = Criterion(criterion, lam, top_k, score, T, head_logit_scale(model), [lbl for _, lbl in data.id_batches])
    ev = build_evaluator(mode, model, data, editor, crit, device, counter, cache_bytes=cache_gib * 2 ** 30)
    ev.restore(committed, known, incumbent)
    if verbose and resume is not None:
        tqdm.write(f"SeTAR: resuming after step {len(committed)}/{len(steps)} of an interrupted search" if pool
                   else "SeTAR: the search is already complete; using its settings")

    t0 = time.perf_counter()
    log, settings = progress.log, progress.settings
    step_idx = len(committed)
    n_rounds = len(steps)

    def record(step_i: int, s: Step, r: float, res: dict, reused: bool) -> dict:
        row = {"step": step_i, "tower": s.tower, "weight_type": s.weight_type, "layer": s.layer, "ratio": r,
               "n_removed": editor.n_removed(s.tower, s.weight_type, s.layer, r), **res,
               "chosen": False, "reused": reused}
        log.append(row)
        return row

    def save(write: bool = True) -> None:
        progress.counters = dict(counter)
        progress.seconds = base_seconds + time.perf_counter() - t0
        if write and output_dir is not None:
            write_search_log(output_dir, log)
            write_progress(output_dir, progress)

    base_seconds = progress.seconds
    with torch.no_grad():
        while pool:
            group = pool if spec.exhaustive else [pool[0]]
            candidates = [(s, r) for s in group for r in ratios]
            best_val = incumbent["criterion"] if incumbent is not None else crit.worst
            best_step, best_ratio, best_row = group[0], 0.0, None
            bar = tqdm(total=len(candidates), disable=not verbose, leave=False,
                       desc=f"SeTAR [{step_idx + 1}/{n_rounds}] " + (_describe(group[0]) if len(group) == 1
                                                                   else f"{len(group)} matrices"))
            for s, r in candidates:
                res, reused = ev.evaluate(s, r)
                counter.add("candidates_reused" if reused else "candidates_evaluated", 1)
                row = record(step_idx, s, r, res, reused)
                if progress.baseline is None and r == 0:
                    progress.baseline = res["criterion"]
                if crit.better(res["criterion"], best_val):
                    best_val, best_step, best_ratio, best_row = res["criterion"], s, r, row
                bar.update(1)
                bar.set_postfix_str(f"r={r:.2f} {criterion}={res['criterion']:.4f} best={best_val:.4f}")
            bar.close()
            if best_row is None:  # nothing beat the incumbent: ratio 0 for the first matrix of the group
                best_row = next(row for row in log[::-1] if row["step"] == step_idx and row["ratio"] == 0
                                and _row_step(row) == best_step)
            best_row["chosen"] = True
            incumbent = _parts(best_row)
            ev.commit(best_step, best_ratio, incumbent)
            settings.append([best_step.tower, best_step.weight_type, best_step.layer, best_ratio])
            pool.remove(best_step)
            step_idx += 1
            save()
            if verbose:
                tqdm.write(f"SeTAR step {step_idx}/{n_rounds}: {_describe(best_step)} -> ratio {best_ratio:g} "
                           f"({criterion} {best_val:.6g})")

    progress.complete = True
    save(write=False)  # written below, after best_settings.json
    result = SearchResult(settings=[list(s) for s in settings], log=log, baseline=float(progress.baseline),
                          final=float(incumbent["criterion"]), counters=dict(counter), seconds=progress.seconds,
                          mode=mode, criterion=criterion, higher_is_better=crit.higher_is_better,
                          resumed_at=tuple(progress.resumed_at))
    if output_dir is not None:
        write_final_outputs(output_dir, progress, result.summary())
    return result
