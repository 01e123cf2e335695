"""SeTAR drop-in fidelity: its prompt, its config_best.json, absolute ranks and its JSON configs."""
import glob
import json
import os

import pytest
import torch

from clip.model import build_model
from clip.tiny import random_state_dict
from locoop.config import get_cfg_default, merge_from_file, validate_cfg
from locoop.config.setar_json import KEYS
from locoop.setar.adapters import ADAPTER_NAME, add_setar_adapters
from locoop.setar.lowrank import LowRankEditor, get_linear
from locoop.setar.settings import apply_settings, load_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETAR_PROMPT = "a photo of a {}"  # SeTAR's model_hub.compute_scores and finetune.py: f"a photo of a {c}"
# SeTAR's lora_settings order: [tower, weight_type, layer, rank or ratio]
SETTINGS = [["visual", "W_up", 1, 0.25], ["visual", "W_up", 0, 0], ["text", "W_q", 0, 5], ["text", "W_up", 1, 0.1]]


def tiny():
    return build_model(random_state_dict("tiny-vit", seed=0))


def _write(path, obj):
    path.write_text(json.dumps(obj, indent=4))
    return path


def _setar_args(**kw):
    """A config_best.json as SeTAR's search writes it: all its arguments, lora_settings among them."""
    out = {"data_root": "/data/SVD_OOD", "id_dataset": "ID_ImageNet1K", "split": "test", "batch_size": 512,
           "seed": 5, "device": "cuda", "exp_name": "Run test on the best low rank settings",
           "log_directory": "./results/x", "scorers": ["mcm_score", "gl_mcm_score"], "temperature": 100,
           "recall_level": 0.95, "model_name": "openai/clip-vit-base-patch16", "model_type": "CLIP",
           "clip_ckpt": None, "locoop_ckpt": None, "lora_svd_init": True, "lora_svd_init_type": "small",
           "lora_settings": SETTINGS, "target_modules": None, "lora_r": None, "lora_alpha": None, "n_ctx": 16}
    out.update(kw)
    return out


# ------------------------------------------------------------------ prompts
def test_default_and_shipped_setar_configs_carry_setars_prompt():
    c = get_cfg_default()
    assert c.SETAR.PROMPT_TEMPLATE == SETAR_PROMPT and c.SETAR.FT.PROMPT_TEMPLATE == SETAR_PROMPT
    files = sorted(glob.glob(os.path.join(REPO, "configs", "setar", "**", "*.yaml"), recursive=True))
    assert len(files) > 20
    for f in files:
        text = open(f, encoding="utf-8").read()
        assert '  PROMPT_TEMPLATE: "a photo of a {}"  #' in text, f
        assert "a photo of a {}." not in text, f
        cfg = merge_from_file(get_cfg_default(), f)
        assert cfg.SETAR.PROMPT_TEMPLATE == "a photo of a {}", f
        if os.sep + "finetune" + os.sep in f:
            assert '    PROMPT_TEMPLATE: "a photo of a {}"  #' in text and cfg.SETAR.FT.PROMPT_TEMPLATE == SETAR_PROMPT


def test_shipped_lora_configs_use_the_alpha_setar_ran():
    # SeTAR's finetune.py builds its LoRA config without lora_alpha: peft's default 8 is what ran.
    files = sorted(glob.glob(os.path.join(REPO, "configs", "setar", "finetune", "**", "LoRA.yaml"), recursive=True))
    assert files
    for f in files:
        assert merge_from_file(get_cfg_default(), f).SETAR.FT.LORA_ALPHA == 8, f


def test_ft_prompt_key_is_checked():
    c = get_cfg_default()
    c.SETAR.FT.PROMPT_TEMPLATE = ""  # the search's prompt
    validate_cfg(c)
    c.SETAR.FT.PROMPT_TEMPLATE = "a photo"
    with pytest.raises(ValueError, match=r"SETAR.FT.PROMPT_TEMPLATE must contain '\{\}' once"):
        validate_cfg(c)


# ------------------------------------------------------------------ config_best.json and absolute ranks
def test_setars_config_best_json_gives_the_same_edit_as_the_list(tmp_path):
    best = _write(tmp_path / "config_best.json", _setar_args())
    plain = _write(tmp_path / "plain.json", SETTINGS)
    assert [list(s) for s in load_settings(best)] == [list(s) for s in load_settings(plain)]
    a, b = tiny(), tiny()
    apply_settings(LowRankEditor(a), load_settings(best, a))
    apply_settings(LowRankEditor(b), load_settings(plain, b))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(get_linear(a, "text", "W_q", 0).weight, get_linear(tiny(), "text", "W_q", 0).weight)
    with pytest.raises(ValueError, match="lora_settings is null"):
        load_settings(_write(tmp_path / "search.json", _setar_args(lora_settings=None)))


def test_absolute_rank_in_setar_ft_adapters():
    ref, model = tiny(), tiny()
    adapters = add_setar_adapters(model, [["text", "W_q", 0, 5], ["visual", "W_up", 1, 0.25]])
    assert adapters.ranks() == {("text", "W_q", 0): 5, ("visual", "W_up", 1): 16}
    w = get_linear(ref, "text", "W_q", 0).weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # the twin: the 5 minor components by hand
    layer = adapters.layer(("text", "W_q", 0))
    a, b = layer.lora_A[ADAPTER_NAME].weight.double(), layer.lora_B[ADAPTER_NAME].weight.double()
    assert a.shape == (5, 64) and b.shape == (64, 5)
    assert torch.allclose(b @ a, (u[:, -5:] * s[-5:]) @ vh[-5:], atol=1e-5)
    assert torch.allclose(layer.get_base_layer().weight.double(), (u[:, :-5] * s[:-5]) @ vh[:-5], atol=1e-5)
    before = get_linear(tiny(), "text", "W_q", 0).weight.clone()
    fresh = tiny()
    with pytest.raises(ValueError, match="which has 64; give at most 63"):
        add_setar_adapters(fresh, [["text", "W_q", 0, 64]])
    assert torch.equal(get_linear(fresh, "text", "W_q", 0).weight, before)


# ------------------------------------------------------------------ SeTAR's JSON configs
TRAINING_FREE = {  # the keys of SeTAR's configs/training_free/clip_base/ID_VOC/SeTAR.json, our values
    "data_root": "/somewhere", "id_dataset": "ID_VOC", "split": "val", "batch_size": 256, "seed": 3,
    "device": "cpu", "scorers": ["loss"], "temperature": 50, "exp_name": "SeTAR",
    "log_directory": "./results/{args.exp_name}", "recall_level": 0.95,
    "model_name": "openai/clip-vit-large-patch14", "model_type": "CLIP", "lora_svd_init": True,
    "lora_svd_init_type": "large", "lora_settings": None, "searcher": "text_only",
    "candi_ratios": [0, 0.1, 0.2], "weight_type": "W_k", "best_scorer": "loss", "best_metric": "locoop_loss",
    "locoop_lambda": 0.05, "locoop_top_k": 4, "use_pred_label": False, "freeze_proj": False,
}
FINETUNE = {  # the keys of SeTAR's configs/finetune/clip_base/ID_ImageNet1K/SeTAR+FT.json, our values
    "data_root": "/somewhere", "id_dataset": "ID_ImageNet1K", "split": "val", "batch_size": 64, "seed": 7,
    "device": "cuda", "scorers": ["mcm_score", "gl_mcm_score"], "temperature": 100, "exp_name": "SeTAR+FT",
    "log_directory": "./x", "recall_level": 0.95, "model_name": "openai/clip-vit-base-patch16",
    "model_type": "CLIP", "num_train_epochs": 3, "gradient_accumulation_steps": 1, "learning_rate": 0.02,
    "weight_decay": 0.001, "momentum": 0.8, "lr_scheduler_type": "cosine", "num_warmup_steps": 0,
    "locoop_lambda": 0.2, "locoop_top_k": 100, "lora_svd_init_type": "small", "lora_settings": SETTINGS,
}


def _merged(tmp_path, obj, name="c.json"):
    cfg = merge_from_file(get_cfg_default(), str(_write(tmp_path / name, obj)))
    validate_cfg(cfg)
    return cfg


def test_training_free_json_config_key_by_key(tmp_path):
    c = _merged(tmp_path, TRAINING_FREE)
    assert (c.DATASET.NAME, list(c.OOD.DATASETS)) == ("PascalVOC", ["iNaturalist", "SUN", "Places", "Texture",
                                                                    "ImageNet-22K", "COCO"])
    assert c.DATALOADER.TEST.BATCH_SIZE == 256 and c.SEED == 3 and c.MODEL.DEVICE == "cpu"
    assert list(c.OOD.SCORES) == ["MCM", "GL-MCM"]  # "loss" is the criterion; the benchmark keeps the shipped
    assert c.OOD.T == pytest.approx(0.5)  # softmax(100 cos / 50) = softmax(cos / 0.5)
    assert c.MODEL.BACKBONE.NAME == "ViT-L/14" and c.SETAR.PRUNE_TYPE == "large"
    assert c.SETAR.SETTINGS_FILE == "" and c.SETAR.SEARCHER == "text_only"
    assert list(c.SETAR.RATIOS) == [0.0, 0.1, 0.2] and list(c.SETAR.WEIGHT_TYPES) == ["W_k"]
    assert c.SETAR.CRITERION == "loss" and c.SETAR.LAMBDA == 0.05 and c.SETAR.TOPK == 4
    assert c.SETAR.FREEZE_PROJ is False and c.SETAR.PROMPT_TEMPLATE == SETAR_PROMPT
    assert c.INPUT.INTERPOLATION == "bicubic" and c.SETAR.MODE == "fast"  # from configs/setar/voc/SeTAR.yaml
    assert set(TRAINING_FREE) <= set(KEYS)


def test_finetune_json_config_key_by_key(tmp_path):
    path = tmp_path / "ft.json"
    c = merge_from_file(get_cfg_default(), str(_write(path, FINETUNE)))
    validate_cfg(c)
    assert c.TRAINER.NAME == "SeTARFT" and c.SETAR.FT.ADAPTER == "setar"
    assert c.DATASET.NAME == "ImageNet" and c.SETAR.FT.TRAIN_SPLIT == "val"
    assert c.DATALOADER.TRAIN_X.BATCH_SIZE == 64 and c.DATALOADER.TEST.BATCH_SIZE == 64 and c.SEED == 7
    assert list(c.OOD.SCORES) == ["MCM", "GL-MCM"] and c.OOD.T == 1.0 and c.MODEL.BACKBONE.NAME == "ViT-B/16"
    assert c.OPTIM.MAX_EPOCH == 3 and c.OPTIM.LR == 0.02 and c.OPTIM.WEIGHT_DECAY == 0.001
    assert c.OPTIM.MOMENTUM == 0.8 and c.OPTIM.LR_SCHEDULER == "cosine" and c.SETAR.FT.LR_STEP == "iter"
    assert c.OPTIM.WARMUP_EPOCH == -1 and c.SETAR.FT.LAMBDA == 0.2 and c.SETAR.FT.TOPK == 100
    assert c.SETAR.PRUNE_TYPE == "small" and c.SETAR.FT.PROMPT_TEMPLATE == SETAR_PROMPT
    assert c.SETAR.SETTINGS_FILE == str(path)  # the file is its own settings file
    assert [list(s) for s in load_settings(c.SETAR.SETTINGS_FILE)] == SETTINGS
    assert c.OPTIM.NAME == "sgd" and c.TEST.FINAL_MODEL == "last_step"  # configs/setar/finetune/imagenet/
    lora = _merged(tmp_path, {**{k: v for k, v in FINETUNE.items() if k not in ("lora_settings",
                                                                               "lora_svd_init_type")},
                              "lora_svd_init": False, "lora_r": 16, "lora_alpha": 4,
                              "target_modules": ["mlp.fc1", "self_attn.q_proj"]}, "lora.json")
    assert lora.TRAINER.NAME == "LoRA" and lora.SETAR.FT.ADAPTER == "lora"
    # SeTAR's finetune.py never passes lora_alpha to its LoRA config: peft's default 8, as SeTAR's runs
    assert lora.SETAR.FT.LORA_RANK == 16 and lora.SETAR.FT.LORA_ALPHA == 8
    assert list(lora.SETAR.WEIGHT_TYPES) == ["W_q", "W_up"]


def test_vanilla_and_swin_json_configs(tmp_path):
    vanilla = _merged(tmp_path, {k: TRAINING_FREE[k] for k in ("data_root", "id_dataset", "batch_size", "seed",
                                                               "device", "temperature", "model_name",
                                                               "model_type")} | {"split": "test",
                                                                                 "scorers": ["gl_mcm_score"]})
    assert vanilla.SETAR.SETTINGS_FILE == "none" and list(vanilla.OOD.SCORES) == ["GL-MCM"]
    swin = merge_from_file(get_cfg_default(), str(_write(tmp_path / "swin.json", {
        "model_name": "microsoft/swinv2-base-patch4-window16-256", "model_type": "SwinTransformerV2",
        "searcher": "visual_only_swin", "temperature": 1, "split": "val"})))
    assert swin.MODEL.BACKBONE.NAME == "microsoft/swinv2-base-patch4-window16-256"
    assert swin.SETAR.SEARCHER == "visual_only_swin" and swin.OOD.T == 1.0  # on the classifier's logits
    assert list(swin.OOD.SCORES) == ["MCM", "energy"]  # SeTAR's swin_base config_best.json scorers
    best = merge_from_file(get_cfg_default(), str(_write(tmp_path / "config_best.json", _setar_args())))
    assert best.SETAR.SETTINGS_FILE == str(tmp_path / "config_best.json")  # evaluates SeTAR's published settings


def test_unknown_json_key_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'lora_rank'; known keys: data_root, .*locoop_lambda.*"
                                         r"target_modules"):
        merge_from_file(get_cfg_default(), str(_write(tmp_path / "u.json", {**TRAINING_FREE, "lora_rank": 3})))


@pytest.mark.parametrize("key, value, match", [
    ("use_pred_label", True, "predicted labels are not implemented"),
    ("gradient_accumulation_steps", 2, "gradient accumulation is not implemented"),
    ("num_warmup_steps", 10, "warm-up steps are not implemented"),
    ("model_type", "LoCoOp", "--model-dir RUN"),
    ("model_name", "openai/clip-vit-huge", "known model names: openai/clip-vit-base-patch16"),
    ("id_dataset", "ID_COCO", "ID datasets here are ID_ImageNet1K, ID_VOC"),
    ("split", "test", "train on the ID validation split"),
    ("recall_level", 0.9, "FPR95"),
])
def test_values_we_cannot_honour_are_refused_with_the_reason(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=f"{key} = .* cannot be honoured: .*{match}"):
        merge_from_file(get_cfg_default(), str(_write(tmp_path / "r.json", {**FINETUNE, key: value})))


def test_our_config_best_json_is_setars_shape_and_reads_back(tmp_path, tiny_vit_path):
    from locoop.config.setar_json import save_setar_config_best

    cfg = merge_from_file(get_cfg_default(), os.path.join(REPO, "configs", "setar", "voc", "SeTAR.yaml"))
    cfg.MODEL.BACKBONE.NAME = "ViT-L/14"
    cfg.SETAR.PRUNE_TYPE = "large"
    path = save_setar_config_best(str(tmp_path / "config_best.json"), cfg, SETTINGS)
    doc = json.loads(path.read_text())
    assert set(doc) <= set(KEYS) and doc["lora_settings"] == SETTINGS
    assert (doc["id_dataset"], doc["model_name"], doc["model_type"]) == ("ID_VOC", "openai/clip-vit-large-patch14",
                                                                         "CLIP")
    assert (doc["temperature"], doc["lora_svd_init_type"], doc["split"]) == (100.0, "large", "test")
    assert [list(s) for s in load_settings(path)] == SETTINGS
    back = merge_from_file(get_cfg_default(), str(path))  # and as a SeTAR JSON config
    assert (back.DATASET.NAME, back.MODEL.BACKBONE.NAME, back.SETAR.PRUNE_TYPE, back.OOD.T) == (
        "PascalVOC", "ViT-L/14", "large", 1.0)
    assert back.SETAR.SETTINGS_FILE == str(path) and list(back.OOD.SCORES) == ["MCM", "GL-MCM"]
    cfg.MODEL.BACKBONE.NAME = tiny_vit_path  # a checkpoint path is SeTAR's "model name or path"
    assert merge_from_file(get_cfg_default(), str(save_setar_config_best(
        str(tmp_path / "p.json"), cfg, SETTINGS))).MODEL.BACKBONE.NAME == tiny_vit_path


def test_setar_search_command_takes_setars_json(tmp_path, tiny_vit_path, capsys):
    from locoop.cli import main
    from locoop.data.synthetic import make_imagenet_like, make_ood_sets

    make_imagenet_like(str(tmp_path / "data"), num_classes=3, train_per_class=1, val_per_class=2, image_size=(32, 32))
    make_ood_sets(str(tmp_path / "data"), names=["iNaturalist", "SUN", "Places", "Texture"], per_set=2,
                  image_size=(32, 32))
    settings = [["visual", "W_up", 1, 5], ["text", "W_up", 0, 0.25]]  # an absolute rank among them
    cb = _write(tmp_path / "config_best.json", _setar_args(model_name=tiny_vit_path, lora_settings=settings,
                                                           batch_size=4, device="cpu"))
    argv = ["setar-search", "--root", str(tmp_path / "data"), "--config-file", str(cb), "--output-dir",
            str(tmp_path / "out"), "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0", "OOD.PLOT", "False",
            "VERBOSE", "False"]
    assert main(argv) == 0, capsys.readouterr().err
    assert [list(s) for s in load_settings(tmp_path / "out" / "best_settings.json")] == settings
    assert '["visual", "W_up", 1, 5]' in (tmp_path / "out" / "config_best.json").read_text()  # an int, as SeTAR's
    doc = json.loads((tmp_path / "out" / "ood_results.json").read_text())
    assert doc["meta"]["setar"]["settings"] == settings and set(doc["scores"]) == {"MCM", "GL-MCM"}
    bad = _write(tmp_path / "bad.json", _setar_args(model_name=tiny_vit_path, lora_rank=4))
    assert main(argv[:4] + [str(bad)] + argv[5:]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) 'lora_rank'; known keys: data_root" in err and "Traceback" not in err
