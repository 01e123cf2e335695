"""SeTAR's JSON configs as ``--config-file``: every key of SeTAR's training-free and fine-tuning configs, mapped.

SeTAR's scripts (``search.py``, ``test_ood.py``, ``finetune.py``) read a flat JSON object of their
argparse arguments (``configs/training_free/...``, ``configs/finetune/...``, the ablations, and the
``config_*.json`` they save in ``results/``). ``setar-search`` / ``setar-finetune --config-file X.json``
take such a file as it is: :func:`merge_setar_json` merges our shipped config of the same kind
first (``configs/setar/{imagenet,voc}/SeTAR.yaml`` for a training-free file,
``configs/setar/finetune/{imagenet,voc}/{SeTAR+FT,LoRA}.yaml`` for a fine-tuning one -- they carry
the protocol points SeTAR's code fixes and its JSON does not state: preprocessing, optimiser, the
class prompt), then the JSON's keys through :data:`KEYS`. A key absent from the JSON keeps that
shipped config's value (SeTAR's published values), not SeTAR's argparse default. A Swin-V2 or
CLIP-L/14 ``model_name`` builds on that family's shipped config when there is one
(``.../swin_base/``, ``.../clip_large/``: e.g. a Swin-V2's ``INPUT.SIZE`` 256, at which its
transforms run), else on the CLIP-B/16 one; a search's benchmark scores become SeTAR's Swin-V2
ones (MCM, energy).

Three kinds of keys:

* mapped to our keys (e.g. ``locoop_lambda`` -> ``SETAR.LAMBDA`` in a search,
  ``SETAR.FT.LAMBDA`` in a fine-tuning file; ``temperature`` 100 -> ``OOD.T`` 1, since SeTAR
  divides ``100 * cos`` by it and our T divides the cosine);
* where-to-run keys with no effect on the numbers, read but not used (``data_root``,
  ``exp_name``, ``log_directory``: give ``--root`` / ``--output-dir``);
* ``lora_alpha``: read, but SeTAR's ``finetune.py`` never passes it to its LoRA config, so its LoRA
  runs have peft's default alpha 8; a LoRA file here gets ``SETAR.FT.LORA_ALPHA 8`` too (set the
  key after the file for the file's value);
* keys whose value we cannot honour (``use_pred_label true``, ``gradient_accumulation_steps 2``,
  warm-up steps, ``model_type LoCoOp``, ...): refused with the reason.

An unknown key is refused with the list of known ones (as SeTAR's own loader refuses it).
``lora_settings`` (a list) makes the file its own settings file: ``SETAR.SETTINGS_FILE`` is set
to the JSON itself, which :func:`locoop.setar.settings.load_settings` reads.

The other way, :func:`save_setar_config_best` writes a run's settings as SeTAR's
``config_best.json`` (``setar-search`` does so beside ``best_settings.json``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

__all__ = ["KEYS", "FT_KEYS", "CLIP_MODELS", "ID_DATASETS", "CONFIG_BEST_FILE", "setar_json_to_cfg", "merge_setar_json",
           "setar_config_best", "save_setar_config_best"]

#: SeTAR's CLIP model names -> our MODEL.BACKBONE.NAME (a Swin-V2 repo id is kept as it is).
CLIP_MODELS = {
    "openai/clip-vit-base-patch16": "ViT-B/16",
    "openai/clip-vit-base-patch32": "ViT-B/32",
    "openai/clip-vit-large-patch14": "ViT-L/14",
    "openai/clip-vit-large-patch14-336": "ViT-L/14@336px",
}
#: SeTAR's id_dataset -> (our DATASET.NAME, folder of our shipped configs, SeTAR's OOD sets for it).
ID_DATASETS = {
    "ID_ImageNet1K": ("ImageNet", "imagenet", ["iNaturalist", "SUN", "Places", "Texture"]),
    "ID_VOC": ("PascalVOC", "voc", ["iNaturalist", "SUN", "Places", "Texture", "ImageNet-22K", "COCO"]),
}
#: SeTAR's scorer names -> our OOD score names ("loss" is the search criterion, not a score).
SCORES = {"mcm_score": "MCM", "l_mcm_score": "L-MCM", "gl_mcm_score": "GL-MCM", "energy_score": "energy",
          "entropy_score": "entropy", "var_score": "variance"}
#: SeTAR's searchers -> ours (the same names; visual_only_swin is the Swin-V2 one).
SEARCHERS = {"visual_text": "visual_text", "text_visual": "text_visual", "text_only": "text_only",
             "visual_only": "visual_only", "visual_only_swin": "visual_only_swin",
             "layer_exhaustive": "layer_exhaustive", "modality_interleaved": "modality_interleaved"}
#: Module names of SeTAR's LoRA target_modules (Hugging Face CLIP and Swin-V2) -> SeTAR weight types.
TARGET_MODULES = {"self_attn.q_proj": "W_q", "self_attn.k_proj": "W_k", "self_attn.v_proj": "W_v",
                  "self_attn.out_proj": "W_o", "mlp.fc1": "W_up", "mlp.fc2": "W_down",
                  "attention.self.query": "W_q", "attention.self.key": "W_k", "attention.self.value": "W_v",
                  "attention.output.dense": "W_o", "intermediate.dense": "W_up", "output.dense": "W_down"}
#: The benchmark scores of SeTAR's Swin-V2 search results (its swin_base config_best.json: mcm, energy).
SWIN_TEST_SCORES = ("MCM", "energy")
#: The LoRA alpha of SeTAR's LoRA runs: peft's LoraConfig default (its finetune.py never passes lora_alpha).
PEFT_DEFAULT_ALPHA = 8
#: Keys only SeTAR's finetune.py has: one of them makes the file a fine-tuning config.
FT_KEYS = ("num_train_epochs", "max_train_steps", "gradient_accumulation_steps", "learning_rate", "weight_decay",
           "momentum", "lr_scheduler_type", "num_warmup_steps", "logging_steps")

Out = Dict[str, Any]  # dotted key -> value


class _Ctx:
    """What a key's mapping needs to know about the whole file."""

    def __init__(self, data: Mapping[str, Any], source: str, path: Optional[str]) -> None:
        self.data, self.source, self.path = data, source, path
        self.finetune = any(k in data for k in FT_KEYS)
        self.swin = data.get("model_type") == "SwinTransformerV2" or "swinv2" in str(data.get("model_name", ""))
        settings = data.get("lora_settings")
        self.has_settings = isinstance(settings, list)
        self.searching = not self.finetune and not self.has_settings and "searcher" in data

    def refuse(self, key: str, value: Any, why: str) -> ValueError:
        return ValueError(f"SeTAR JSON config {self.source}: {key} = {json.dumps(value)} cannot be honoured: {why}")


def _only(allowed: Tuple[Any, ...], why: str) -> Callable[[Any, _Ctx, str], Out]:
    """A key we do not need beyond checking that its value is the one our run uses."""

    def check(value: Any, ctx: _Ctx, key: str) -> Out:
        if value not in allowed:
            raise ctx.refuse(key, value, why)
        return {}

    return check


def _unused(value: Any, ctx: _Ctx, key: str) -> Out:
    return {}  # where SeTAR runs (folders, names): --root / --output-dir say it here


def _id_dataset(value: Any, ctx: _Ctx, key: str) -> Out:
    if value not in ID_DATASETS:
        raise ctx.refuse(key, value, f"the ID datasets here are {', '.join(ID_DATASETS)}")
    name, _folder, ood = ID_DATASETS[value]
    return {"DATASET.NAME": name, "OOD.DATASETS": list(ood)}


def _split(value: Any, ctx: _Ctx, key: str) -> Out:
    if value not in ("val", "test"):
        raise ctx.refuse(key, value, "SeTAR's splits are val and test")
    if ctx.finetune and value != "val":
        raise ctx.refuse(key, value, "SeTAR+FT / LoRA train on the ID validation split (split val); the test split "
                                     "is what the benchmark after training evaluates")
    if ctx.searching and value != "val":
        raise ctx.refuse(key, value, "the search runs on the ID validation split (split val); split test is for "
                                     "evaluating given lora_settings or the unpruned model")
    return {"SETAR.FT.TRAIN_SPLIT": "val"} if ctx.finetune else {}


def _batch_size(value: Any, ctx: _Ctx, key: str) -> Out:
    if ctx.finetune:
        return {"DATALOADER.TRAIN_X.BATCH_SIZE": value, "DATALOADER.TEST.BATCH_SIZE": value}
    return {"DATALOADER.TEST.BATCH_SIZE": value}


def _scorers(value: Any, ctx: _Ctx, key: str) -> Out:
    names = [value] if isinstance(value, str) else list(value or [])
    bad = [n for n in names if n != "loss" and n not in SCORES]
    if bad:
        raise ctx.refuse(key, value, f"unknown scorer(s) {bad}; SeTAR's scorers here: loss, {', '.join(SCORES)}")
    scores = [SCORES[n] for n in names if n != "loss"]
    # "loss" alone: the search's criterion; the benchmark after it keeps the shipped config's scores
    return {"OOD.SCORES": scores} if scores else {}


def _temperature(value: Any, ctx: _Ctx, key: str) -> Out:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ctx.refuse(key, value, "a temperature is a number > 0")
    # CLIP: SeTAR's softmax(100 * cos / temperature) is our softmax(cos / T) with T = temperature / 100.
    # Swin-V2: SeTAR divides the classifier's logits by it, as OOD.T does.
    return {"OOD.T": float(value) if ctx.swin else float(value) / 100.0}


def _model_name(value: Any, ctx: _Ctx, key: str) -> Out:
    from locoop.models.swinv2 import is_swinv2_backbone

    if value in CLIP_MODELS:
        return {"MODEL.BACKBONE.NAME": CLIP_MODELS[value]}
    if is_swinv2_backbone(str(value)) or os.path.exists(str(value)):  # SeTAR: "model name or path"
        return {"MODEL.BACKBONE.NAME": str(value)}
    raise ctx.refuse(key, value, f"known model names: {', '.join(CLIP_MODELS)}, Swin-V2 repo ids "
                                 "(e.g. microsoft/swinv2-base-patch4-window16-256) and existing checkpoint paths; "
                                 "or set MODEL.BACKBONE.NAME after --config-file")


def _model_type(value: Any, ctx: _Ctx, key: str) -> Out:
    if value == "LoCoOp":
        raise ctx.refuse(key, value, "SeTAR on LoCoOp's learned prompts is setar-search --model-dir RUN with a "
                                     "LoCoOp run trained here (SeTAR's locoop_ckpt is not read)")
    if value not in ("CLIP", "SwinTransformerV2"):
        raise ctx.refuse(key, value, "SeTAR's model types are CLIP, SwinTransformerV2 and LoCoOp")
    if (value == "SwinTransformerV2") != ctx.swin or (value == "CLIP" and "swinv2" in str(ctx.data.get("model_name",
                                                                                                       ""))):
        raise ctx.refuse(key, value, f"it does not match model_name {ctx.data.get('model_name')!r}")
    return {}


def _lora_svd_init(value: Any, ctx: _Ctx, key: str) -> Out:
    if not isinstance(value, bool):
        raise ctx.refuse(key, value, "true or false")
    if ctx.finetune:  # SVD-initialised adapters (SeTAR+FT) or plain LoRA (the baseline), alpha as _lora_alpha
        return {"TRAINER.NAME": "SeTARFT" if value else "LoRA", "SETAR.FT.ADAPTER": "setar" if value else "lora",
                **({} if value else {"SETAR.FT.LORA_ALPHA": PEFT_DEFAULT_ALPHA})}
    if not value and (ctx.searching or ctx.has_settings):
        raise ctx.refuse(key, value, "the training-free search and given lora_settings prune the weights "
                                     "(lora_svd_init true)")
    return {}


def _prune_type(value: Any, ctx: _Ctx, key: str) -> Out:
    if value is None:
        return {}
    if value not in ("small", "large", "random"):
        raise ctx.refuse(key, value, "SeTAR's prune types are small, large and random")
    return {"SETAR.PRUNE_TYPE": value}


def _lora_settings(value: Any, ctx: _Ctx, key: str) -> Out:
    if value is None:
        if ctx.finetune and ctx.data.get("lora_svd_init", True):
            return {}  # SeTAR+FT without settings: --settings gives the search's
        return {} if ctx.searching or ctx.finetune else {"SETAR.SETTINGS_FILE": "none"}
    if not isinstance(value, list):
        raise ctx.refuse(key, value, "a list [[tower, weight_type, layer, rank or ratio], ...] or null")
    if ctx.path is None:
        raise ctx.refuse(key, "[...]", "inline lora_settings need the JSON's path (they are read from the file)")
    return {"SETAR.SETTINGS_FILE": str(ctx.path)}  # load_settings reads the file's lora_settings


def _searcher(value: Any, ctx: _Ctx, key: str) -> Out:
    if value not in SEARCHERS:
        raise ctx.refuse(key, value, f"SeTAR's searchers here: {', '.join(SEARCHERS)}")
    return {"SETAR.SEARCHER": SEARCHERS[value]}


def _weight_type(value: Any, ctx: _Ctx, key: str) -> Out:
    return {"SETAR.WEIGHT_TYPES": [value]}  # SETAR.WEIGHT_TYPES' own check names the valid ones


def _criterion(value: Any, ctx: _Ctx, key: str) -> Out:
    scorer, metric = ctx.data.get("best_scorer", "loss"), ctx.data.get("best_metric", "locoop_loss")
    if scorer == "loss":
        if metric != "locoop_loss":
            raise ctx.refuse("best_metric", metric, "the loss criterion here is SeTAR's locoop_loss (loss_id / "
                                                    "loss_ood alone are not search criteria here)")
        return {"SETAR.CRITERION": "loss"}
    if scorer not in SCORES:
        raise ctx.refuse("best_scorer", scorer, f"known scorers: loss, {', '.join(SCORES)}")
    if metric not in ("auroc", "aupr", "fpr95"):
        raise ctx.refuse("best_metric", metric, "with an OOD score the criterion is auroc, aupr or fpr95")
    return {"SETAR.CRITERION": metric, "SETAR.SCORE": SCORES[scorer]}


def _loss_weight(ours: str) -> Callable[[Any, _Ctx, str], Out]:
    def mapping(value: Any, ctx: _Ctx, key: str) -> Out:
        return {f"SETAR.FT.{ours}" if ctx.finetune else f"SETAR.{ours}": value}

    return mapping


def _to(ours: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any, _Ctx, str], Out]:
    return lambda value, ctx, key: {ours: convert(value)}


def _scheduler(value: Any, ctx: _Ctx, key: str) -> Out:
    if value != "cosine":
        raise ctx.refuse(key, value, "SeTAR+FT's schedule here is cosine per step (SETAR.FT.LR_STEP iter); "
                                     "transformers' other schedules are not implemented")
    return {"OPTIM.LR_SCHEDULER": "cosine", "SETAR.FT.LR_STEP": "iter"}


def _warmup(value: Any, ctx: _Ctx, key: str) -> Out:
    if value != 0:
        raise ctx.refuse(key, value, "warm-up steps are not implemented for SeTAR+FT here (SeTAR's configs use 0)")
    return {"OPTIM.WARMUP_EPOCH": -1}


def _target_modules(value: Any, ctx: _Ctx, key: str) -> Out:
    if value is None:
        return {}
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or any(n not in TARGET_MODULES for n in names):
        raise ctx.refuse(key, value, f"a list of module names among {', '.join(TARGET_MODULES)} (a dict or a "
                                     "regular expression is not mapped)")
    return {"SETAR.WEIGHT_TYPES": sorted({TARGET_MODULES[n] for n in names}, key=list(TARGET_MODULES.values()).index)}


def _positive_or_none(ours: str) -> Callable[[Any, _Ctx, str], Out]:
    return lambda value, ctx, key: {} if value is None else {ours: value}


def _lora_alpha(value: Any, ctx: _Ctx, key: str) -> Out:
    # SeTAR's finetune.py builds its LoRA config from r and target_modules only, so its LoRA runs have
    # peft's default alpha 8 whatever the file says: we do the same (set SETAR.FT.LORA_ALPHA after the
    # file for the file's value).
    return {"SETAR.FT.LORA_ALPHA": PEFT_DEFAULT_ALPHA} if ctx.finetune else {}


#: Every key SeTAR's configs (and the config_*.json it saves) hold -> its mapping.
KEYS: Dict[str, Callable[[Any, _Ctx, str], Out]] = {
    "data_root": _unused, "exp_name": _unused, "log_directory": _unused,
    "device": _to("MODEL.DEVICE"),
    "id_dataset": _id_dataset,
    "split": _split,
    "batch_size": _batch_size,
    "seed": _to("SEED"),
    "scorers": _scorers,
    "temperature": _temperature,
    "recall_level": _only((0.95,), "FPR is reported at 95% TPR (FPR95), SeTAR's recall_level 0.95"),
    "model_name": _model_name,
    "model_type": _model_type,
    "clip_ckpt": _only((None,), "a fine-tuned CLIP is given here as MODEL.BACKBONE.NAME (a checkpoint path)"),
    "locoop_ckpt": _only((None,), "LoCoOp's prompts come from setar-search --model-dir RUN"),
    "n_ctx": _unused,  # the LoCoOp context length of model_type LoCoOp only (refused above)
    "lora_svd_init": _lora_svd_init,
    "lora_svd_init_type": _prune_type,
    "lora_settings": _lora_settings,
    "searcher": _searcher,
    "candi_ratios": _to("SETAR.RATIOS", lambda v: [float(x) for x in v]),
    "weight_type": _weight_type,
    "best_scorer": _criterion, "best_metric": _criterion,
    "freeze_proj": _to("SETAR.FREEZE_PROJ", bool),
    "locoop_lambda": _loss_weight("LAMBDA"),
    "locoop_top_k": _loss_weight("TOPK"),
    "use_pred_label": _only((False,), "the local OOD regions use the ground-truth label (SeTAR's "
                                      "use_pred_label false); predicted labels are not implemented"),
    "num_train_epochs": _to("OPTIM.MAX_EPOCH"),
    "max_train_steps": _only((None,), "training length is num_train_epochs (OPTIM.MAX_EPOCH)"),
    "gradient_accumulation_steps": _only((1,), "gradient accumulation is not implemented (SeTAR's configs use 1)"),
    "learning_rate": _to("OPTIM.LR", float),
    "weight_decay": _to("OPTIM.WEIGHT_DECAY", float),
    "momentum": _to("OPTIM.MOMENTUM", float),
    "lr_scheduler_type": _scheduler,
    "num_warmup_steps": _warmup,
    "logging_steps": _positive_or_none("TRAIN.PRINT_FREQ"),
    "lora_r": _positive_or_none("SETAR.FT.LORA_RANK"),
    "lora_alpha": _lora_alpha,
    "target_modules": _target_modules,
}


def _repo_configs() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "setar"


#: Sub-folders of the shipped configs per backbone family, as SeTAR's configs/{training_free,finetune}/<family>.
BACKBONE_FAMILIES = {"swin_base": "SwinTransformerV2", "clip_large": "ViT-L/14"}


def _family_config(folder: Path, name: str, ctx: "_Ctx") -> Path:
    """``folder/<family>/name`` for a Swin-V2 or CLIP-L/14 file when that config is shipped, else ``folder/name``.

    The family's config carries what SeTAR's JSON does not state for that backbone (a Swin-V2's
    ``INPUT.SIZE`` 256 and ImageNet mean / std; CLIP-L's batch size).
    """
    if ctx.swin:
        family = "swin_base"
    elif CLIP_MODELS.get(str(ctx.data.get("model_name", ""))) == BACKBONE_FAMILIES["clip_large"]:
        family = "clip_large"
    else:
        return folder / name
    candidate = folder / family / name
    return candidate if candidate.is_file() else folder / name


def setar_json_to_cfg(data: Any, source: str, path: Optional[str] = None) -> Tuple[Path, Out]:
    """Map a SeTAR JSON config to (our shipped config of its kind, ``{dotted key: value}`` overrides).

    Args:
        data: the parsed JSON object.
        source: where it comes from (for messages).
        path: its file (a list ``lora_settings`` makes it the settings file).

    Raises:
        ValueError: not an object, an unknown key (the message lists the known ones), or a value
            we cannot honour (the message says why).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"SeTAR JSON config {source}: expected an object of SeTAR's arguments, got "
                         f"{type(data).__name__}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ValueError(f"SeTAR JSON config {source}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                         f"{', '.join(KEYS)}")
    ctx = _Ctx(data, source, path)
    out: Out = {}
    for key, value in data.items():
        out.update(KEYS[key](value, ctx, key))
    if ctx.swin and "OOD.SCORES" not in out:
        out["OOD.SCORES"] = list(SWIN_TEST_SCORES)  # the shipped configs' MCM / GL-MCM are CLIP's
    _name, folder, _ood = ID_DATASETS.get(str(data.get("id_dataset", "ID_ImageNet1K")), ID_DATASETS["ID_ImageNet1K"])
    if ctx.finetune:
        lora = data.get("lora_svd_init", True) is False
        base = _family_config(_repo_configs() / "finetune" / folder, "LoRA.yaml" if lora else "SeTAR+FT.yaml", ctx)
    else:
        base = _family_config(_repo_configs() / folder, "SeTAR.yaml", ctx)
        if not ctx.searching and "lora_settings" not in data:
            out["SETAR.SETTINGS_FILE"] = "none"  # a Vanilla_* config: the unpruned model's benchmark
    return base, out


def merge_setar_json(cfg: Any, path: str) -> Any:
    """Merge a SeTAR JSON config into ``cfg``: our shipped config of its kind, then its mapped keys."""
    from . import merge_from_dict, merge_from_file

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"Config file '{path}' is not valid JSON ({err}); a .json --config-file is read as "
                         "SeTAR's JSON config") from None
    base, out = setar_json_to_cfg(data, str(path), os.path.abspath(path))
    if not base.is_file():
        raise FileNotFoundError(f"{base} (the shipped config a SeTAR JSON config builds on) is missing; run from a "
                                "full checkout of this repository")
    merge_from_file(cfg, str(base))
    nested: Dict[str, Any] = {}
    for dotted, value in out.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return merge_from_dict(cfg, nested, source=f"in {path} (SeTAR's JSON config, mapped)")


#: The file our search writes beside best_settings.json, in SeTAR's shape (see :func:`save_setar_config_best`).
CONFIG_BEST_FILE = "config_best.json"


def setar_config_best(cfg: Any, settings: Any, model_type: Optional[str] = None) -> Dict[str, Any]:
    """The settings of a run as SeTAR's ``config_best.json``: SeTAR's argument names, ``lora_settings`` last.

    Only the arguments with a SeTAR equivalent are written (the reverse of :data:`KEYS`): the ID
    dataset, the test split, batch size, seed, the scorers SeTAR has, its temperature, the model,
    the prune type and the settings. SeTAR's ``test_ood.py --config_file`` reads it (its other
    arguments at SeTAR's defaults); here ``--settings`` and ``--config-file`` read it back.

    Args:
        cfg: the run's config.
        settings: ``[[tower, weight_type, layer, ratio], ...]``.
        model_type: SeTAR's model type; default ``SwinTransformerV2`` for a Swin-V2 backbone, else ``CLIP``.
    """
    from locoop.models.swinv2 import is_swinv2_backbone

    name = str(cfg.MODEL.BACKBONE.NAME)
    swin = is_swinv2_backbone(name)
    out: Dict[str, Any] = {}
    ids = {ours: theirs for theirs, (ours, _f, _o) in ID_DATASETS.items()}
    if str(cfg.DATASET.NAME) in ids:
        out["id_dataset"] = ids[str(cfg.DATASET.NAME)]
    scorers = {ours: theirs for theirs, ours in SCORES.items()}
    out.update({"split": "test", "batch_size": int(cfg.DATALOADER.TEST.BATCH_SIZE), "seed": int(cfg.SEED),
                "scorers": [scorers[s] for s in cfg.OOD.SCORES if s in scorers],
                "temperature": float(cfg.OOD.T) if swin else float(cfg.OOD.T) * 100.0, "recall_level": 0.95,
                "model_name": {ours: theirs for theirs, ours in CLIP_MODELS.items()}.get(name, name),
                "model_type": model_type or ("SwinTransformerV2" if swin else "CLIP"), "lora_svd_init": True,
                "lora_svd_init_type": str(cfg.SETAR.PRUNE_TYPE), "lora_settings": [list(s) for s in settings]})
    return out


def save_setar_config_best(path: str, cfg: Any, settings: Any, model_type: Optional[str] = None) -> Path:
    """Write :func:`setar_config_best` atomically, one settings entry per line."""
    from locoop.engine.fileio import atomic_write_text

    doc = setar_config_best(cfg, settings, model_type)
    entries = doc.pop("lora_settings")
    head = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items())
    body = ",\n".join("        " + json.dumps(e) for e in entries)
    text = "{\n" + head + ',\n    "lora_settings": [' + ("\n" + body + "\n    " if entries else "") + "]\n}\n"
    return atomic_write_text(path, text)
