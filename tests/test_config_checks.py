"""Config checks declared once per section: every rule fails on a bad value with the key, the value and
what is valid; defaults and shipped configs pass; trainers run their sections' rules when created."""
from pathlib import Path

import pytest

from locoop.config import ConfigError, get_cfg_default, merge_from_file, setup_cfg
from locoop.config.checks import (SECTIONS, VALUE_SECTIONS, check_sections, check_setar, check_setar_ft, checked_keys,
                                  validate_cfg)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# key, bad value, fragment of the message (key and value are always in it too).
BAD = [
    ("OPTIM.NAME", "sgdd", "choose one of ['sgd', 'adam', 'adamw']. Did you mean 'sgd'?"),
    ("OPTIM.LR_SCHEDULER", "cos", "choose one of"),
    ("OPTIM.WARMUP_TYPE", "linearr", "choose one of ['constant', 'linear']"),
    ("TEST.FINAL_MODEL", "best", "choose one of ['last_step', 'best_val']"),
    ("TEST.SPLIT", "train", "choose one of ['test', 'val']"),
    ("INPUT.INTERPOLATION", "lanczos", "choose one of ['bilinear', 'bicubic', 'nearest']"),
    ("DATASET.SUBSAMPLE_CLASSES", "some", "choose one of ['all', 'base', 'new']"),
    ("DATASET.NUM_SHOTS", -2, "must be >= -1 (use -1 (all images) or K >= 1)"),
    ("OPTIM.MAX_EPOCH", -1, "must be >= 0"),
    ("TRAIN.PRINT_FREQ", 0, "must be >= 1"),
    ("TRAIN.SAVE_LAST", "yes", "set True or False"),
    ("MODEL.ALLOW_OTHER_BACKBONE", "yes", "set True or False"),
    ("MODEL.ALLOW_OTHER_CLASSNAMES", 1, "set True or False"),
    ("TRAINER.LOCOOP.PREC", "bf16", "choose one of ['fp16', 'fp32', 'amp']"),
    ("TRAINER.LOCOOP.CLASS_TOKEN_POSITION", "start", "choose one of ['end', 'middle', 'front']"),
    ("TRAINER.LOCOOP.N_CTX", 0, "must be >= 1 (or set TRAINER.LOCOOP.CTX_INIT)"),
    ("TRAINER.LOCOOP.LAMBDA", -0.5, "must be >= 0 (--lambda_value)"),
    ("TRAINER.LOCOOP.TOPK", 0, "must be >= 1 (--topk)"),
    ("OOD.T", 0.0, "must be > 0"),
    ("OOD.T", float("inf"), "must be > 0"),
    ("OOD.FPR_CONVENTION", "tpr", "choose one of ['mcm', 'openood']"),
    ("OOD.CACHE_LOCAL_DTYPE", "float61", "choose one of ['float16', 'float32']. Did you mean 'float16'?"),
    ("OOD.LAMBDA_LOCAL", float("nan"), "must be a finite number"),
    ("OOD.BENCHMARK", "openood_v1.5_imagenett", "Did you mean 'openood_v1.5_imagenet'?"),
    ("OOD.BOOTSTRAP", 1, "0 (off) or the number of bootstrap replicates, >= 2"),
    ("OOD.BOOTSTRAP_SEED", -1, "must be >= 0"),
    ("OOD.NEGLABEL.LEXICON_FORMAT", "wordnett", "choose one of ['auto', 'wordnet', 'neglabel', 'words']"),
    ("OOD.NEGLABEL.RATIO", 0.0, "must be in (0, 1]"),
    ("OOD.NEGLABEL.PERCENTILE", 1.5, "must be in [0, 1]"),
    ("OOD.NEGLABEL.NGROUP", -1, "must be >= 0 (<= 1: no grouping)"),
    ("OOD.NEGLABEL.GROUP_SEED", -3, "must be >= 0"),
    ("OOD.NEGLABEL.PERM_DEVICE", "gpu", "choose one of ['', 'cpu', 'cuda']"),
    ("OOD.NEGLABEL.T", 0.0, "must be > 0"),
    ("OOD.NEGLABEL.ID_TEXT", "learned", "choose one of ['auto', 'recipe', 'trainer']"),
    ("OOD.NEGLABEL.TEXT_BATCH", 0, "must be >= 1"),
    ("TRAINER.ZSCLIP.PROMPT_TEMPLATE", "a photo of a", "must contain '{}' once"),
    ("SETAR.SEARCHER", "greedy", "valid searchers: visual_text, text_visual"),
    ("SETAR.WEIGHT_TYPES", ["W_p"], "SETAR.FREEZE_PROJ False"),
    ("SETAR.WEIGHT_TYPES", ["W_x"], "unknown weight type 'W_x'"),
    ("SETAR.RATIOS", [0.1, 1.0], "not in [0, 1)"),
    ("SETAR.PRUNE_TYPE", "minor", "choose one of ['small', 'large', 'random']"),
    ("SETAR.MODE", "quick", "choose one of ['fast', 'naive']"),
    ("SETAR.CRITERION", "acc", "choose one of ['loss'"),
    ("SETAR.LAMBDA", -1.0, "must be >= 0"),
    ("SETAR.TOPK", 0, "must be >= 1"),
    ("SETAR.CACHE_GB", -1.0, "must be >= 0 (GiB of cached block inputs)"),
    ("SETAR.PROMPT_TEMPLATE", "a photo", "must contain '{}' once"),
    ("SETAR.FT.PREC", "fp16", "choose one of ['fp32', 'amp']"),
    ("SETAR.FT.TRAIN_SPLIT", "test", "choose one of ['train', 'val']"),
    ("SETAR.FT.LR_STEP", "batch", "choose one of ['iter', 'epoch']"),
    ("SETAR.FT.LAMBDA", -0.1, "must be >= 0"),
    ("SETAR.FT.TOPK", 0, "must be >= 1"),
    ("SETAR.FT.LORA_DROPOUT", 1.0, "must be in [0, 1)"),
    ("SETAR.FT.PROMPT_TEMPLATE", "a photo of {} {}", "must contain '{}' once"),
]


def _set(cfg, key, value):
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def test_every_checked_key_has_a_failing_case_here():
    covered = {key for key, _, _ in BAD} | {"MODEL.BACKBONE.NAME"}
    assert {k for keys in checked_keys().values() for k in keys} == covered


@pytest.mark.parametrize("key, value, fragment", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_value_fails_with_key_value_and_choices(key, value, fragment):
    cfg = get_cfg_default()
    validate_cfg(cfg)  # the defaults pass
    _set(cfg, key, value)
    with pytest.raises(ConfigError) as e:
        validate_cfg(cfg)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and msg.startswith(key) and fragment in msg
    if not isinstance(value, list):
        assert repr(value) in msg


def test_cross_key_rules():
    cfg = get_cfg_default()
    cfg.TRAINER.LOCOOP.N_CTX = 0
    cfg.TRAINER.LOCOOP.CTX_INIT = "a photo of a"  # the context length comes from the words
    validate_cfg(cfg)
    cfg = get_cfg_default()
    cfg.OOD.BENCHMARK = "openood_v1.5_imagenet"  # its ID set is the benchmark's list ...
    with pytest.raises(ConfigError, match="set DATASET.NAME OpenOODImageNet"):
        validate_cfg(cfg)
    cfg.DATASET.NAME = "OpenOODImageNet"  # ... read by the OpenOOD dataset
    validate_cfg(cfg)
    cfg = get_cfg_default()
    cfg.SETAR.FT.TRAIN_SPLIT = "val"
    validate_cfg(cfg)
    cfg.TEST.FINAL_MODEL = "best_val"
    with pytest.raises(ConfigError, match="would select on training images; use TEST.FINAL_MODEL last_step"):
        validate_cfg(cfg)


def test_required_rules_run_only_where_needed():
    cfg = get_cfg_default()
    assert cfg.MODEL.BACKBONE.NAME == ""
    validate_cfg(cfg)  # building a config does not need a backbone ...
    with pytest.raises(ConfigError, match=r"MODEL.BACKBONE.NAME is empty: set it to a CLIP model name \(RN50, "):
        check_sections(cfg, ["MODEL.BACKBONE"])  # ... a trainer does
    with pytest.raises(ConfigError, match="MODEL.BACKBONE.NAME is empty"):
        check_setar_ft(cfg)
    with pytest.raises(KeyError, match="unknown config section 'SETAR.XX'"):
        check_sections(cfg, ["SETAR.XX"])
    assert set(VALUE_SECTIONS) | {"MODEL.BACKBONE"} == set(SECTIONS)


def test_setup_cfg_checks_before_anything_runs():
    class Args:
        opts = ["SETAR.MODE", "quick"]

    with pytest.raises(ConfigError, match="SETAR.MODE = 'quick' is not valid"):
        setup_cfg(Args())


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")))
def test_shipped_configs_pass(path):
    validate_cfg(merge_from_file(get_cfg_default(), str(CONFIGS / path)))


def test_check_setar_returns_the_search_settings(tmp_path):
    cfg = get_cfg_default()
    cfg.SETAR.RATIOS = [0.2, 0.1, 0.1]
    cfg.SETAR.WEIGHT_TYPES = ["W_q", "W_up"]
    assert check_setar(cfg, search=True) == {"weight_types": ["W_q", "W_up"], "ratios": [0.0, 0.1, 0.2],
                                             "criterion": "loss"}
    cfg.SETAR.CRITERION = "auroc"
    check_setar(cfg, search=False)  # applying saved settings needs no OOD validation data
    with pytest.raises(ConfigError, match="needs OOD validation sets in SETAR.OOD_VAL_DATASETS"):
        check_setar(cfg, search=True)
    cfg.SETAR.OOD_VAL_DATASETS = ["iNaturalist"]
    cfg.DATASET.ROOT = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="iNaturalist"):
        check_setar(cfg, search=True)
    cfg.SETAR.SCORE = "GLMCMX"
    with pytest.raises(ValueError, match="unknown OOD score 'GLMCMX'"):
        check_setar(cfg, search=True)
