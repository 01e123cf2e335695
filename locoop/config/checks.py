"""Value checks of the config, declared once per section (choices, ranges, required keys).

Every rule names its key; a failing rule raises :class:`~locoop.config.ConfigError` (a
``ValueError``) in one style: the key, the bad value and what is valid, e.g.
``TRAINER.LOCOOP.PREC = 'bf16' is not valid; choose one of ['fp16', 'fp32', 'amp']``.

Two kinds of rule:

* **value rules** say what a key may hold wherever it is used (a choice, a range). All of them run
  when the config is built (:func:`locoop.config.setup_cfg` calls :func:`validate_cfg`), so a typo
  fails before anything is loaded, whatever the command.
* **required rules** say that a key must be set (``MODEL.BACKBONE.NAME``); they run where the value
  is needed: a trainer checks the sections it declares (``SimpleTrainer.CFG_SECTIONS``) when it is
  created, SeTAR's commands call :func:`check_setar` / :func:`check_setar_ft`.

Adding a key with a constrained value means adding one rule to its section below (see
docs/ARCHITECTURE.md, "Configuration").
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = ["Rule", "choice", "flag", "at_least", "in_range", "rule", "SECTIONS", "VALUE_SECTIONS",
           "FT_PRECISIONS", "FT_TRAIN_SPLITS", "FT_LR_STEPS", "check_sections", "validate_cfg", "check_setar",
           "check_setar_ft", "checked_keys", "lookup"]


def _error(message: str) -> Exception:
    from . import ConfigError

    return ConfigError(message)


def lookup(cfg: Any, key: str) -> Any:
    """The value of dotted ``key`` in ``cfg`` (KeyError when a part is missing)."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


@dataclass(frozen=True)
class Rule:
    """One check of one key: ``check(value, cfg)`` returns an error message or None.

    Attributes:
        key: the dotted key (also the start of every message).
        check: the test.
        required: True for "must be set" rules, which run only where the value is needed.
    """

    key: str
    check: Callable[[Any, Any], Optional[str]]
    required: bool = False

    def __call__(self, cfg: Any) -> None:
        try:
            value = lookup(cfg, self.key)
        except KeyError:  # a config without this section (e.g. a partial test config)
            return
        message = self.check(value, cfg)
        if message:
            raise _error(message)


def choice(key: str, choices: Union[Sequence[Any], Callable[[], Sequence[Any]]], ignore_case: bool = False) -> Rule:
    """``key`` must be one of ``choices`` (a sequence, or a function giving it: read from the module
    that defines the vocabulary, only when the rule runs); ``ignore_case`` for string choices."""

    def check(value: Any, cfg: Any) -> Optional[str]:
        valid = tuple(choices() if callable(choices) else choices)
        if value in valid or (ignore_case and str(value).lower() in valid):
            return None
        close = difflib.get_close_matches(str(value), [str(c) for c in valid], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{key} = {value!r} is not valid; choose one of {list(valid)}.{hint}"

    return Rule(key, check)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def in_range(key: str, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
             high_open: bool = False, hint: str = "") -> Rule:
    """``key`` must be a finite number in the interval (``None``: unbounded on that side)."""
    lo_b, hi_b = "(" if low_open else "[", ")" if high_open else "]"
    lo_t = "-inf" if low is None else f"{low:g}"
    hi_t = "inf" if high is None else f"{high:g}"

    def check(value: Any, cfg: Any) -> Optional[str]:
        f = _number(value)
        ok = f is not None
        if ok and low is not None:
            ok = f > low if low_open else f >= low
        if ok and high is not None:
            ok = f < high if high_open else f <= high
        if ok:
            return None
        if high is None and not low_open:
            want = f"must be >= {lo_t}"
        elif high is None:
            want = f"must be > {lo_t}"
        else:
            want = f"must be in {lo_b}{lo_t}, {hi_t}{hi_b}"
        return f"{key} = {value!r} {want}" + (f" ({hint})" if hint else "") + "."

    return Rule(key, check)


def at_least(key: str, low: float, hint: str = "") -> Rule:
    """``key`` must be a number >= ``low``."""
    return in_range(key, low=low, hint=hint)


def rule(key: str, check: Callable[[Any, Any], Optional[str]], required_: bool = False) -> Rule:
    """A rule with its own test (``check(value, cfg) -> message or None``); ``required_``: a
    "must be set" rule (see the module docstring)."""
    return Rule(key, check, required_)


# ------------------------------------------------------------------------------------ special tests
def _n_ctx(value: Any, cfg: Any) -> Optional[str]:
    if str(cfg.TRAINER.LOCOOP.CTX_INIT or "") or (_number(value) is not None and int(value) >= 1):
        return None
    return f"TRAINER.LOCOOP.N_CTX = {value!r} must be >= 1 (or set TRAINER.LOCOOP.CTX_INIT)."


def _backbone_hint() -> str:
    import clip

    return (f"set it to a CLIP model name ({', '.join(clip.available_models())}) or the path of a checkpoint "
            "file/folder (--backbone)")


def _backbone(value: Any, cfg: Any) -> Optional[str]:
    if str(value or "").strip():
        return None
    return f"MODEL.BACKBONE.NAME is empty: {_backbone_hint()}"


def flag(key: str, hint: str = "") -> Rule:
    """``key`` must be a bool (``True`` / ``False``; 1 or 'yes' are refused rather than read as one)."""

    def check(value: Any, cfg: Any) -> Optional[str]:
        if isinstance(value, bool):
            return None
        return f"{key} = {value!r} is not valid; set True or False" + (f" ({hint})" if hint else "")

    return Rule(key, check)


def _template(key: str, hint: str = "", allow_empty: bool = False) -> Rule:
    """``key`` is a prompt template with exactly one ``{}`` for the class name ("" too if ``allow_empty``)."""

    def check(value: Any, cfg: Any) -> Optional[str]:
        if str(value).count("{}") == 1 or (allow_empty and str(value) == ""):
            return None
        return f"{key} must contain '{{}}' once for the class name, got {value!r}.{hint}"

    return Rule(key, check)


def _lambda_local(value: Any, cfg: Any) -> Optional[str]:
    from locoop.ood.scores import check_lambda_local

    try:
        check_lambda_local(value)
    except ValueError:
        return f"OOD.LAMBDA_LOCAL = {value!r} is not valid: it must be a finite number (GL-MCM's --lambda_local)."
    return None


def _benchmark(value: Any, cfg: Any) -> Optional[str]:
    from locoop.data.datasets.openood import OPENOOD_BENCHMARKS

    name = str(value or "").strip()
    if not name:
        return None
    if name.lower() not in OPENOOD_BENCHMARKS:
        valid = [""] + list(OPENOOD_BENCHMARKS)
        close = difflib.get_close_matches(name, valid, n=1)
        return (f"OOD.BENCHMARK = {value!r} is not valid; choose one of {valid} (\"\" = OOD folders)."
                + (f" Did you mean '{close[0]}'?" if close else ""))
    dataset = "OpenOODImageNet"
    if str(cfg.DATASET.NAME) != dataset:
        return (f"OOD.BENCHMARK = {value!r} reads its ID images from the benchmark's test_imagenet.txt, but "
                f"DATASET.NAME is {cfg.DATASET.NAME!r}; set DATASET.NAME {dataset} (as "
                "configs/benchmarks/openood_v1.5_imagenet.yaml does).")
    return None


def _bootstrap(value: Any, cfg: Any) -> Optional[str]:
    f = _number(value)
    if f is not None and f == int(f) and (int(f) == 0 or int(f) >= 2):
        return None
    return f"OOD.BOOTSTRAP = {value!r} is not valid: 0 (off) or the number of bootstrap replicates, >= 2 (e.g. 1000)."


def _lexicon_formats() -> Tuple[str, ...]:
    from locoop.ood.lexicon import LEXICON_FORMATS

    return ("auto",) + tuple(LEXICON_FORMATS)


def _setar_names():
    """The SeTAR vocabularies, from the modules that define them (imported only when checked)."""
    from locoop.setar.lowrank import PRUNE_TYPES
    from locoop.setar.search import CRITERIA, MODES, check_ratios
    from locoop.setar.searchers import check_weight_types, get_searcher

    return {"prune_types": PRUNE_TYPES, "criteria": tuple(CRITERIA), "modes": MODES, "check_ratios": check_ratios,
            "check_weight_types": check_weight_types, "get_searcher": get_searcher}


def _delegate(key: str, name: str) -> Rule:
    """A rule whose test is a validator of the SeTAR package (its ValueError message is kept)."""
    def check(value: Any, cfg: Any) -> Optional[str]:
        try:
            _setar_names()[name](list(value) if isinstance(value, (list, tuple)) else value)
        except ValueError as e:
            return f"{key} = {value!r} is not valid: {e}"
        return None

    return Rule(key, check)


def _ft_split(value: Any, cfg: Any) -> Optional[str]:
    if value == "val" and cfg.TEST.FINAL_MODEL == "best_val":
        return ("SETAR.FT.TRAIN_SPLIT val trains on the validation split, so TEST.FINAL_MODEL best_val would select "
                "on training images; use TEST.FINAL_MODEL last_step.")
    return None


def _precisions() -> Tuple[str, ...]:
    from locoop.engine.precision import PRECISIONS

    return PRECISIONS


def _class_token_positions() -> Tuple[str, ...]:
    from locoop.trainers.prompt_learner import CLASS_TOKEN_POSITIONS

    return tuple(CLASS_TOKEN_POSITIONS)


#: SeTAR+FT's precisions: fp16 weights would spoil the SVD split and the SGD updates of the adapters.
FT_PRECISIONS = ("fp32", "amp")
FT_TRAIN_SPLITS = ("train", "val")
FT_LR_STEPS = ("iter", "epoch")


# ------------------------------------------------------------------------------------ the sections
SECTIONS: Dict[str, Tuple[Rule, ...]] = {
    # Dassl's engine keys.
    "ENGINE": (
        choice("OPTIM.NAME", ("sgd", "adam", "adamw")),
        choice("OPTIM.LR_SCHEDULER", ("single_step", "multi_step", "cosine")),
        choice("OPTIM.WARMUP_TYPE", ("constant", "linear")),
        choice("TEST.FINAL_MODEL", ("last_step", "best_val")),
        choice("TEST.SPLIT", ("test", "val")),
        choice("INPUT.INTERPOLATION", ("bilinear", "bicubic", "nearest")),
        choice("DATASET.SUBSAMPLE_CLASSES", ("all", "base", "new")),
        at_least("DATASET.NUM_SHOTS", -1, "use -1 (all images) or K >= 1"),
        at_least("OPTIM.MAX_EPOCH", 0),
        at_least("TRAIN.PRINT_FREQ", 1),
        flag("TRAIN.SAVE_LAST", "True: model-last.pth.tar after every epoch, so a killed run resumes"),
        # Loading a prompt checkpoint made on another backbone / for other class names.
        flag("MODEL.ALLOW_OTHER_BACKBONE", "True: load a prompt checkpoint of another backbone with a warning"),
        flag("MODEL.ALLOW_OTHER_CLASSNAMES", "True: load a prompt checkpoint of other class names with a warning"),
    ),
    "MODEL.BACKBONE": (rule("MODEL.BACKBONE.NAME", _backbone, required_=True),),
    # LoCoOp / CoOp (also read by ZeroshotCLIP and the prompts of a LoCoOp run reused by SeTAR).
    "TRAINER.LOCOOP": (
        choice("TRAINER.LOCOOP.PREC", _precisions),
        choice("TRAINER.LOCOOP.CLASS_TOKEN_POSITION", _class_token_positions),
        rule("TRAINER.LOCOOP.N_CTX", _n_ctx),
        at_least("TRAINER.LOCOOP.LAMBDA", 0, "--lambda_value"),
        at_least("TRAINER.LOCOOP.TOPK", 1, "--topk"),
    ),
    # The OOD benchmark (score names and folders are checked by ood.runner.check_benchmark_inputs,
    # which sees the scores registered by then and the data root).
    "OOD": (
        in_range("OOD.T", low=0, low_open=True, hint="--T, the softmax temperature on the cosine"),
        choice("OOD.FPR_CONVENTION", ("mcm", "openood"), ignore_case=True),
        choice("OOD.CACHE_LOCAL_DTYPE", ("float16", "float32")),
        rule("OOD.LAMBDA_LOCAL", _lambda_local),
        rule("OOD.BENCHMARK", _benchmark),
        rule("OOD.BOOTSTRAP", _bootstrap),
        at_least("OOD.BOOTSTRAP_SEED", 0, "a seed of numpy.random.default_rng"),
    ),
    # The negative-label scores (NegLabel, CSP); the lexicon itself is read by the runner's checks.
    "OOD.NEGLABEL": (
        choice("OOD.NEGLABEL.LEXICON_FORMAT", _lexicon_formats),
        in_range("OOD.NEGLABEL.RATIO", 0, 1, low_open=True, hint="fraction of each part of speech kept"),
        in_range("OOD.NEGLABEL.PERCENTILE", 0, 1, hint="a quantile level"),
        at_least("OOD.NEGLABEL.NGROUP", 0, "<= 1: no grouping"),
        at_least("OOD.NEGLABEL.GROUP_SEED", 0),
        choice("OOD.NEGLABEL.PERM_DEVICE", ("", "cpu", "cuda")),
        in_range("OOD.NEGLABEL.T", low=0, low_open=True, hint="the score's temperature tau on cosines"),
        choice("OOD.NEGLABEL.ID_TEXT", ("auto", "recipe", "trainer")),
        at_least("OOD.NEGLABEL.TEXT_BATCH", 1),
    ),
    # Zero-shot CLIP's class prompt.
    "TRAINER.ZSCLIP": (_template("TRAINER.ZSCLIP.PROMPT_TEMPLATE", " (MCM / GL-MCM: 'a photo of a {}')"),),
    # SeTAR's search (the vocabularies come from locoop.setar).
    "SETAR": (
        _delegate("SETAR.SEARCHER", "get_searcher"),
        _delegate("SETAR.WEIGHT_TYPES", "check_weight_types"),
        _delegate("SETAR.RATIOS", "check_ratios"),
        choice("SETAR.PRUNE_TYPE", lambda: _setar_names()["prune_types"]),
        choice("SETAR.MODE", lambda: _setar_names()["modes"]),
        choice("SETAR.CRITERION", lambda: _setar_names()["criteria"]),
        at_least("SETAR.LAMBDA", 0),
        at_least("SETAR.TOPK", 1),
        at_least("SETAR.CACHE_GB", 0, "GiB of cached block inputs"),
        _template("SETAR.PROMPT_TEMPLATE"),
    ),
    # SeTAR+FT and the LoRA baseline.
    "SETAR.FT": (
        choice("SETAR.FT.PREC", FT_PRECISIONS),
        choice("SETAR.FT.TRAIN_SPLIT", FT_TRAIN_SPLITS),
        choice("SETAR.FT.LR_STEP", FT_LR_STEPS),
        at_least("SETAR.FT.LAMBDA", 0),
        at_least("SETAR.FT.TOPK", 1),
        in_range("SETAR.FT.LORA_DROPOUT", 0, 1, high_open=True),
        rule("SETAR.FT.TRAIN_SPLIT", _ft_split),
        _template("SETAR.FT.PROMPT_TEMPLATE", " ('' = SETAR.PROMPT_TEMPLATE; SeTAR's: 'a photo of a {}')",
                  allow_empty=True),
    ),
}

#: Sections whose value rules run whenever a config is built.
VALUE_SECTIONS = ("ENGINE", "TRAINER.LOCOOP", "TRAINER.ZSCLIP", "OOD", "OOD.NEGLABEL", "SETAR", "SETAR.FT")


def check_sections(cfg: Any, sections: Iterable[str], include_required: bool = True) -> None:
    """Run the rules of ``sections`` (their required rules too, unless ``include_required`` is False).

    Raises:
        ConfigError: the first failing rule (key, bad value, what is valid).
        KeyError: an unknown section name.
    """
    for name in sections:
        if name not in SECTIONS:
            raise KeyError(f"unknown config section {name!r}; sections with checks: {list(SECTIONS)}")
        for r in SECTIONS[name]:
            if include_required or not r.required:
                r(cfg)


def validate_cfg(cfg: Any) -> None:
    """Every value rule of every section (run by :func:`locoop.config.setup_cfg`).

    Raises:
        ConfigError: naming the key, the bad value and the valid choices or range.
    """
    check_sections(cfg, VALUE_SECTIONS, include_required=False)


def _check_searcher_backbone(cfg: Any) -> None:
    """A Swin-V2 backbone is searched by ``visual_only_swin`` (no W_p), a CLIP model by the other searchers."""
    from locoop.models.swinv2 import is_swinv2_backbone
    from locoop.setar.searchers import get_searcher, list_searchers

    swin = is_swinv2_backbone(str(getattr(cfg.MODEL.BACKBONE, "NAME", "") or ""))
    searcher = str(cfg.SETAR.SEARCHER)
    kind = get_searcher(searcher).backbone
    if swin and kind != "swin":
        fits = [n for n in list_searchers() if get_searcher(n).backbone == "swin"]
        raise _error(f"SETAR.SEARCHER {searcher!r} visits CLIP towers, but MODEL.BACKBONE.NAME "
                     f"{cfg.MODEL.BACKBONE.NAME!r} is a Swin-V2 classifier; use SETAR.SEARCHER {' or '.join(fits)}")
    if not swin and kind == "swin":
        raise _error(f"SETAR.SEARCHER {searcher} searches a Swin-V2 classifier, but MODEL.BACKBONE.NAME "
                     f"{cfg.MODEL.BACKBONE.NAME!r} is a CLIP model; use e.g. visual_text, or a Swin-V2 snapshot")
    if swin and not bool(cfg.SETAR.FREEZE_PROJ):
        raise _error("SETAR.FREEZE_PROJ False searches W_p, which a Swin-V2 classifier does not have (its classifier "
                     "is not searched); keep SETAR.FREEZE_PROJ True")


def check_setar(cfg: Any, search: bool) -> Dict[str, Any]:
    """The ``SETAR.*`` checks of ``setar-search``, before anything is loaded.

    Args:
        cfg: the config.
        search: a search will run (not only saved settings applied): a metric criterion then
            needs ``SETAR.OOD_VAL_DATASETS`` (existing folders) and a valid ``SETAR.SCORE``.

    Returns:
        ``{"weight_types": [...], "ratios": sorted unique ratios with 0, "criterion": str}``.

    Raises:
        ConfigError / ValueError / FileNotFoundError: naming the key and what is valid.
    """
    check_sections(cfg, ("SETAR",))
    names = _setar_names()
    s = cfg.SETAR
    out = {"weight_types": names["check_weight_types"](list(s.WEIGHT_TYPES)),
           "ratios": names["check_ratios"](list(s.RATIOS)), "criterion": str(s.CRITERION)}
    if search:
        _check_searcher_backbone(cfg)
    if search and out["criterion"] in ("auroc", "aupr", "fpr95"):
        if not list(s.OOD_VAL_DATASETS):
            raise _error(f"SETAR.CRITERION {out['criterion']!r} needs OOD validation sets in SETAR.OOD_VAL_DATASETS; "
                         "or use SETAR.CRITERION loss (ID validation data only)")
        from locoop.data.datasets.ood import check_ood_folders
        from locoop.ood.scores import resolve_score_names

        resolve_score_names([s.SCORE], have_local=True)
        check_ood_folders(cfg.DATASET.ROOT, list(s.OOD_VAL_DATASETS))
    return out


def check_setar_ft(cfg: Any) -> None:
    """The checks of the SeTAR+FT / LoRA trainers: ``SETAR.FT.*`` and a set backbone.

    Raises:
        ConfigError: naming the key, the bad value and what is valid.
    """
    check_sections(cfg, ("MODEL.BACKBONE", "SETAR.FT"))


def checked_keys() -> Dict[str, List[str]]:
    """``{section: [checked keys]}`` (for documentation and tests)."""
    return {name: [r.key for r in rules] for name, rules in SECTIONS.items()}
