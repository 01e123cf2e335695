"""Negative-label OOD scores: NegLabel (Jiang et al., ICLR 2024) and CSP (Chen et al., NeurIPS 2024).

Both add a bank of *negative labels* (words far from every ID class in CLIP's text space) to the
ID class prompts, and score an image by how much of its softmax mass stays on the ID labels.
Definitions (read in the papers and their code: XueJiang16/NegLabel
``mmcls/models/classifiers/multi_modal.py`` and ``mmcls/models/ood/clip_ood.py``;
MengyuanChen21/NeurIPS2024-CSP, same two files; never copied):

Notation: ``e_1..e_K`` the normalised ID text features, ``c_1..c_N`` the normalised features of the
candidate words of a lexicon (:mod:`locoop.ood.lexicon`), ``h`` a normalised image feature.

**NegMining** (the NegLabel paper's negative-label selection): the distance of candidate ``i`` to the ID
labels is the ``eta``-percentile of its negative cosines, ``d_i = P_eta({-cos(c_i, e_k)}_k)``
with ``eta = 5%``; the candidates with the largest distances are the negative labels. For the
linear-interpolation percentile ``P_eta(-x) = -P_(1-eta)(x)``, so equivalently the candidates with
the *smallest* ``percentile = 95%`` quantile of their cosines to the ID labels are kept -- the
form of the code (``torch.quantile(cos, q=0.95, dim=-1)``, ascending ``argsort``), which we follow.
The code selects **per part of speech**: ``int(N_noun * ratio)`` nouns and ``int(N_adj * ratio)``
adjectives, ``ratio = 0.15`` (``neg_topk``; 10,499 of its 70,000 words), and orders the bank as
the selected nouns, then the selected adjectives, each by increasing quantile.
CSP adds one rule: a candidate whose largest cosine to an ID label exceeds ``0.95`` gets
quantile 1 (never selected).

**NegLabel score** (the paper's OOD score with negative labels):

    S(h) = sum_k exp(cos(h, e_k) / tau) / (sum_k exp(cos(h, e_k) / tau) + sum_j exp(cos(h, n_j) / tau))

over the ID labels ``e_k`` and the selected negative labels ``n_j``, with ``tau = 0.01`` (the code's
``t = 1`` on logits ``100 * cos``). We compute it as ``sigmoid(LSE_k(cos_k / tau) - LSE_j(cos_j / tau))``
(``LSE`` = logsumexp), which is the same quantity without forming the softmax.

**Grouping strategy** (the paper's grouping of negative labels): split the ``M`` negative labels into ``ngroup``
groups, compute ``S`` with each group's negatives only and average the ``ngroup`` scores. The code
(``ScalableClassifier.grouping``): drop the last ``M mod ngroup`` negatives of the bank (the
highest-quantile adjectives), permute the rest with ``torch.randperm`` after
``torch.manual_seed(0)`` on the evaluation device, and cut the permutation into ``ngroup``
consecutive groups; ``ngroup = 100``. (With ``ngroup <= 1`` the NegLabel code sums the logits without
the softmax -- not the paper's score; CSP's code fixed it; we compute the paper's score.)

**CSP** (the CSP paper's "conjugated semantic pool"; code as above): the same NegMining and score
(``ratio 0.15``, ``percentile 0.95``, ``ngroup 100``, ``tau 0.01``) on another candidate bank:
nouns from NegLabel's lists without ``noun.person``, ``noun.quantity``, ``noun.group``; each noun is
the mean of the raw text features of 8 prompts (``CSP_NOUN_TEMPLATES``), then normalised; the
adjective pool (without ``adj.pert``) is "conjugated": each adjective is paired with one superclass
word drawn with Python's ``random.choice`` (seed 0, one draw per adjective in reading order) from
14 (``CSP_MODIFIERS``: "{} environment", "{} space", ...), and that phrase is the mean of 4 prompts
(``CSP_ADJ_TEMPLATES``); the ID labels are the mean of the same 8 noun prompts per class (plus the
``0.95`` exclusion above). CSP reads the files in ``os.listdir`` order, so which adjective draws which
superclass word depends on their file system; we read sorted names (see :mod:`locoop.ood.lexicon`)
and draw in that order.

Precision follows the code: candidate prompts are encoded by the model in its dtype (fp16 on
CUDA), averaged and normalised in that dtype, then cast to float32; recipe ID prompts are cast to
float32 before averaging and normalising. Similarities and scores are float32.

Caching (:func:`build_negative_bank`): encoding ~70k prompts (CSP: ~400k) is the expensive part and
depends only on the text tower's weights, the lexicon and the prompt recipe, so the candidate
features are written once per (text-tower SHA-256, lexicon SHA-256, recipe, device type); the
selection (a ``[N, K]`` matmul and a quantile) and the groups are written per (candidates, SHA-256 of
the ID text features, selection parameters). A new prompt checkpoint or SeTAR setting therefore
re-selects from the cached candidates, and re-scoring cached image features only needs the text side.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from locoop.engine.fileio import atomic_torch_save
from locoop.ood.lexicon import Lexicon

__all__ = [
    "NegLabelParams", "NegativeLabelBank", "RECIPES", "CSP_NOUN_TEMPLATES", "CSP_ADJ_TEMPLATES", "CSP_MODIFIERS",
    "CSP_EXCLUDED_FILES", "candidate_prompts", "encode_prompt_ensembles", "recipe_id_text_features",
    "mining_quantiles", "select_negatives", "group_columns", "neglabel_score", "score_from_stats",
    "score_feature_batches",
    "text_fingerprint", "tensor_digest", "build_candidates", "build_negative_bank", "BANK_FORMAT",
    "params_from_cfg", "resolve_id_text", "NegativeLabelPlan", "NegativeLabelScorer", "NegativeLabelSpec",
    "ID_TEXT_MODES",
]

Device = Union[str, torch.device]
BANK_FORMAT = 1

# NegLabel's prompts (its config: prompt_idx_pos = prompt_idx_neg = 85 of its template list).
NEGLABEL_NOUN_TEMPLATE = "the nice {}"
NEGLABEL_ADJ_TEMPLATE = "This is a {} photo"

# CSP's prompt recipe (its class_names.py: the noun, superclass and adjective templates it uses).
CSP_NOUN_TEMPLATES = ("a close-up photo of the nice {}.", "a photo with the nice {}.", "a good photo with the nice {}.",
                      "a photo of the nice {}.", "{}", "the {}", "the good {}", "the nice {}")
CSP_MODIFIERS = ("{} environment", "{} space", "{} object", "{} scene", "{} place", "{} item", "{} area", "{} view",
                 "{} thing", "{} pattern", "{} structure", "{} landscape", "{} vista", "{} creature")
CSP_ADJ_TEMPLATES = ("{}", "a nice photo of {}", "a good photo of {}", "a close-up photo of {}")
CSP_EXCLUDED_FILES = ("noun.person.txt", "noun.quantity.txt", "noun.group.txt", "adj.pert.txt")


@dataclass(frozen=True)
class NegLabelParams:
    """Parameters of a negative-label bank; defaults are NegLabel's code (``custom_config/clip.py``).

    Attributes:
        recipe: ``neglabel`` or ``csp`` (how candidate prompts are built; see the module docstring).
        ratio: fraction of each part of speech kept (``neg_topk``, 0.15).
        percentile: quantile of a candidate's cosines to the ID labels used as its closeness
            (``pencentile``, 0.95); the smallest are kept.
        exclude_above: candidates whose largest cosine to an ID label exceeds this are never kept
            (CSP: 0.95; None = no such rule, NegLabel).
        ngroup: number of groups of the grouping strategy (100; <= 1: no grouping).
        group_seed: seed of the permutation that forms the groups (0).
        perm_device: device type the permutation is drawn on ("" = the evaluation device; the
            reference draws on CUDA, and CPU and CUDA generators give different permutations).
        temperature: ``tau`` of the score, on cosines (0.01 = the code's ``t = 1`` on ``100 * cos``).
        noun_templates / adj_templates: prompts of a noun / adjective (a word's features are the
            mean over them); CSP applies ``adj_templates`` to the conjugated phrase.
        adj_modifiers: CSP's superclass templates, one drawn per adjective (empty = none).
        modifier_seed: seed of Python's ``random`` for those draws (CSP: 0).
        id_templates: prompts of the recipe's own ID labels (:func:`recipe_id_text_features`).
        lexicon_exclude: lexicon files the recipe skips (CSP's ``txt_exclude``).
    """

    recipe: str = "neglabel"
    ratio: float = 0.15
    percentile: float = 0.95
    exclude_above: Optional[float] = None
    ngroup: int = 100
    group_seed: int = 0
    perm_device: str = ""
    temperature: float = 0.01
    noun_templates: Tuple[str, ...] = (NEGLABEL_NOUN_TEMPLATE,)
    adj_templates: Tuple[str, ...] = (NEGLABEL_ADJ_TEMPLATE,)
    adj_modifiers: Tuple[str, ...] = ()
    modifier_seed: int = 0
    id_templates: Tuple[str, ...] = (NEGLABEL_NOUN_TEMPLATE,)
    lexicon_exclude: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown negative-label recipe {self.recipe!r}; choose one of {list(RECIPES)}")
        if not (0.0 < float(self.ratio) <= 1.0):
            raise ValueError(f"ratio (fraction of candidates kept) must be in (0, 1], got {self.ratio}")
        if not (0.0 <= float(self.percentile) <= 1.0):
            raise ValueError(f"percentile must be a quantile level in [0, 1], got {self.percentile}")
        t = float(self.temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if int(self.ngroup) != self.ngroup:
            raise ValueError(f"ngroup must be an integer, got {self.ngroup}")
        for name in ("noun_templates", "adj_templates", "id_templates", "adj_modifiers"):
            templates = getattr(self, name)
            if isinstance(templates, str):
                raise ValueError(f"{name} must be a list of templates, got the string {templates!r}")
            bad = [t for t in templates if "{}" not in t]
            if bad or (not templates and name != "adj_modifiers"):
                raise ValueError(f"{name} must be non-empty templates with '{{}}' for the word, got {list(templates)}")

    @classmethod
    def for_recipe(cls, recipe: str = "neglabel", **overrides: Any) -> "NegLabelParams":
        """The parameters of a paper's code (``neglabel`` or ``csp``), with ``overrides``."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown negative-label recipe {recipe!r}; choose one of {list(RECIPES)}")
        base = dict(RECIPES[recipe])
        base.update(overrides)
        base = {k: tuple(v) if isinstance(v, list) else v for k, v in base.items()}
        return cls(recipe=recipe, **base)

    def as_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def text_part(self) -> Dict[str, Any]:
        """The parameters the candidate features depend on."""
        d = self.as_dict()
        return {k: d[k] for k in ("recipe", "noun_templates", "adj_templates", "adj_modifiers", "modifier_seed",
                                  "lexicon_exclude")}


RECIPES: Dict[str, Dict[str, Any]] = {
    "neglabel": {},
    "csp": {"exclude_above": 0.95, "noun_templates": CSP_NOUN_TEMPLATES, "adj_templates": CSP_ADJ_TEMPLATES,
            "adj_modifiers": CSP_MODIFIERS, "modifier_seed": 0, "id_templates": CSP_NOUN_TEMPLATES,
            "lexicon_exclude": CSP_EXCLUDED_FILES},
}


# ------------------------------------------------------------------------------------ prompts
def candidate_prompts(lexicon: Lexicon, params: NegLabelParams) -> Tuple[List[str], List[str], List[List[str]]]:
    """Labels, parts of speech and prompt ensembles of the candidate negative labels.

    Returns:
        ``(labels, pos, prompts)``: per candidate its label text (the word, or CSP's conjugated
        phrase), ``noun``/``adj``, and the prompts whose mean feature represents it.

    Raises:
        ValueError: the lexicon was read with other excluded files than the recipe needs.
    """
    skipped = {os.path.basename(f) for f in lexicon.files}
    clash = [f for f in params.lexicon_exclude if f in skipped]
    if clash:
        raise ValueError(f"recipe {params.recipe!r} excludes {clash}, but the lexicon read them; read it with "
                         f"read_lexicon(path, exclude={list(params.lexicon_exclude)})")
    rng = random.Random(params.modifier_seed)
    labels, pos, prompts = [], [], []
    for word, part in zip(lexicon.words, lexicon.pos):
        if part == "adj":
            label = rng.choice(params.adj_modifiers).format(word) if params.adj_modifiers else word
            ens = [t.format(label) for t in params.adj_templates]
        else:
            label = word
            ens = [t.format(word) for t in params.noun_templates]
        labels.append(label)
        pos.append(part)
        prompts.append(ens)
    return labels, pos, prompts


@torch.no_grad()
def encode_prompt_ensembles(clip_model: torch.nn.Module, ensembles: Sequence[Sequence[str]],
                            device: Optional[Device] = None, batch_size: int = 1000, reduce_in_float32: bool = False,
                            progress: bool = False, desc: str = "text") -> torch.Tensor:
    """Normalised features ``[N, D]`` (float32, CPU) of N prompt ensembles: mean of raw features, then L2.

    Unlike :func:`locoop.trainers.prompt_learner.zero_shot_text_features` (CLIP's ensembling:
    normalise each prompt, average, normalise) this averages the *raw* encoder outputs, as the
    NegLabel/CSP code does; with one prompt per ensemble both are the plain normalised feature.

    Args:
        clip_model: CLIP model (``encode_text``, ``context_length``, ``token_embedding``).
        ensembles: per item, its prompts (same count within one call's parts is not required).
        device: where to encode (default: the model's device).
        batch_size: prompts per forward pass (whole ensembles are kept together).
        reduce_in_float32: average and normalise in float32 (the recipes' ID prompts) instead of the
            model's output dtype (their candidate prompts).
        progress: show a tqdm bar.
        desc: its label.

    Raises:
        ValueError: an empty ensemble.
        RuntimeError: a prompt longer than the context length (from the tokenizer).
    """
    import clip
    from tqdm import tqdm

    if any(len(e) == 0 for e in ensembles):
        raise ValueError("every candidate needs at least one prompt")
    device = torch.device(device) if device is not None else clip_model.token_embedding.weight.device
    ctx = int(getattr(clip_model, "context_length", 77))
    out: List[torch.Tensor] = []
    start = 0
    bar = tqdm(total=len(ensembles), desc=desc, disable=not progress, leave=False)
    while start < len(ensembles):
        stop, n_prompts = start, 0
        while stop < len(ensembles) and (stop == start or n_prompts + len(ensembles[stop]) <= batch_size):
            n_prompts += len(ensembles[stop])
            stop += 1
        flat = [p for e in ensembles[start:stop] for p in e]
        feats = clip_model.encode_text(clip.tokenize(flat, context_length=ctx).to(device))
        if reduce_in_float32:
            feats = feats.float()
        pos = 0
        for e in ensembles[start:stop]:
            f = feats[pos:pos + len(e)]
            pos += len(e)
            f = f.mean(dim=0) if len(e) > 1 else f[0]
            out.append((f / f.norm(dim=-1, keepdim=True)).float().cpu())
        bar.update(stop - start)
        start = stop
    bar.close()
    return torch.stack(out) if out else torch.empty(0, 0)


def recipe_id_text_features(clip_model: torch.nn.Module, classnames: Sequence[str], params: NegLabelParams,
                            device: Optional[Device] = None) -> torch.Tensor:
    """The ID label features a recipe's code uses (``[C, D]`` float32): ``id_templates`` per class,
    raw mean in float32, normalised. NegLabel: "the nice {}"; CSP: its 8 noun prompts."""
    names = [c.replace("_", " ") for c in classnames]
    return encode_prompt_ensembles(clip_model, [[t.format(c) for t in params.id_templates] for c in names],
                                   device=device, reduce_in_float32=True)


# ------------------------------------------------------------------------------------ NegMining
@torch.no_grad()
def mining_quantiles(candidates: torch.Tensor, id_features: torch.Tensor, percentile: float = 0.95,
                     exclude_above: Optional[float] = None, chunk: int = 1000) -> torch.Tensor:
    """Per candidate, the ``percentile`` quantile (linear interpolation) of its cosines to the ID labels.

    Args:
        candidates: ``[N, D]`` normalised candidate features.
        id_features: ``[K, D]`` normalised ID label features.
        percentile: quantile level (0.95).
        exclude_above: set the value to 1 when the largest cosine exceeds this (CSP; None: off).
        chunk: candidates per step (bounds the ``chunk x K`` temporary; the result does not depend on it).

    Returns:
        float32 ``[N]`` on the CPU (smaller = farther from the ID labels).
    """
    ids = id_features.float()
    out = []
    # torch.quantile refuses inputs above 2**24 elements.
    chunk = max(1, min(int(chunk), (1 << 24) // max(1, ids.shape[0])))
    for lo in range(0, candidates.shape[0], chunk):
        sim = candidates[lo:lo + chunk].to(ids.device, torch.float32) @ ids.t()
        q = torch.quantile(sim, q=float(percentile), dim=-1)
        if exclude_above is not None:
            q[sim.max(dim=-1).values > float(exclude_above)] = 1.0
        out.append(q.cpu())
    return torch.cat(out) if out else torch.empty(0)


def select_negatives(quantiles: torch.Tensor, pos: Sequence[str], ratio: float = 0.15) -> torch.Tensor:
    """Indices of the negative labels: per part of speech the ``int(n * ratio)`` smallest quantiles.

    Returns:
        int64 indices into the candidates: the kept nouns by increasing quantile, then the kept
        adjectives likewise (the code's bank order; ties keep candidate order).
    """
    if len(pos) != quantiles.shape[0]:
        raise ValueError(f"{quantiles.shape[0]} quantiles but {len(pos)} parts of speech")
    keep = []
    for part in ("noun", "adj"):
        idx = torch.tensor([i for i, p in enumerate(pos) if p == part], dtype=torch.long)
        if idx.numel() == 0:
            continue
        order = torch.argsort(quantiles[idx], stable=True)
        keep.append(idx[order[: int(idx.numel() * float(ratio))]])
    return torch.cat(keep) if keep else torch.empty(0, dtype=torch.long)


def group_columns(num_negatives: int, ngroup: int = 100, seed: int = 0,
                  device: Device = "cpu") -> Optional[torch.Tensor]:
    """Columns of the negative bank in each group of the grouping strategy (``[ngroup, m]`` int64, CPU).

    The last ``num_negatives mod ngroup`` negatives are dropped, the rest permuted by
    ``torch.randperm`` from a generator seeded with ``seed`` on ``device`` and cut into ``ngroup``
    consecutive groups of ``m = num_negatives // ngroup``. None when ``ngroup <= 1`` (no grouping).

    Raises:
        ValueError: fewer negatives than groups.
    """
    ngroup = int(ngroup)
    if ngroup <= 1:
        return None
    m = int(num_negatives) // ngroup
    if m < 1:
        raise ValueError(f"{num_negatives} negative labels cannot form {ngroup} groups; lower the number of groups "
                         "(OOD.NEGLABEL.NGROUP) or use a larger lexicon / ratio")
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))
    perm = torch.randperm(m * ngroup, generator=gen, device=dev)
    return perm.view(ngroup, m).cpu()


# ------------------------------------------------------------------------------------ score
def neglabel_score(id_cos: torch.Tensor, neg_cos: torch.Tensor, temperature: float = 0.01,
                   groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """NegLabel score (higher = more ID) of a chunk of images.

    ``S = sum_k exp(id_k / tau) / (sum_k exp(id_k / tau) + sum_j exp(neg_j / tau))`` computed as
    ``sigmoid(LSE(id / tau) - LSE(neg / tau))``; with ``groups`` the mean over groups of ``S`` with
    each group's negatives (see the module docstring).

    Args:
        id_cos: ``[n, K]`` cosines to the ID labels.
        neg_cos: ``[n, M]`` cosines to the negative labels (bank order).
        temperature: ``tau`` (0.01).
        groups: ``[G, m]`` bank columns per group (:func:`group_columns`), or None.

    Returns:
        float32 ``[n]``.
    """
    if id_cos.ndim != 2 or neg_cos.ndim != 2 or id_cos.shape[0] != neg_cos.shape[0]:
        raise ValueError(f"id_cos [n, K] and neg_cos [n, M] must have the same rows, got {tuple(id_cos.shape)} "
                         f"and {tuple(neg_cos.shape)}")
    scale = 1.0 / float(temperature)
    lse_id = torch.logsumexp(id_cos.float() * scale, dim=-1)
    neg = neg_cos.float()
    if groups is None:
        return torch.sigmoid(lse_id - torch.logsumexp(neg * scale, dim=-1))
    g = groups.to(neg.device)
    if g.numel() and int(g.max()) >= neg.shape[1]:
        raise ValueError(f"groups index column {int(g.max())} but neg_cos has {neg.shape[1]} columns")
    lse_neg = torch.logsumexp(neg[:, g] * scale, dim=-1)  # [n, G]
    return torch.sigmoid(lse_id.unsqueeze(-1) - lse_neg).mean(dim=-1)


def score_from_stats(stats: Any) -> torch.Tensor:
    """Registered-score adapter over a chunk of statistics: ``stats.neg_cos`` ``[n, M]`` (cosines to the
    bank), ``stats.neg_bank`` (a :class:`NegativeLabelBank`: temperature, groups) and the ID cosines
    ``stats.neg_id_cos`` ``[n, K]`` when the negative-label score uses its own ID prompts (the
    recipe's, zero-shot), else ``stats.global_cos`` (the trainer's, e.g. LoCoOp's learned prompts)."""
    bank = stats.neg_bank
    id_cos = getattr(stats, "neg_id_cos", None)
    id_cos = stats.global_cos if id_cos is None else id_cos
    return neglabel_score(id_cos, stats.neg_cos, bank.params.temperature, bank.groups)


@torch.no_grad()
def score_feature_batches(batches: Any, id_text_features: torch.Tensor, bank: "NegativeLabelBank",
                          device: Optional[Device] = None, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """NegLabel scores of image features streamed batch by batch (the runner's or the feature cache's
    :class:`~locoop.ood.features.FeatureSet` batches): only global features are read.

    Args:
        batches: iterable of objects with ``global_feats`` ``[n, D]`` (normalised).
        id_text_features: ``[K, D]`` ID label features (normalised here).
        bank: the negative labels.
        device: where to compute (default: the text features' device).
        chunk_elements: bound on rows x (K + M) per similarity chunk.

    Returns:
        float32 ``[N]`` on the CPU, in batch order.
    """
    ids = id_text_features.detach().float()
    dev = torch.device(device) if device is not None else ids.device
    ids = (ids / ids.norm(dim=-1, keepdim=True)).to(dev)
    text = torch.cat([ids, bank.features.to(dev, torch.float32)]).t().contiguous()
    k = ids.shape[0]
    step = max(1, int(chunk_elements) // text.shape[1])
    out = []
    for batch in batches:
        g = batch.global_feats
        for lo in range(0, g.shape[0], step):
            sim = g[lo:lo + step].to(dev, torch.float32) @ text
            out.append(bank.score(sim[:, :k], sim[:, k:]).cpu())
    return torch.cat(out) if out else torch.empty(0)


# ------------------------------------------------------------------------------------ keys
def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (e.g. the ID text features a bank was selected for)."""
    from locoop.engine.provenance import weights_sha256

    return weights_sha256({"t": t})


def text_fingerprint(clip_model: torch.nn.Module) -> str:
    """SHA-256 of every weight outside the image encoder (``visual.*``): the text tower, as the
    feature cache keys the image tower. A pruned, adapted or fp16 text tower gives another key."""
    from locoop.engine.provenance import weights_sha256

    text = {name: t for name, t in clip_model.state_dict().items() if not name.startswith("visual.")}
    return weights_sha256(text, header=f"{type(clip_model).__module__}.{type(clip_model).__qualname__}")


def _digest(payload: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _load(path: Path, key: str) -> Optional[Dict[str, Any]]:
    """A cache file's content when it exists and carries ``key``; None otherwise (reason printed by caller)."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a corrupt or foreign file is ignored, never trusted
        return None
    if not isinstance(obj, dict) or obj.get("format") != BANK_FORMAT or obj.get("key") != key:
        return None
    return obj


# ------------------------------------------------------------------------------------ bank
@dataclass
class NegativeLabelBank:
    """Selected negative labels: what a negative-label score needs besides the image features.

    Attributes:
        features: ``[M, D]`` float32 normalised text features, in bank order (nouns, then adjectives).
        labels: the label text of each (word, or CSP's conjugated phrase).
        pos: ``noun`` / ``adj`` of each.
        groups: ``[G, m]`` columns per group, or None (no grouping).
        params: the parameters.
        key: SHA-256 naming this bank (candidates + ID features + selection parameters).
        meta: provenance (lexicon, counts, text-tower and ID-feature hashes, devices) for results files.
    """

    features: torch.Tensor
    labels: List[str]
    pos: List[str]
    groups: Optional[torch.Tensor]
    params: NegLabelParams
    key: str
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def score(self, id_cos: torch.Tensor, neg_cos: torch.Tensor) -> torch.Tensor:
        """:func:`neglabel_score` with this bank's temperature and groups."""
        return neglabel_score(id_cos, neg_cos, self.params.temperature, self.groups)

    def to_state(self) -> Dict[str, Any]:
        return {"format": BANK_FORMAT, "key": self.key, "features": self.features.contiguous(),
                "labels": list(self.labels), "pos": list(self.pos), "groups": self.groups,
                "params_json": json.dumps(self.params.as_dict(), sort_keys=True),
                "meta_json": json.dumps(self.meta, sort_keys=True, default=str)}

    @classmethod
    def from_state(cls, obj: Dict[str, Any]) -> "NegativeLabelBank":
        params = NegLabelParams(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in json.loads(obj["params_json"]).items()})
        return cls(obj["features"], list(obj["labels"]), list(obj["pos"]), obj["groups"], params, obj["key"],
                   json.loads(obj["meta_json"]))


def build_candidates(clip_model: torch.nn.Module, lexicon: Lexicon, params: NegLabelParams,
                     device: Optional[Device] = None, batch_size: int = 1000,
                     progress: bool = False) -> Tuple[torch.Tensor, List[str], List[str]]:
    """Encode every candidate of ``lexicon`` with the recipe's prompts: ``(features [N, D], labels, pos)``."""
    labels, pos, prompts = candidate_prompts(lexicon, params)
    feats = encode_prompt_ensembles(clip_model, prompts, device=device, batch_size=batch_size,
                                    progress=progress, desc="negative-label candidates")
    return feats, labels, pos


def build_negative_bank(clip_model: torch.nn.Module, id_text_features: torch.Tensor, lexicon: Lexicon,
                        params: Optional[NegLabelParams] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                        device: Optional[Device] = None, batch_size: int = 1000, verbose: bool = True,
                        progress: Optional[bool] = None) -> NegativeLabelBank:
    """Negative labels for ``id_text_features``, from the cache when possible.

    Args:
        clip_model: the CLIP model whose text tower encodes the candidates (in eval mode).
        id_text_features: ``[K, D]`` ID label features the score uses (a trainer's, or
            :func:`recipe_id_text_features`); normalised here.
        lexicon: the candidate words.
        params: :class:`NegLabelParams` (default NegLabel's).
        cache_dir: folder for ``neglabel/candidates-*.pt`` and ``neglabel/bank-*.pt`` (None: no cache).
        device: where to encode and select (default: the model's device); also the permutation's
            device when ``params.perm_device`` is "".
        batch_size: prompts per text-encoder pass.
        verbose: print what is computed or reused.
        progress: tqdm bar while encoding (None: when stderr is a terminal).

    Raises:
        ValueError: bad features, no candidate selected, or fewer negatives than groups.
    """
    import sys

    params = params or NegLabelParams()
    if not isinstance(id_text_features, torch.Tensor) or id_text_features.ndim != 2 or id_text_features.shape[0] < 1:
        raise ValueError("id_text_features must be a [K, D] tensor of ID label features")
    device = torch.device(device) if device is not None else clip_model.token_embedding.weight.device
    perm_device = params.perm_device or device.type
    progress = sys.stderr.isatty() if progress is None else progress
    say = print if verbose else (lambda *a, **k: None)
    ids = id_text_features.detach().float()
    ids = ids / ids.norm(dim=-1, keepdim=True)

    text_fp = text_fingerprint(clip_model)
    cand_key = _digest({"format": BANK_FORMAT, "text": text_fp, "lexicon": lexicon.sha256, "device": device.type,
                        "dtype": str(clip_model.token_embedding.weight.dtype), **params.text_part()})
    sel = {k: v for k, v in params.as_dict().items() if k not in params.text_part()}
    sel["perm_device"] = perm_device
    bank_key = _digest({"candidates": cand_key, "id": tensor_digest(ids.cpu()), **sel})
    folder = Path(cache_dir) / "neglabel" if cache_dir is not None else None

    if folder is not None:
        hit = _load(folder / f"bank-{bank_key[:20]}.pt", bank_key)
        if hit is not None:
            bank = NegativeLabelBank.from_state(hit)
            say(f"Negative labels: {len(bank):,} from the cache ({folder / f'bank-{bank_key[:20]}.pt'})")
            return bank

    cand = _load(folder / f"candidates-{cand_key[:20]}.pt", cand_key) if folder is not None else None
    if cand is not None:
        feats, labels, pos = cand["features"], list(cand["labels"]), list(cand["pos"])
        say(f"Negative-label candidates: {len(labels):,} text features from the cache")
    else:
        say(f"Encoding {len(lexicon):,} negative-label candidates ({params.recipe} prompts; {lexicon.describe()})")
        feats, labels, pos = build_candidates(clip_model, lexicon, params, device, batch_size, progress)
        if folder is not None:
            atomic_torch_save({"format": BANK_FORMAT, "key": cand_key, "features": feats, "labels": labels,
                                "pos": pos}, folder / f"candidates-{cand_key[:20]}.pt")
    if feats.shape[1] != ids.shape[1]:
        raise ValueError(f"ID text features have dimension {ids.shape[1]} but the text tower gives {feats.shape[1]}")

    q = mining_quantiles(feats.to(device), ids.to(device), params.percentile, params.exclude_above)
    keep = select_negatives(q, pos, params.ratio)
    if keep.numel() == 0:
        raise ValueError(f"no negative label selected from {len(labels)} candidates with ratio {params.ratio}; "
                         "use a larger lexicon or ratio")
    groups = group_columns(keep.numel(), params.ngroup, params.group_seed, perm_device)
    counts = {p: sum(1 for i in keep.tolist() if pos[i] == p) for p in ("noun", "adj")}
    meta = {"recipe": params.recipe, "lexicon": lexicon.source, "lexicon_format": lexicon.format,
            "lexicon_sha256": lexicon.sha256, "lexicon_counts": lexicon.counts(), "num_candidates": len(labels),
            "num_negatives": int(keep.numel()), "selected_counts": counts, "text_sha256": text_fp,
            "id_features_sha256": tensor_digest(ids.cpu()), "perm_device": perm_device,
            "num_groups": 0 if groups is None else int(groups.shape[0]),
            "group_size": 0 if groups is None else int(groups.shape[1]),
            "dropped_by_grouping": 0 if groups is None else int(keep.numel() - groups.numel())}
    bank = NegativeLabelBank(feats[keep].contiguous(), [labels[i] for i in keep.tolist()],
                             [pos[i] for i in keep.tolist()], groups, replace(params, perm_device=perm_device),
                             bank_key, meta)
    say(f"Negative labels: {len(bank):,} selected ({counts['noun']:,} nouns, {counts['adj']:,} adjectives) of "
        f"{len(labels):,} candidates" + (f", {meta['num_groups']} groups of {meta['group_size']}" if groups is not None
                                         else ""))
    if folder is not None:
        atomic_torch_save(bank.to_state(), folder / f"bank-{bank_key[:20]}.pt")
    return bank


# ------------------------------------------------------------------------------------ the runner's text side
ID_TEXT_MODES = ("auto", "recipe", "trainer")


def params_from_cfg(cfg: Any, recipe: str) -> NegLabelParams:
    """The parameters of ``recipe`` (``neglabel`` / ``csp``) with ``OOD.NEGLABEL.*`` (ratio, percentile, groups,
    their seed and device, temperature); the prompts and exclusions stay the recipe's."""
    c = cfg.OOD.NEGLABEL
    return NegLabelParams.for_recipe(recipe, ratio=float(c.RATIO), percentile=float(c.PERCENTILE),
                                     ngroup=int(c.NGROUP), group_seed=int(c.GROUP_SEED),
                                     perm_device=str(c.PERM_DEVICE), temperature=float(c.T))


def _learns_prompts(trainer: str) -> bool:
    """True for trainers whose class prompts are learned (LoCoOp and its subclasses, CoOp)."""
    if not trainer:
        return False
    from locoop.engine.registry import get_trainer_class

    try:
        cls, base = get_trainer_class(trainer), get_trainer_class("LoCoOp")
    except (KeyError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def resolve_id_text(cfg: Any) -> str:
    """``OOD.NEGLABEL.ID_TEXT`` resolved: ``recipe`` or ``trainer`` (``auto``: ``trainer`` for learned prompts)."""
    mode = str(cfg.OOD.NEGLABEL.ID_TEXT)
    if mode not in ID_TEXT_MODES:
        raise ValueError(f"OOD.NEGLABEL.ID_TEXT = {mode!r} is not valid; choose one of {list(ID_TEXT_MODES)}")
    if mode != "auto":
        return mode
    return "trainer" if _learns_prompts(str(cfg.TRAINER.NAME)) else "recipe"


@dataclass
class NegativeLabelPlan:
    """What :meth:`NegativeLabelSpec.check` read and decided before any image is encoded."""

    score: str
    params: NegLabelParams
    lexicon: Lexicon
    id_text: str
    text_batch: int
    exclusions_applied: Optional[bool]


@dataclass
class NegativeLabelScorer:
    """A negative-label score's text side in an evaluation (a :class:`locoop.ood.textbank.TextBank`).

    ``features`` are the columns appended to the class cosines: the recipe's own ID label features
    followed by the negative labels (``id_text = "recipe"``), or the negative labels alone, scored
    against the trainer's class cosines (``id_text = "trainer"``).
    """

    score_name: str
    bank: NegativeLabelBank
    id_text: str
    id_features: Optional[torch.Tensor] = None
    notes: List[str] = field(default_factory=list)
    exclusions_applied: Optional[bool] = None

    def __post_init__(self) -> None:
        parts = [self.id_features.float()] if self.id_features is not None else []
        self.features = torch.cat(parts + [self.bank.features.float()]).contiguous()

    @property
    def labels(self) -> List[str]:
        return list(self.bank.labels)

    @property
    def pos(self) -> List[str]:
        return list(self.bank.pos)

    @property
    def groups(self) -> Optional[torch.Tensor]:
        return self.bank.groups

    def score(self, class_cos: torch.Tensor, bank_cos: torch.Tensor) -> torch.Tensor:
        """The grouped NegLabel score of a chunk (see :func:`neglabel_score`)."""
        if self.id_features is None:
            return self.bank.score(class_cos, bank_cos)
        k = int(self.id_features.shape[0])
        return self.bank.score(bank_cos[:, :k], bank_cos[:, k:])

    def describe(self) -> Dict[str, Any]:
        out = {"score": self.score_name, "id_text": self.id_text, "bank_key": self.bank.key,
               "params": self.bank.params.as_dict(), **self.bank.meta}
        if self.id_features is not None:
            out["id_prompts"] = list(self.bank.params.id_templates)
        if self.exclusions_applied is not None:
            out["lexicon_exclude_applied"] = self.exclusions_applied
        if self.notes:
            out["notes"] = list(self.notes)
        return out


class NegativeLabelSpec:
    """The text bank of a negative-label score (:class:`locoop.ood.textbank.TextBankSpec`): ``recipe`` is
    ``neglabel`` or ``csp``; the settings are ``OOD.NEGLABEL.*``."""

    what = "negative labels"

    def __init__(self, score: str, recipe: str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown negative-label recipe {recipe!r}; choose one of {list(RECIPES)}")
        self.score, self.recipe = score, recipe

    def check(self, cfg: Any) -> NegativeLabelPlan:
        """Read the lexicon and validate the parameters (before any model or image).

        Raises:
            ValueError / FileNotFoundError: no or a bad ``OOD.NEGLABEL.LEXICON`` (the layouts listed), bad values.
        """
        from locoop.ood.lexicon import LEXICON_LAYOUTS, detect_format, read_lexicon

        c = cfg.OOD.NEGLABEL
        path = str(c.LEXICON or "").strip()
        if not path:
            raise ValueError(f"score {self.score} needs a word list to mine its negative labels from: set "
                             f"OOD.NEGLABEL.LEXICON (see the README, 'Negative-label scores').\n{LEXICON_LAYOUTS}")
        try:
            params = params_from_cfg(cfg, self.recipe)
        except ValueError as e:
            raise ValueError(f"OOD.NEGLABEL: {e}") from None
        fmt = str(c.LEXICON_FORMAT).lower()
        try:
            resolved = detect_format(path) if fmt == "auto" else fmt
            applies = resolved == "neglabel" and bool(params.lexicon_exclude)
            lexicon = read_lexicon(path, resolved, exclude=params.lexicon_exclude if applies else ())
        except FileNotFoundError as e:
            raise FileNotFoundError(f"OOD.NEGLABEL.LEXICON: {e}") from None
        except ValueError as e:
            raise ValueError(f"OOD.NEGLABEL.LEXICON: {e}") from None
        return NegativeLabelPlan(self.score, params, lexicon, resolve_id_text(cfg), int(c.TEXT_BATCH),
                                 applies if params.lexicon_exclude else None)

    def build(self, plan: NegativeLabelPlan, *, clip_model: torch.nn.Module, class_text: torch.Tensor,
              classnames: Sequence[str], device: torch.device, cache_dir: Optional[str],
              verbose: bool) -> NegativeLabelScorer:
        """The bank for this model's text tower and ID labels, from the cache when possible."""
        say = print if verbose else (lambda *a, **k: None)
        notes = []
        if plan.exclusions_applied is False:
            notes.append(f"{self.recipe} excludes the lexicon files {list(plan.params.lexicon_exclude)}, which a "
                         f"{plan.lexicon.format} lexicon does not have: no word was excluded")
            say(f"{self.score}: note: {notes[-1]}")
        if plan.id_text == "recipe":
            ids = recipe_id_text_features(clip_model, classnames, plan.params, device=device)
            say(f"{self.score}: ID labels from the recipe's prompts {list(plan.params.id_templates)} "
                f"({len(classnames)} classes)")
        else:
            ids = class_text.detach().float()
            ids = ids / ids.norm(dim=-1, keepdim=True)
            say(f"{self.score}: ID labels = the evaluated class text features (OOD.NEGLABEL.ID_TEXT trainer)")
        bank = build_negative_bank(clip_model, ids, plan.lexicon, plan.params, cache_dir=cache_dir, device=device,
                                   batch_size=plan.text_batch, verbose=verbose)
        return NegativeLabelScorer(self.score, bank, plan.id_text, ids.cpu() if plan.id_text == "recipe" else None,
                                   notes, plan.exclusions_applied)
