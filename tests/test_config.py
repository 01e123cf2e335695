"""Config defaults, merge order, the shipped YAML files and error messages."""
import argparse
import os

import pytest

from locoop.config import (
    ConfigError,
    ConfigKeyError,
    ConfigTypeError,
    cfg_to_dict,
    dump_cfg,
    get_cfg_default,
    load_cfg,
    merge_cfg,
    merge_from_list,
    setup_cfg,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET_YAML = os.path.join(ROOT, "configs", "datasets", "imagenet.yaml")
VIT_YAML = os.path.join(ROOT, "configs", "trainers", "LoCoOp", "vit_b16_ep50.yaml")
RN50_YAML = os.path.join(ROOT, "configs", "trainers", "LoCoOp", "rn50_ep50.yaml")

# The LoCoOp repository's configs/trainers/LoCoOp/vit_b16_ep50.yaml, byte for byte as its users have it.
PAPER_YAML = """DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 32
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 8

INPUT:
  SIZE: (224, 224)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]

OPTIM:
  NAME: "sgd"
  LR: 0.002
  MAX_EPOCH: 50
  LR_SCHEDULER: "cosine"
  WARMUP_EPOCH: 1
  WARMUP_TYPE: "constant"
  WARMUP_CONS_LR: 1e-5

TRAIN:
  PRINT_FREQ: 5

MODEL:
  BACKBONE:
    NAME: "ViT-B/16\""""


def test_defaults_are_dassl_values():
    c = get_cfg_default()
    assert c.OPTIM.NAME == "adam" and c.OPTIM.LR == 0.0003
    assert c.OPTIM.WEIGHT_DECAY == 5e-4 and c.OPTIM.MOMENTUM == 0.9
    assert c.OPTIM.MAX_EPOCH == 10 and c.OPTIM.LR_SCHEDULER == "single_step"
    assert c.OPTIM.WARMUP_EPOCH == -1 and c.OPTIM.WARMUP_TYPE == "linear"
    assert c.OPTIM.WARMUP_CONS_LR == 1e-5 and c.OPTIM.WARMUP_MIN_LR == 1e-5
    assert c.INPUT.SIZE == (224, 224) and c.INPUT.INTERPOLATION == "bilinear"
    assert c.INPUT.PIXEL_MEAN == [0.485, 0.456, 0.406] and c.INPUT.TRANSFORMS == ()
    assert c.DATALOADER.NUM_WORKERS == 4 and c.DATALOADER.TRAIN_X.BATCH_SIZE == 32
    assert c.DATALOADER.TEST.BATCH_SIZE == 32
    assert c.TRAIN.PRINT_FREQ == 10 and c.TRAIN.CHECKPOINT_FREQ == 0
    assert c.TEST.FINAL_MODEL == "last_step" and c.TEST.EVALUATOR == "Classification"
    assert c.SEED == -1 and c.USE_CUDA is True and c.OUTPUT_DIR == "./output"
    # extensions
    loc = c.TRAINER.LOCOOP
    assert (loc.N_CTX, loc.CSC, loc.CTX_INIT, loc.PREC, loc.CLASS_TOKEN_POSITION, loc.LAMBDA, loc.TOPK) == (
        16, False, "", "fp16", "end", 0.25, 200)
    assert c.DATASET.SUBSAMPLE_CLASSES == "all" and c.DATASET.NUM_SHOTS == -1
    assert c.OOD.DATASETS == ["iNaturalist", "SUN", "Places", "Texture"]
    assert c.SETAR.RATIOS == pytest.approx([0.05 * i for i in range(9)])
    assert c.SETAR.FT.ADAPTER == "setar" and c.MODEL.DEVICE == ""


def test_get_cfg_default_returns_independent_copies():
    a = get_cfg_default()
    a.OPTIM.LR = 1.0
    a.OOD.DATASETS.append("X")
    b = get_cfg_default()
    assert b.OPTIM.LR == 0.0003
    assert b.OOD.DATASETS == ["iNaturalist", "SUN", "Places", "Texture"]


def test_shipped_yaml_files_hold_the_papers_values():
    for path, backbone in ((VIT_YAML, "ViT-B/16"), (RN50_YAML, "RN50")):
        c = get_cfg_default()
        merge_cfg(c, DATASET_YAML, path)
        assert c.DATASET.NAME == "ImageNet"
        assert c.DATALOADER.TRAIN_X.BATCH_SIZE == 32 and c.DATALOADER.TEST.BATCH_SIZE == 100
        assert c.DATALOADER.NUM_WORKERS == 8
        assert c.INPUT.SIZE == (224, 224) and isinstance(c.INPUT.SIZE, tuple)
        assert c.INPUT.INTERPOLATION == "bicubic"
        assert c.INPUT.PIXEL_MEAN == [0.48145466, 0.4578275, 0.40821073]
        assert c.INPUT.PIXEL_STD == [0.26862954, 0.26130258, 0.27577711]
        assert c.INPUT.TRANSFORMS == ("random_resized_crop", "random_flip", "normalize")
        assert (c.OPTIM.NAME, c.OPTIM.LR, c.OPTIM.MAX_EPOCH, c.OPTIM.LR_SCHEDULER) == ("sgd", 0.002, 50, "cosine")
        assert (c.OPTIM.WARMUP_EPOCH, c.OPTIM.WARMUP_TYPE) == (1, "constant")
        # PyYAML reads 1e-5 as a string; it must become the float 1e-5
        assert isinstance(c.OPTIM.WARMUP_CONS_LR, float) and c.OPTIM.WARMUP_CONS_LR == 1e-5
        assert c.TRAIN.PRINT_FREQ == 5 and c.MODEL.BACKBONE.NAME == backbone


def test_papers_yaml_merges_unchanged(tmp_path):
    p = tmp_path / "vit_b16_ep50.yaml"
    p.write_text(PAPER_YAML)
    a, b = get_cfg_default(), get_cfg_default()
    merge_cfg(a, DATASET_YAML, str(p))
    merge_cfg(b, DATASET_YAML, VIT_YAML)
    assert cfg_to_dict(a) == cfg_to_dict(b)


def _args(**kw):
    base = dict(dataset_config_file=DATASET_YAML, config_file=VIT_YAML, opts=[])
    base.update(kw)
    return argparse.Namespace(**base)


def test_merge_order_defaults_dataset_method_cli_opts(tmp_path):
    ds = tmp_path / "ds.yaml"
    ds.write_text("DATASET:\n  NAME: ImageNet\n  ROOT: /from/dataset\nOPTIM:\n  LR: 0.5\n  MAX_EPOCH: 7\nSEED: 3\n")
    method = tmp_path / "m.yaml"
    method.write_text("OPTIM:\n  LR: 0.25\nSEED: 4\nTRAINER:\n  LOCOOP:\n    TOPK: 5\n")
    args = _args(dataset_config_file=str(ds), config_file=str(method), root="/from/cli", seed=5, topk=None,
                 lambda_value=0.5, opts=["SEED", "6", "TRAINER.LOCOOP.LAMBDA", "0"])
    c = setup_cfg(args)
    assert c.OPTIM.MAX_EPOCH == 7  # dataset YAML over defaults
    assert c.OPTIM.LR == 0.25  # method YAML over dataset YAML
    assert c.DATASET.ROOT == "/from/cli"  # CLI flag over dataset YAML
    assert c.TRAINER.LOCOOP.TOPK == 5  # a None flag does not override
    assert c.SEED == 6  # opts over CLI flag over YAML
    assert c.TRAINER.LOCOOP.LAMBDA == 0.0 and isinstance(c.TRAINER.LOCOOP.LAMBDA, float)  # int -> float
    assert c.is_frozen()
    with pytest.raises(AttributeError):
        c.SEED = 1


def test_locoop_script_opts_merge():
    # the exact trailing options of LoCoOp's scripts/locoop/train.sh
    opts = ["TRAINER.LOCOOP.N_CTX", "16", "TRAINER.LOCOOP.CSC", "False",
            "TRAINER.LOCOOP.CLASS_TOKEN_POSITION", "end", "DATASET.NUM_SHOTS", "16"]
    c = setup_cfg(_args(trainer="LoCoOp", seed=1, root="/data", output_dir="out", opts=opts))
    assert (c.TRAINER.LOCOOP.N_CTX, c.TRAINER.LOCOOP.CSC, c.DATASET.NUM_SHOTS) == (16, False, 16)
    assert (c.TRAINER.NAME, c.SEED, c.DATASET.ROOT, c.OUTPUT_DIR) == ("LoCoOp", 1, "/data", "out")
    c = setup_cfg(_args(opts=["TRAINER.LOCOOP.CSC", "true", "OOD.DATASETS", "['SUN']"]))
    assert c.TRAINER.LOCOOP.CSC is True and c.OOD.DATASETS == ["SUN"]


def test_unknown_key_names_key_and_closest():
    c = get_cfg_default()
    with pytest.raises(ConfigKeyError) as e:
        merge_from_list(c, ["OPTIM.LRR", "0.1"])
    msg = str(e.value)
    assert "'OPTIM.LRR'" in msg and "OPTIM.LR" in msg.split("Did you mean:")[1]
    with pytest.raises(KeyError) as e:  # also a KeyError, and the wrong case is suggested
        merge_from_list(c, ["trainer.locoop.topk", "3"])
    assert "TRAINER.LOCOOP.TOPK" in str(e.value)
    with pytest.raises(ConfigKeyError) as e:  # right leaf, missing section
        merge_from_list(c, ["MAX_EPOCH", "3"])
    assert "OPTIM.MAX_EPOCH" in str(e.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("OPTIM:\n  WARMUP_EPOCHS: 1\n")
    with pytest.raises(ConfigKeyError) as e:
        merge_cfg(get_cfg_default(), config_file=str(p))
    msg = str(e.value)
    assert "OPTIM.WARMUP_EPOCHS" in msg and str(p) in msg and "OPTIM.WARMUP_EPOCH" in msg.split("Did you mean:")[1]


def test_wrong_type_names_key_and_expected_type():
    c = get_cfg_default()
    with pytest.raises(ConfigTypeError) as e:
        merge_from_list(c, ["OPTIM.MAX_EPOCH", "ten"])
    assert "OPTIM.MAX_EPOCH" in str(e.value) and "expects int" in str(e.value)
    with pytest.raises(ConfigTypeError) as e:
        merge_from_list(c, ["TRAINER.LOCOOP.CSC", "2"])
    assert "expects bool" in str(e.value)
    with pytest.raises(ConfigTypeError) as e:
        merge_from_list(c, ["OPTIM.LR", "fast"])
    assert "expects float" in str(e.value)
    with pytest.raises(ConfigTypeError) as e:
        merge_from_list(c, ["OPTIM", "1"])
    assert "section" in str(e.value)
    with pytest.raises(ConfigError) as e:
        merge_from_list(c, ["OPTIM.LR"])
    assert "KEY VALUE" in str(e.value)


def test_invalid_choice_lists_choices():
    with pytest.raises(ConfigError) as e:
        setup_cfg(_args(opts=["OPTIM.LR_SCHEDULER", "cosin"]))
    assert "'cosine'" in str(e.value) and "multi_step" in str(e.value)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError) as e:
        merge_cfg(get_cfg_default(), config_file="configs/nope.yaml")
    assert "configs/nope.yaml" in str(e.value)


def test_dump_and_load_round_trip(tmp_path):
    c = setup_cfg(_args(opts=["OOD.T", "2.0"]))
    path = dump_cfg(c, str(tmp_path / "config.yaml"))
    back = load_cfg(path)
    assert cfg_to_dict(back) == cfg_to_dict(c)
    assert back.INPUT.SIZE == (224, 224)


def test_dassl_style_method_calls_use_checked_merge(tmp_path):
    c = get_cfg_default()
    p = tmp_path / "m.yaml"
    p.write_text("OPTIM:\n  LR: 0.5\n")
    c.merge_from_file(str(p))  # what Dassl-based scripts call
    c.merge_from_list(["OPTIM.MAX_EPOCH", "3"])
    assert (c.OPTIM.LR, c.OPTIM.MAX_EPOCH) == (0.5, 3)
    with pytest.raises(ConfigKeyError) as e:
        c.merge_from_list(["OPTIM.MAX_EPOCHS", "3"])
    assert "OPTIM.MAX_EPOCH" in str(e.value).split("Did you mean:")[1]
    c.freeze()
    with pytest.raises(ConfigError) as e:
        c.merge_from_list(["SEED", "1"])
    assert "frozen" in str(e.value)
    d = c.clone()
    d.defrost()
    merge_from_list(d, ["SEED", "1"])
    assert d.SEED == 1 and c.SEED == -1


def test_console_config_dump_lists_only_the_changed_keys(capsys):
    import argparse

    from locoop.commands._common import _print_args
    from locoop.config import cfg_changes, get_cfg_default, merge_from_list

    cfg = merge_from_list(get_cfg_default(), ["OPTIM.LR", "0.5", "TRAINER.LOCOOP.TOPK", "7", "SEED", "1"])
    assert sorted(cfg_changes(cfg)) == [("OPTIM.LR", 0.5), ("SEED", 1), ("TRAINER.LOCOOP.TOPK", 7)]
    assert cfg_changes(get_cfg_default()) == []
    _print_args(argparse.Namespace(seed=1), cfg)
    out = capsys.readouterr().out
    assert "the 3 key(s) that differ from the defaults" in out
    assert "OPTIM.LR: 0.5" in out and "TRAINER.LOCOOP.TOPK: 7" in out and "OPTIM.MAX_EPOCH" not in out
