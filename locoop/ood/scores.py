"""OOD scores computed from CLIP image-text cosine similarities.

Every score follows one sign convention: **higher = more in-distribution (ID)**. The
evaluation code of the papers stores the *negated* score and negates it back before
computing the metrics (``get_measures(-in_score, -out_score)``), so our scores equal
the values the metrics of those repositories actually see.

Inputs are cosine similarities (image and text features both L2-normalised):
``global_sim`` ``[N, C]`` and, for the local scores, ``local_sim`` ``[N, P, C]`` (one row
per patch / feature-map position). ``T`` is the softmax temperature *on the cosine*.

Definitions and where they come from (read, not copied):

* ``MCM`` -- ``max_c softmax(cos / T)_c``. MCM repository
  (deeplearning-wisc/MCM, ``utils/detection_util.py``, ``get_ood_scores_clip``:
  ``F.softmax(output / args.T)`` with ``output = image_features @ text_features.T``)
  and LoCoOp (AtsuMiyai/LoCoOp, ``trainers/locoop.py``, ``test_ood``: the
  ``logit_scale``-multiplied logits are divided by the constant ``100`` -- CLIP's clamped
  logit scale -- before ``softmax(. / T)``, i.e. again the cosine over ``T``).
* ``L-MCM`` -- ``max_{p, c} softmax(local_cos_p / T)_c``: softmax over classes for every
  patch, then the maximum over patches and classes (GL-MCM repository
  AtsuMiyai/GL-MCM ``utils/detection_util.py`` and LoCoOp ``test_ood``).
* ``GL-MCM`` -- ``MCM + lambda_local * L-MCM`` (GL-MCM's ``--lambda_local``, config key
  ``OOD.LAMBDA_LOCAL``; LoCoOp and SeTAR use a plain sum, i.e. ``lambda_local = 1``, our default and
  GL-MCM's argparse default; GL-MCM's ImageNet script passes 0.5).
* ``energy`` -- ``T * logsumexp(cos / T)`` **on the cosine**, as in MCM's
  ``get_ood_scores_clip`` (``args.T * torch.logsumexp(output / args.T)`` with ``output``
  the cosine). With ``T = 1`` this is a weak detector; it is the paper's baseline.
* ``energy-logit`` -- ``T * logsumexp(logit_scale * cos / T)``: energy of CLIP's actual
  logits (the convention of the original energy paper applied to CLIP). Not in the
  MCM code; offered under its own name so the two are never confused.
* ``max-logit`` -- ``max_c cos_c``: MCM's code takes the maximum of the raw cosine
  output (no softmax, no temperature).
* ``entropy`` -- ``-H(softmax(cos / T))`` (natural log). MCM stores
  ``scipy.stats.entropy(smax, axis=1)`` and negates it in the metric call, so the
  metric sees the negative entropy.
* ``variance`` (alias ``var``) -- population variance over classes of
  ``softmax(cos / T)`` (MCM: ``np.var(smax, axis=1)``, ddof = 0).

* ``NegLabel`` / ``CSP`` -- negative-label scores (NegLabel, ICLR 2024; CSP, NeurIPS 2024):
  ``S = sum_k e^(cos_k / tau) / (sum_k e^(cos_k / tau) + sum_j e^(cos(n_j) / tau))`` over the ID labels ``k``
  and the negative labels ``n_j`` mined from a lexicon, averaged over groups of negatives; the
  definitions (NegMining, the score, the grouping strategy, CSP's conjugated semantic pool) are in
  :mod:`locoop.ood.neglabel`. They need extra text features (the negative labels), built once per
  evaluation by the runner (:mod:`locoop.ood.textbank`) and passed as ``bank_sim`` / ``banks``.

All computation is float32, in chunks of rows so that e.g. 50k images x 196 patches x
1000 classes never materialises more than ``chunk_elements`` floats per temporary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from clip.registry import Registry, RegistryError  # noqa: F401  (RegistryError: what get_score raises)

ArrayLike = Union[np.ndarray, torch.Tensor]

# Default size of one chunk in elements (rows * patches * classes): 16M float32 = 64 MiB
# per temporary, a handful of temporaries alive at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


class _ChunkStats:
    """Lazily computed, cached intermediate quantities of one chunk of rows.

    Scores ask for what they need (e.g. the global log-softmax), so computing several
    scores at once shares the expensive softmax / logsumexp work.
    """

    def __init__(self, global_cos: Optional[torch.Tensor], local_cos: Optional[torch.Tensor],
                 T: float, logit_scale: float, lambda_local: float,
                 bank_cos: Optional[Mapping[str, torch.Tensor]] = None, banks: Optional[Mapping[str, Any]] = None):
        self.global_cos = global_cos
        self.local_cos = local_cos
        self.T = T
        self.logit_scale = logit_scale
        self.lambda_local = lambda_local
        #: per score with a text bank: the chunk's cosines to the bank's features [n, M], and the bank
        self.bank_cos: Mapping[str, torch.Tensor] = bank_cos or {}
        self.banks: Mapping[str, Any] = banks or {}
        self._cache: Dict[str, torch.Tensor] = {}

    def _get(self, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def global_log_softmax(self) -> torch.Tensor:
        return self._get("g_logsm", lambda: torch.log_softmax(self.global_cos / self.T, dim=-1))

    @property
    def global_softmax(self) -> torch.Tensor:
        return self._get("g_sm", lambda: self.global_log_softmax.exp())

    @property
    def mcm(self) -> torch.Tensor:
        # max softmax = exp(max log-softmax); avoids a second pass over the classes.
        return self._get("mcm", lambda: self.global_log_softmax.max(dim=-1).values.exp())

    @property
    def lmcm(self) -> torch.Tensor:
        def compute() -> torch.Tensor:
            x = self.local_cos / self.T  # [n, P, C]
            # Per patch: max_c softmax = exp(max_c x - logsumexp_c x).
            per_patch = (x.max(dim=-1).values - torch.logsumexp(x, dim=-1)).exp()
            return per_patch.max(dim=-1).values

        return self._get("lmcm", compute)


@dataclass(frozen=True)
class ScoreSpec:
    """A registered score: ``fn(stats) -> [n]`` tensor, higher = more ID.

    ``text_bank``: None, or how the extra text features the score needs are checked and built
    (a :class:`locoop.ood.textbank.TextBankSpec`); the score then reads ``stats.bank_cos[name]`` and
    ``stats.banks[name]``.
    """

    name: str
    fn: Callable[[_ChunkStats], torch.Tensor]
    needs_local: bool
    description: str
    text_bank: Any = None


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


# Lookups ignore case, '-', '_' and spaces; a few extra spellings are accepted.
SCORE_REGISTRY = Registry("SCORE", kind="OOD score", plural="scores", normalize=_normalise,
                          aliases={"var": "variance", "maxcos": "max-logit", "energycos": "energy"})


def register_score(name: str, needs_local: bool = False, description: str = "", text_bank: Any = None):
    """Decorator registering ``fn(stats) -> Tensor[n]`` as a score under ``name``.

    Args:
        name: display name (also the key in results files).
        needs_local: True when the score reads per-patch similarities.
        description: one line for ``list_scores`` / help texts.
        text_bank: for a score that needs extra text features (NegLabel's negative labels), a
            :class:`locoop.ood.textbank.TextBankSpec` the runner checks and builds; None otherwise.

    Raises:
        RegistryError: the name (ignoring case, '-', '_' and spaces) is taken.
    """

    def deco(fn: Callable[[_ChunkStats], torch.Tensor]):
        SCORE_REGISTRY.register(ScoreSpec(name, fn, needs_local, description, text_bank), name=name)
        return fn

    return deco


@register_score("MCM", description="max softmax(cos / T) over classes (Ming et al. 2022)")
def _score_mcm(s: _ChunkStats) -> torch.Tensor:
    return s.mcm


@register_score("L-MCM", needs_local=True,
                description="max over patches and classes of softmax(local cos / T)")
def _score_lmcm(s: _ChunkStats) -> torch.Tensor:
    return s.lmcm


@register_score("GL-MCM", needs_local=True, description="MCM + lambda_local * L-MCM (Miyai et al. 2023)")
def _score_glmcm(s: _ChunkStats) -> torch.Tensor:
    return s.mcm + s.lambda_local * s.lmcm


@register_score("energy", description="T * logsumexp(cos / T) on the cosine (MCM code)")
def _score_energy(s: _ChunkStats) -> torch.Tensor:
    return s.T * torch.logsumexp(s.global_cos / s.T, dim=-1)


@register_score("energy-logit", description="T * logsumexp(logit_scale * cos / T) (CLIP logits)")
def _score_energy_logit(s: _ChunkStats) -> torch.Tensor:
    return s.T * torch.logsumexp(s.global_cos * (s.logit_scale / s.T), dim=-1)


@register_score("max-logit", description="max cosine similarity over classes (MCM code: no softmax, no T)")
def _score_max_logit(s: _ChunkStats) -> torch.Tensor:
    return s.global_cos.max(dim=-1).values


@register_score("entropy", description="negative entropy of softmax(cos / T)")
def _score_entropy(s: _ChunkStats) -> torch.Tensor:
    # sum p log p; an underflowed p = 0 contributes 0 like scipy.special.entr.
    return (s.global_softmax * s.global_log_softmax).sum(dim=-1)


@register_score("variance", description="population variance of softmax(cos / T) over classes")
def _score_variance(s: _ChunkStats) -> torch.Tensor:
    p = s.global_softmax
    return ((p - 1.0 / p.shape[-1]) ** 2).mean(dim=-1)


def _negative_label_score(name: str) -> Callable[[_ChunkStats], torch.Tensor]:
    def fn(s: _ChunkStats) -> torch.Tensor:
        return s.banks[name].score(s.global_cos, s.bank_cos[name])

    fn.__name__ = f"_score_{name.lower()}"
    fn.__doc__ = (f"{name}: mean over groups G_g of the negative labels of sum_k e^(id_k / tau) / "
                  "(sum_k e^(id_k / tau) + sum_(j in G_g) e^(neg_j / tau)), tau = OOD.NEGLABEL.T (0.01), on cosines; "
                  "see locoop.ood.neglabel")
    return fn


def _register_negative_label_scores() -> None:
    from locoop.ood.neglabel import NegativeLabelSpec

    for name, recipe, desc in (
            ("NegLabel", "neglabel", "ID softmax mass against mined negative labels, grouped (Jiang et al. 2024)"),
            ("CSP", "csp", "NegLabel's score with CSP's conjugated semantic pool (Chen et al. 2024)")):
        register_score(name, description=desc, text_bank=NegativeLabelSpec(name, recipe))(_negative_label_score(name))


_register_negative_label_scores()


def list_scores(local: Optional[bool] = None, text_bank: Optional[bool] = None) -> List[str]:
    """Names of the registered scores.

    Args:
        local: None for all, True for only those needing local features, False for the others.
        text_bank: None for all, True for only those needing extra text features (NegLabel, CSP),
            False for the others.
    """
    return SCORE_REGISTRY.list(lambda n, s: (local is None or s.needs_local == local)
                               and (text_bank is None or (s.text_bank is not None) == text_bank))


def get_score(name: str) -> ScoreSpec:
    """Look a score up by name (case, '-', '_' and spaces ignored; 'var' = 'variance').

    Raises:
        RegistryError (a ValueError): unknown name; the message names the closest and all valid names.
        TypeError: ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"score name must be a string, got {type(name).__name__}")
    return SCORE_REGISTRY.get(name)


def _bank_names(have_banks: Union[bool, Iterable[str]]) -> Optional[set]:
    """Canonical names of the scores whose text banks are given (None = all of them will be)."""
    if have_banks is True:
        return None
    if have_banks is False:
        return set()
    return {get_score(n).name for n in have_banks}


def resolve_score_names(names: Optional[Union[str, Iterable[str]]], have_local: bool,
                        have_banks: Union[bool, Iterable[str]] = ()) -> List[str]:
    """Canonical score names for ``names`` (None = every score the inputs allow).

    Args:
        names: score names, or None.
        have_local: local similarities are available.
        have_banks: the scores (names) whose text banks are available, or True when every text bank
            will be built (the runner's checks).

    Raises:
        ValueError: unknown or duplicate name, a local score requested without local features, or a
            score needing extra text features without them.
    """
    banks = _bank_names(have_banks)
    if names is None:
        return [n for n in (list_scores() if have_local else list_scores(local=False))
                if get_score(n).text_bank is None or banks is None or n in banks]
    if isinstance(names, str):
        names = [names]
    out: List[str] = []
    for n in names:
        spec = get_score(n)
        if spec.needs_local and not have_local:
            raise ValueError(
                f"score {spec.name!r} needs per-patch similarities but local_sim was not given; "
                "pass local_sim [N, P, C] (encode_image(..., return_local=True)) or drop "
                f"{spec.name!r} from the score list")
        if spec.text_bank is not None and banks is not None and spec.name not in banks:
            raise ValueError(
                f"score {spec.name!r} needs its {spec.text_bank.what} (extra text features), which are not given "
                "here; it is computed by the OOD benchmark (OOD.SCORES of eval, setar-search and setar-finetune), "
                f"or pass bank_sim / banks for {spec.name!r}; else drop it from the score list")
        if spec.name in out:
            raise ValueError(f"score {spec.name!r} requested twice")
        out.append(spec.name)
    if not out:
        raise ValueError("empty score list; valid scores: " + ", ".join(list_scores()))
    return out


def _check_temperature(T: float, logit_scale: float) -> tuple:
    """Validated ``(T, logit_scale)`` as floats (tensors such as ``logit_scale.exp()`` accepted)."""
    out = []
    for nm, v in (("temperature T", T), ("logit_scale", logit_scale)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{nm} must be a number, got {v!r}") from None
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"{nm} must be a finite number > 0, got {v!r}")
        out.append(f)
    return tuple(out)


def _check_lambda(lambda_local: float) -> float:
    try:
        f = float(lambda_local)
    except (TypeError, ValueError):
        raise ValueError(f"lambda_local (OOD.LAMBDA_LOCAL) must be a number, got {lambda_local!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"lambda_local (OOD.LAMBDA_LOCAL) must be finite, got {lambda_local!r}")
    return f


#: Public name of the check of GL-MCM's weight (for early config validation).
check_lambda_local = _check_lambda


def _shape(x: ArrayLike) -> tuple:
    return tuple(x.shape)


def _check_inputs(global_sim: ArrayLike, local_sim: Optional[ArrayLike]) -> None:
    for nm, x in (("global_sim", global_sim), ("local_sim", local_sim)):
        if x is not None and not isinstance(x, (np.ndarray, torch.Tensor)):
            raise TypeError(f"{nm} must be a numpy array or torch tensor, got {type(x).__name__}")
    if global_sim.ndim != 2:
        raise ValueError(f"global_sim must be [N, C] cosine similarities, got shape {_shape(global_sim)}")
    n, c = _shape(global_sim)
    if c < 1:
        raise ValueError("global_sim has no class column (C = 0)")
    if local_sim is not None:
        if local_sim.ndim != 3:
            raise ValueError(f"local_sim must be [N, P, C] per-patch similarities, got shape {_shape(local_sim)}")
        if local_sim.shape[0] != n or local_sim.shape[2] != c:
            raise ValueError(f"local_sim shape {_shape(local_sim)} does not match global_sim {_shape(global_sim)} "
                             "(need the same N images and C classes)")
        if local_sim.shape[1] < 1:
            raise ValueError("local_sim has no patches (P = 0)")


def _to_chunk(x: ArrayLike, lo: int, hi: int, device: Optional[torch.device]) -> torch.Tensor:
    part = x[lo:hi]
    t = torch.from_numpy(np.ascontiguousarray(part)) if isinstance(part, np.ndarray) else part
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def _rows_per_chunk(row_elements: int, chunk_elements: int) -> int:
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    return max(1, chunk_elements // max(1, row_elements))


@torch.no_grad()
def compute_scores(
    global_sim: ArrayLike,
    local_sim: Optional[ArrayLike] = None,
    names: Optional[Union[str, Sequence[str]]] = None,
    T: float = 1.0,
    logit_scale: float = 100.0,
    lambda_local: float = 1.0,
    device: Optional[Union[str, torch.device]] = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    bank_sim: Optional[Mapping[str, ArrayLike]] = None,
    banks: Optional[Mapping[str, Any]] = None,
) -> Dict[str, np.ndarray]:
    """Compute OOD scores (higher = more ID) from cosine similarities.

    Args:
        global_sim: ``[N, C]`` cosine similarities of normalised image and text features
            (numpy or torch, any float dtype).
        local_sim: optional ``[N, P, C]`` per-patch cosine similarities (needed by
            L-MCM and GL-MCM).
        names: score names (see ``list_scores()``); None = every score the inputs allow.
        T: softmax temperature on the cosine (the papers' ``--T``, default 1).
        logit_scale: CLIP's logit scale (100 for OpenAI CLIP); only ``energy-logit`` uses it.
        lambda_local: weight of L-MCM in GL-MCM (1 in LoCoOp and GL-MCM's default).
        device: where to compute; default the input tensor's device (CPU for numpy).
        chunk_elements: rows are processed in chunks of about this many elements.
        bank_sim: for scores with a text bank (NegLabel, CSP), ``{score: [N, M] cosines to the bank's
            features}`` (:mod:`locoop.ood.textbank`).
        banks: ``{score: its TextBank}``, the same keys.

    Returns:
        ``{name: float32 array [N]}`` in the order of ``names``.

    Raises:
        ValueError: bad shapes, temperature, score name, or NaN/inf in the result.
    """
    _check_inputs(global_sim, local_sim)
    T, logit_scale = _check_temperature(T, logit_scale)
    lambda_local = _check_lambda(lambda_local)
    banks = {get_score(k).name: v for k, v in (banks or {}).items()}
    bank_sim = {get_score(k).name: v for k, v in (bank_sim or {}).items()}
    resolved = resolve_score_names(names, have_local=local_sim is not None, have_banks=set(banks) & set(bank_sim))
    specs = [get_score(n) for n in resolved]
    use_local = any(s.needs_local for s in specs)
    dev = torch.device(device) if device is not None else None

    n, c = _shape(global_sim)
    used_banks = [s.name for s in specs if s.text_bank is not None]
    for name in used_banks:
        x = bank_sim[name]
        if not isinstance(x, (np.ndarray, torch.Tensor)) or x.ndim != 2 or x.shape[0] != n:
            raise ValueError(f"bank_sim[{name!r}] must be [N, M] cosines with the N = {n} rows of global_sim, got "
                             f"{_shape(x) if hasattr(x, 'shape') else type(x).__name__}")
    row_elems = c * (local_sim.shape[1] + 1 if use_local else 1) + sum(int(bank_sim[b].shape[1]) for b in used_banks)
    step = _rows_per_chunk(row_elems, chunk_elements)
    out = {s.name: np.empty(n, dtype=np.float32) for s in specs}
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        g = _to_chunk(global_sim, lo, hi, dev)
        loc = _to_chunk(local_sim, lo, hi, g.device) if use_local else None
        bcos = {b: _to_chunk(bank_sim[b], lo, hi, g.device) for b in used_banks}
        stats = _ChunkStats(g, loc, float(T), float(logit_scale), float(lambda_local), bcos,
                            {b: banks[b] for b in used_banks})
        for s in specs:
            out[s.name][lo:hi] = s.fn(stats).float().cpu().numpy()
    for name, v in out.items():
        bad = ~np.isfinite(v)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"score {name!r} is NaN/inf for {int(bad.sum())} of {n} images (first at index {first}); "
                "the similarity inputs contain NaN/inf -- check the model precision (fp16 overflow) "
                "and that the features were L2-normalised")
    return out


@torch.no_grad()
def predict(global_sim: ArrayLike, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> np.ndarray:
    """Predicted class (argmax of the cosine similarity, first index on ties) per image."""
    _check_inputs(global_sim, None)
    n, c = _shape(global_sim)
    step = _rows_per_chunk(c, chunk_elements)
    preds = np.empty(n, dtype=np.int64)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        preds[lo:hi] = _to_chunk(global_sim, lo, hi, None).argmax(dim=-1).cpu().numpy()
    return preds


def _count_correct(global_sim: ArrayLike, labels: ArrayLike) -> int:
    _check_inputs(global_sim, None)
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    lab = lab.reshape(-1)
    n, c = _shape(global_sim)
    if n == 0:
        raise ValueError("accuracy of an empty set is undefined (global_sim has 0 rows)")
    if lab.shape[0] != n:
        raise ValueError(f"labels has {lab.shape[0]} entries but global_sim has {n} rows")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.min() < 0 or lab.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}) (C = {c} classes); got min {lab.min()}, max {lab.max()} "
                         "(OOD images, labelled -1, have no accuracy)")
    return int((predict(global_sim) == lab).sum())


def accuracy(global_sim: ArrayLike, labels: ArrayLike) -> float:
    """ID top-1 accuracy (fraction in [0, 1]) of the argmax over classes.

    Args:
        global_sim: ``[N, C]`` similarities (or logits: argmax is scale-invariant).
        labels: ``[N]`` integer class indices in ``[0, C)``.

    Raises:
        ValueError: empty input, length mismatch, or labels outside ``[0, C)``.
    """
    return _count_correct(global_sim, labels) / int(global_sim.shape[0])


class ScoreAccumulator:
    """Collect scores (and accuracy) batch by batch during one pass over a data set.

    Example:
        acc = ScoreAccumulator(["MCM", "GL-MCM"], T=1.0)
        for batch in loader:
            acc.update(global_sim, local_sim, labels=batch["label"])
        scores = acc.result()  # {name: array [N]}
    """

    def __init__(self, names: Optional[Union[str, Sequence[str]]] = None, T: float = 1.0,
                 logit_scale: float = 100.0, lambda_local: float = 1.0,
                 device: Optional[Union[str, torch.device]] = None, have_local: bool = True):
        T, logit_scale = _check_temperature(T, logit_scale)
        lambda_local = _check_lambda(lambda_local)
        # Validate the names now, before any image is encoded.
        self.names = resolve_score_names(names, have_local=have_local)
        self.T, self.logit_scale, self.lambda_local, self.device = T, logit_scale, lambda_local, device
        self._parts: Dict[str, List[np.ndarray]] = {n: [] for n in self.names}
        self.correct = 0
        self.total = 0

    def update(self, global_sim: ArrayLike, local_sim: Optional[ArrayLike] = None,
               labels: Optional[ArrayLike] = None) -> None:
        """Add one batch (same arguments as :func:`compute_scores`; labels for accuracy)."""
        s = compute_scores(global_sim, local_sim, self.names, self.T, self.logit_scale,
                           self.lambda_local, self.device)
        for k, v in s.items():
            self._parts[k].append(v)
        if labels is not None:
            self.correct += _count_correct(global_sim, labels)
            self.total += int(global_sim.shape[0])

    @property
    def accuracy(self) -> Optional[float]:
        """Accuracy over the batches that had labels (None when none had)."""
        return self.correct / self.total if self.total else None

    def result(self) -> Dict[str, np.ndarray]:
        """Concatenated scores ``{name: [N]}``."""
        return {k: (np.concatenate(v) if v else np.empty(0, dtype=np.float32)) for k, v in self._parts.items()}
