"""Image features of a data set, extracted once, and scores computed from them.

One extraction path (:func:`iter_feature_batches`, collected by :func:`extract_features`)
serves the OOD benchmark, SeTAR and the feature cache, so every consumer sees the same
features: CLIP's projected global feature and the per-patch local features (LoCoOp's value
path), both L2-normalised in float32 and kept in float32, so scores are computed from exactly
what the model produced. Only the feature cache stores local features in float16 (values in
[-1, 1]; 196 x 512 x 2 bytes = 200 KB per ViT-B/16 image instead of 400 KB; ``OOD.CACHE_LOCAL_DTYPE``),
read back as float32 for every computation.

The benchmark streams batches and keeps only the scores, so its memory does not grow with the
data set; consumers that reuse features (SeTAR, the cache) keep the whole :class:`FeatureSet`.
A classifier (Swin-V2) stores its raw class logits instead of features
(:mod:`locoop.ood.heads`) and has no text side (``text_features = None``). Scores only need the
text side on top: :func:`iter_similarities` turns features into cosine similarities chunk by chunk (never the whole ``[N, P, C]`` local tensor at once) and
:func:`score_features` feeds the chunks to :func:`locoop.ood.scores.compute_scores`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from locoop.engine.precision import autocast
from locoop.ood.heads import encode_batch

__all__ = ["FeatureSet", "extract_features", "iter_feature_batches", "concat_features", "normalize_text_features",
           "iter_similarities", "score_features"]

Device = Union[str, torch.device]

# Elements (rows x patches x classes) per similarity chunk: 16M float32 = 64 MiB per temporary.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclass
class FeatureSet:
    """Features of one data set, in loader order.

    Attributes:
        global_feats: ``[N, D]`` float32, L2-normalised (CPU).
        local_feats: ``[N, P, D]`` L2-normalised per-patch features (``local_dtype``, CPU), or None.
        labels: ``[N]`` int64 labels (-1 for OOD sets).
        impaths: the N image paths.
        skipped: number of unreadable images the loader dropped.
        skipped_paths: path -> reason of those images.
    """

    global_feats: torch.Tensor
    local_feats: Optional[torch.Tensor]
    labels: torch.Tensor
    impaths: List[str]
    skipped: int = 0
    skipped_paths: Dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.global_feats.shape[0])

    @property
    def has_local(self) -> bool:
        return self.local_feats is not None

    @property
    def num_patches(self) -> int:
        return 0 if self.local_feats is None else int(self.local_feats.shape[1])


def iter_feature_batches(clip_model: torch.nn.Module, loader: Iterable[dict], device: Device = "cpu",
                         with_local: bool = True, amp: bool = False, local_dtype: torch.dtype = torch.float32,
                         progress: Optional[bool] = None, desc: str = "features") -> Iterator[FeatureSet]:
    """Encode ``loader`` batch by batch: one :class:`FeatureSet` per batch (``skipped`` left 0).

    The streaming form of :func:`extract_features` (same arguments): a consumer that only needs
    scores keeps memory at one batch instead of ``N x P x D`` local features.
    """
    from tqdm import tqdm

    device = torch.device(device)
    if progress is None:
        progress = sys.stderr.isatty()
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = batch["img"].to(device, non_blocking=True)
        with torch.no_grad(), autocast(device, amp):
            glob, loc = encode_batch(clip_model, images, with_local)  # CLIP features or classifier logits
            glob = glob.cpu()
            if loc is not None:
                loc = loc.to(local_dtype).cpu()
        yield FeatureSet(global_feats=glob, local_feats=loc, labels=torch.as_tensor(batch["label"]).long().cpu(),
                         impaths=list(batch["impath"]))


def _skipped(loader: Iterable[dict]) -> Dict[str, str]:
    return dict(getattr(loader, "skipped", {}) or {})


def extract_features(clip_model: torch.nn.Module, loader: Iterable[dict], device: Device = "cpu",
                     with_local: bool = True, amp: bool = False, local_dtype: torch.dtype = torch.float32,
                     progress: Optional[bool] = None, desc: str = "features") -> FeatureSet:
    """Encode every image of ``loader`` once: normalised global (and local) features.

    Args:
        clip_model: a CLIP model with ``encode_image(images, return_local=...)`` (ours, or a
            pruned copy). It is not switched to eval mode here; callers pass an eval model.
        loader: yields batch dicts with ``img`` [B, 3, H, W], ``label`` [B], ``impath`` (the
            data layer's loaders; their ``skipped`` attribute is read afterwards).
        device: where the model runs; batches are moved there (non-blocking).
        with_local: also keep the per-patch features (needed by L-MCM / GL-MCM and LoCoOp's loss).
        amp: autocast to float16 on CUDA (ignored on CPU unless the fp16-on-CPU test mode is on, see
            :mod:`locoop.engine.precision`).
        local_dtype: dtype of the returned local features (float32; float16 halves the memory, and
            moves L-MCM / GL-MCM by the fp16 rounding: the feature cache's choice).
        progress: show a tqdm bar (None: only when stderr is a terminal).
        desc: progress-bar label.

    Returns:
        A :class:`FeatureSet` on the CPU.

    Raises:
        ValueError: the loader yielded no images at all.
    """
    parts = list(iter_feature_batches(clip_model, loader, device, with_local, amp, local_dtype, progress, desc))
    return concat_features(parts, _skipped(loader))


def concat_features(parts: Sequence[FeatureSet], skipped_paths: Optional[Dict[str, str]] = None) -> FeatureSet:
    """One :class:`FeatureSet` from per-batch parts (in order).

    Raises:
        ValueError: no parts (the loader yielded no images).
    """
    skipped_paths = dict(skipped_paths or {})
    if not parts:
        where = f" ({len(skipped_paths)} unreadable images skipped)" if skipped_paths else ""
        raise ValueError(f"the data loader yielded no images{where}; nothing to encode")
    with_local = parts[0].local_feats is not None
    return FeatureSet(
        global_feats=torch.cat([p.global_feats for p in parts]),
        local_feats=torch.cat([p.local_feats for p in parts]) if with_local else None,
        labels=torch.cat([p.labels for p in parts]),
        impaths=[path for p in parts for path in p.impaths],
        skipped=len(skipped_paths),
        skipped_paths=skipped_paths,
    )


def normalize_text_features(text_features: torch.Tensor) -> torch.Tensor:
    """``[C, D]`` text features as L2-normalised float32 (idempotent for normalised input).

    Raises:
        ValueError: not a 2-D tensor.
    """
    if not isinstance(text_features, torch.Tensor) or text_features.ndim != 2:
        shape = tuple(text_features.shape) if isinstance(text_features, torch.Tensor) else type(text_features).__name__
        raise ValueError(f"text_features must be a [C, D] tensor, got {shape}")
    return F.normalize(text_features.detach().float(), dim=-1)


def _rows_per_chunk(features: FeatureSet, num_classes: int, use_local: bool, chunk_elements: int,
                    extra_columns: int = 0) -> int:
    per_row = num_classes * (1 + (features.num_patches if use_local else 0)) + int(extra_columns)
    return max(1, int(chunk_elements) // max(1, per_row))


@torch.inference_mode()
def iter_similarities(features: FeatureSet, text_features: Optional[torch.Tensor], use_local: bool = True,
                      device: Optional[Device] = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                      extra_columns: int = 0) -> Iterator[Tuple[int, int, torch.Tensor, Optional[torch.Tensor]]]:
    """Cosine similarities with the class texts, in row chunks.

    Args:
        features: image features (normalised).
        text_features: ``[C, D]`` class text features (normalised here again, in float32), or None when
            the features are a classifier's class logits (:mod:`locoop.ood.heads`): yielded as they are.
        use_local: also yield the local similarities ``[n, P, C]``.
        device: where to compute (default: the text features' device).
        chunk_elements: bound on rows x ((1 + P) x C + extra_columns) per chunk.
        extra_columns: columns per row the caller adds to each chunk (a score's text bank).

    Yields:
        ``(lo, hi, global_sim [n, C], local_sim [n, P, C] or None)`` float32, rows ``lo:hi``.

    Raises:
        ValueError: feature dimensions differ, or local similarities asked without local features.
    """
    if use_local and not features.has_local:
        raise ValueError("local similarities requested but the features were extracted with with_local=False")
    if text_features is None:  # a logit head (locoop.ood.heads): the features are the class logits
        dev = torch.device(device) if device is not None else torch.device("cpu")
        step = _rows_per_chunk(features, int(features.global_feats.shape[1]), use_local, chunk_elements, extra_columns)
        for lo in range(0, len(features), step):
            hi = min(len(features), lo + step)
            loc = features.local_feats[lo:hi].to(dev, torch.float32) if use_local else None
            yield lo, hi, features.global_feats[lo:hi].to(dev, torch.float32), loc
        return
    text = normalize_text_features(text_features)
    dev = torch.device(device) if device is not None else text.device
    text = text.to(dev)
    d = features.global_feats.shape[1]
    if text.shape[1] != d:
        raise ValueError(f"text features have dimension {text.shape[1]} but image features {d}; "
                         "they must come from the same CLIP model")
    text_t = text.t().contiguous()
    step = _rows_per_chunk(features, text.shape[0], use_local, chunk_elements, extra_columns)
    n = len(features)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        g = features.global_feats[lo:hi].to(dev, torch.float32) @ text_t
        loc = None
        if use_local:
            loc = features.local_feats[lo:hi].to(dev, torch.float32) @ text_t
        yield lo, hi, g, loc


def score_features(features: FeatureSet, text_features: Optional[torch.Tensor], names: Optional[Sequence[str]] = None,
                   T: float = 1.0, logit_scale: float = 100.0, lambda_local: float = 1.0,
                   device: Optional[Device] = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                   banks: Optional[Dict[str, object]] = None) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """OOD scores of every image (higher = more ID) and the predicted classes.

    Args:
        features: image features; local ones are needed when a local score is asked for.
        text_features: ``[C, D]`` class text features, or None for a classifier's logits (:mod:`locoop.ood.heads`).
        names: score names (``locoop.ood.scores.list_scores()``); None = all the features allow.
        T: softmax temperature on the cosine similarity.
        logit_scale: CLIP's logit scale (only ``energy-logit`` uses it).
        lambda_local: weight of L-MCM inside GL-MCM.
        device: where to compute (default: the text features' device).
        chunk_elements: bound on the size of each similarity chunk.
        banks: ``{score: TextBank}`` of the scores that need extra text features (NegLabel, CSP;
            :mod:`locoop.ood.textbank`): their cosines are computed from the global features next to
            the class cosines, in a matmul of their own (so the class cosines, and every other score,
            are the same with or without them).

    Returns:
        ``({score: float32 array [N]}, predictions int64 [N])``.

    Raises:
        ValueError: unknown score, a local score without local features, a text-bank score without its
            bank, NaN/inf scores.
    """
    from locoop.ood.scores import compute_scores, get_score, resolve_score_names

    banks = {get_score(k).name: v for k, v in (banks or {}).items()}
    resolved = resolve_score_names(names, have_local=features.has_local, have_banks=banks)
    use_local = any(get_score(n).needs_local for n in resolved)
    used = {name: banks[name] for name in resolved if get_score(name).text_bank is not None}
    n = len(features)
    out = {name: np.empty(n, dtype=np.float32) for name in resolved}
    preds = np.empty(n, dtype=np.int64)
    bank_t: Dict[str, torch.Tensor] = {}
    extra = sum(int(b.features.shape[0]) for b in used.values())
    for lo, hi, g, loc in iter_similarities(features, text_features, use_local, device, chunk_elements, extra):
        if used and not bank_t:  # the banks' features are normalised by their builders
            bank_t = {name: b.features.to(g.device, torch.float32).t().contiguous() for name, b in used.items()}
        rows = features.global_feats[lo:hi].to(g.device, torch.float32) if used else None
        bank_sim = {name: rows @ t for name, t in bank_t.items()}
        part = compute_scores(g, loc, resolved, T=T, logit_scale=logit_scale, lambda_local=lambda_local,
                              bank_sim=bank_sim, banks=used)
        for name, v in part.items():
            out[name][lo:hi] = v
        preds[lo:hi] = g.argmax(dim=-1).cpu().numpy()
    return out, preds
