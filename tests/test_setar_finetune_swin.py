"""SeTAR+FT and LoRA beyond CLIP-B/16: on a Swin-V2 classifier (SeTAR's [stage, block] layers) and CLIP-L/14.

Tiny random models only: a Swin-V2 from ``transformers.Swinv2Config`` (locoop.models.swinv2.make_tiny_swinv2,
written as a Hugging Face snapshot) and the ViT-L/14-shaped tiny CLIP ``tiny-vit-l14``.
"""
import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

import clip  # noqa: E402
from clip.configs import get_config  # noqa: E402
from clip.model import build_model, infer_architecture  # noqa: E402
from clip.tiny import random_state_dict  # noqa: E402
from locoop.config import get_cfg_default  # noqa: E402
from locoop.data.synthetic import make_imagenet_like, make_ood_sets, make_val_split  # noqa: E402
from locoop.engine.checkpoint import load_checkpoint  # noqa: E402
from locoop.models.swinv2 import SwinV2Classifier, is_swinv2_backbone, make_tiny_swinv2, save_snapshot  # noqa: E402
from locoop.setar.adapters import (ADAPTER_NAME, add_lora_adapters, add_setar_adapters,  # noqa: E402
                                   adapters_from_meta, base_weights_sha256, lora_targets)
from locoop.setar.settings import load_settings, validate_settings  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 4
OOD_SETS = ["iNaturalist", "Texture"]

# tiny Swin-V2: stage 0 width 16 (W_q [16, 16], W_up [32, 16]), stage 1 width 32 (W_up [64, 32], W_down [32, 64]).
SWIN_SETTINGS = [
    ["visual", "W_up", [1, 1], 0.25],    # round(0.25 * 32) = 8
    ["visual", "W_up", [1, 0], 0.0],     # kept in the file, no adapter
    ["visual", "W_q", [0, 0], 0.3],      # round(4.8) = 5
    ["visual", "W_down", [1, 0], 0.1],   # round(3.2) = 3
    ["visual", "W_v", [0, 1], 0.15625],  # 0.15625 * 16 = 2.5 exactly -> Python's round -> 2
]
SWIN_RANKS = {("visual", "W_up", (1, 1)): 8, ("visual", "W_q", (0, 0)): 5, ("visual", "W_down", (1, 0)): 3,
              ("visual", "W_v", (0, 1)): 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def swin(seed=0, num_labels=NUM_CLASSES):
    return SwinV2Classifier(make_tiny_swinv2(num_labels, seed=seed))


def _images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


# The split is SeTAR's: a float32 SVD, base = the kept components' reconstruction, B A = the minor
# ones; base + B A equals W up to float32 rounding (~1e-7 per weight), which a few blocks with
# post-norms grow to ~2e-6 of the logits. Not bitwise by construction; far below any effect.
START_TOL = 1e-5


# ====================================================================================== adapters on Swin-V2
def test_settings_with_stage_block_layers():
    model = swin()
    checked = validate_settings(SWIN_SETTINGS, model)
    assert [c[2] for c in checked] == [(1, 1), (1, 0), (0, 0), (1, 0), (0, 1)]
    with pytest.raises(ValueError, match="block 2 of layer"):
        validate_settings([["visual", "W_up", [1, 2], 0.1]], model)
    with pytest.raises(ValueError, match="vision-only"):
        validate_settings([["text", "W_up", [0, 0], 0.1]], model)
    with pytest.raises(ValueError, match=r"\[stage, block\]"):
        validate_settings([["visual", "W_up", [0, 0, 1], 0.1]], model)
    with pytest.raises(ValueError, match="W_p"):
        validate_settings([["visual", "W_p", None, 0.1]], model)
    with pytest.raises(ValueError, match="already set"):
        validate_settings([["visual", "W_up", [0, 1], 0.1], ["visual", "W_up", (0, 1), 0.2]], model)


def test_setar_adapters_on_swin_start_at_the_unpruned_model():
    ref, model = swin(), swin()
    x = _images()
    adapters = add_setar_adapters(model, SWIN_SETTINGS, backbone="tiny-swin")
    assert adapters.ranks() == SWIN_RANKS
    assert all(float(adapters.layer(k).scaling[ADAPTER_NAME]) == 1.0 for k in SWIN_RANKS)
    with torch.no_grad():
        (g, loc), (g0, loc0) = model(x, return_local=True), ref(x, return_local=True)
    assert g.shape == g0.shape == (3, NUM_CLASSES) and loc.shape == loc0.shape == (3, 64, NUM_CLASSES)
    assert _max_rel(g, g0) < START_TOL and _max_rel(loc, loc0) < START_TOL
    # every adapted matrix is reconstructed (base + B A = W), and the base alone is a real truncation
    for key, k in SWIN_RANKS.items():
        w0 = ref.get_linear(key[1], key[2]).weight
        assert _max_rel(adapters.merged_weight(key), w0) < 5e-6
        base = adapters.layer(key).get_base_layer().weight
        assert torch.linalg.matrix_rank(base.double(), rtol=1e-6).item() == min(w0.shape) - k
    meta = adapters.meta
    assert meta["settings"] == [[t, w, list(l), float(r)] for t, w, l, r in SWIN_SETTINGS if r > 0]
    assert meta["base_sha256"] == base_weights_sha256(ref)
    assert json.loads(json.dumps(meta)) == meta  # a Swin description is plain JSON ([stage, block] lists)
    for key in SWIN_RANKS:
        adapters.layer(key).lora_B[ADAPTER_NAME].weight.data.zero_()
    with torch.no_grad():
        assert (model(x) - g0).abs().max().item() > 1e-4


def test_adapter_state_reloads_on_swin_and_refuses_another_base():
    model = swin()
    adapters = add_setar_adapters(model, SWIN_SETTINGS)
    with torch.no_grad():
        for p in adapters.params.values():
            p.add_(0.01)
    state = adapters.state_dict()
    assert "params.visual:W_up:1_1:A" in state
    fresh = swin()
    rebuilt = adapters_from_meta(fresh, json.loads(json.dumps(state["_extra_state"])))
    rebuilt.load_state_dict(state)
    x = _images()
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="another base model"):
        adapters_from_meta(swin(seed=1), state["_extra_state"])


def test_lora_on_swin_targets_every_block_and_starts_unchanged():
    ref, model = swin(), swin()
    keys = lora_targets(model, ["W_up"])
    assert keys == [("visual", "W_up", layer) for layer in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    adapters = add_lora_adapters(model, ["W_up"], rank=4, alpha=16)
    assert set(adapters.ranks().values()) == {4}
    assert {float(adapters.layer(k).scaling[ADAPTER_NAME]) for k in keys} == {4.0}
    names = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert names == sorted(f"swinv2.encoder.layers.{s}.blocks.{b}.intermediate.dense" for _, _, (s, b) in keys)
    for k in keys:
        assert torch.count_nonzero(adapters.layer(k).lora_B[ADAPTER_NAME].weight) == 0  # peft's B = 0
    x = _images()
    with torch.no_grad():
        (g, loc), (g0, loc0) = model(x, return_local=True), ref(x, return_local=True)
    assert torch.equal(g, g0) and torch.equal(loc, loc0)
    with pytest.raises(ValueError, match="no projection W_p"):
        lora_targets(swin(), ["W_up"], include_proj=True)
    with pytest.raises(ValueError, match="LORA_RANK 40 exceeds"):
        add_lora_adapters(swin(), ["W_up"], rank=40, alpha=16)


# ====================================================================================== trainers on Swin-V2
@pytest.fixture(scope="module")
def swin_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("swinft")
    make_imagenet_like(str(root), num_classes=NUM_CLASSES, train_per_class=4, val_per_class=2, image_size=(40, 40),
                       seed=0)
    make_ood_sets(str(root), names=OOD_SETS, per_set=3, image_size=(40, 40), seed=1)
    make_val_split(str(root / "val.json"), str(root / "imagenet" / "images" / "train"), per_class=1, seed=0)
    with open(root / "settings.json", "w") as f:
        json.dump(SWIN_SETTINGS, f)
    save_snapshot(make_tiny_swinv2(NUM_CLASSES, seed=0), root / "swin")
    save_snapshot(make_tiny_swinv2(NUM_CLASSES, seed=1), root / "swin_seed1")
    save_snapshot(make_tiny_swinv2(NUM_CLASSES + 1, seed=0), root / "swin_5cls")
    return root


def _cfg(root, out, trainer="SeTARFT", backbone=None, epochs=1, settings=None):
    cfg = get_cfg_default()
    cfg.merge_from_file(os.path.join(REPO, f"configs/setar/finetune/imagenet/swin_base/"
                                           f"{'SeTAR+FT' if trainer == 'SeTARFT' else 'LoRA'}.yaml"))
    cfg.SEED = 1
    cfg.VERBOSE = False
    cfg.OUTPUT_DIR = str(out)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = str(backbone or root / "swin")
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NUM_SHOTS = 2
    cfg.DATASET.VAL_SPLIT_FILE = str(root / "val.json")
    cfg.INPUT.SIZE = (32, 32)  # the tiny snapshot's image_size (SeTAR's configs: 256)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 2
    cfg.DATALOADER.TEST.BATCH_SIZE = 8
    cfg.OPTIM.LR = 0.05
    cfg.OPTIM.MAX_EPOCH = epochs
    cfg.TRAIN.CHECKPOINT_FREQ = 1
    cfg.TEST.NO_TEST = True
    cfg.SETAR.SETTINGS_FILE = str(root / "settings.json") if settings is None else settings
    cfg.SETAR.FT.TOPK = 2
    cfg.SETAR.FT.LORA_RANK = 4
    return cfg


def _build(cfg):
    import locoop.setar.finetune  # noqa: F401  (registers the trainers)
    from locoop.engine.registry import build_trainer

    return build_trainer(cfg)


def _hand_locoop_loss(logits, local, labels, lam, top_k):
    """The LoCoOp loss written out (SeTAR's loss.py): CE + lam * (-mean entropy of the OOD patches)."""
    loss_id = F.cross_entropy(logits, labels)
    order = torch.argsort(local, dim=-1, descending=True)[..., :top_k]          # [B, N, K]
    is_ood = ~(order == labels[:, None, None]).any(-1)                          # [B, N]
    p = torch.softmax(local[is_ood], dim=-1)
    loss_ood = -(-(p * torch.log(p + 1e-5)).sum(-1)).mean() if p.shape[0] else torch.zeros(())
    return loss_id + lam * loss_ood, loss_id, loss_ood


def test_swin_setar_ft_trainer_one_step(swin_root, tmp_path):
    trainer = _build(_cfg(swin_root, tmp_path / "ft"))
    assert trainer.is_swin and trainer.clip_model is trainer.swin_model and trainer.text_features() is None
    assert trainer.adapters.ranks() == SWIN_RANKS
    assert trainer.lam == 0.01 and trainer.cfg.SETAR.FT.TOPK == 2  # the config's lambda, our tiny top-K
    # SeTAR's Swin transforms (build_transform picks them for a Swin-V2 backbone) at INPUT.SIZE
    assert len(trainer.train_loader_x.dataset) == NUM_CLASSES  # the one-image-per-class val split
    batch = next(iter(trainer.train_loader_x))
    assert tuple(batch["img"].shape[1:]) == (3, 32, 32)
    assert "ColorJitter" in repr(trainer.dm.tfm_train) and "CenterCrop" in repr(trainer.dm.tfm_test)
    ref = swin()
    x = _images()
    with torch.no_grad():
        assert _max_rel(trainer.swin_model(x), ref(x)) < START_TOL
    base_before = {n: p.detach().clone() for n, p in trainer.swin_model.named_parameters()}
    adapter_ids = {id(p) for p in trainer.adapters.params.values()}
    adapter_names = {n for n, p in trainer.swin_model.named_parameters() if id(p) in adapter_ids}
    assert len(adapter_names) == 2 * len(SWIN_RANKS)

    # the loss of one step equals the LoCoOp loss written out on the classifier's raw logits
    images, labels = _images(2), torch.tensor([1, 3])
    with torch.no_grad():
        logits, local = trainer.swin_model(images, return_local=True)
        want = _hand_locoop_loss(logits, local, labels, 0.01, 2)
    trainer.set_model_mode("train")
    assert trainer.swin_model.training  # SeTAR's model.train()
    out = trainer.forward_backward({"img": images, "label": labels})
    assert out["loss"] == pytest.approx(want[0].item(), rel=1e-5, abs=1e-6)
    assert out["loss_id"] == pytest.approx(want[1].item(), rel=1e-5, abs=1e-6)
    assert out["loss_ood"] == pytest.approx(want[2].item(), rel=1e-5, abs=1e-6)
    # gradients reached every adapter, finite; only adapter parameters moved
    for p in trainer.adapters.params.values():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    for n, p in trainer.swin_model.named_parameters():
        if n in adapter_names:
            assert not torch.equal(p, base_before[n]), n
        else:
            assert torch.equal(p, base_before[n]), n
    trainer.set_model_mode("eval")
    assert not trainer.swin_model.training


def test_swin_trainers_train_checkpoint_and_reload(swin_root, tmp_path):
    run = tmp_path / "run"
    trainer = _build(_cfg(swin_root, run))
    trainer.train()
    ckpt = load_checkpoint(str(run / "adapters" / "model.pth.tar-1"))
    meta = ckpt["state_dict"]["_extra_state"]
    assert meta["kind"] == "setar" and meta["base_sha256"] == base_weights_sha256(swin())
    assert [m[2] for m in meta["modules"]] == [[1, 1], [0, 0], [1, 0], [0, 1]]
    # rebuilt from the checkpoint alone, the same classifier
    evaluator = _build(_cfg(swin_root, tmp_path / "eval", settings=""))
    evaluator.load_model(str(run))
    x = _images()
    with torch.no_grad():
        assert torch.allclose(evaluator.model_inference(x), trainer.model_inference(x), atol=1e-5)
    with pytest.raises(ValueError, match="another base model"):
        _build(_cfg(swin_root, tmp_path / "o", backbone=swin_root / "swin_seed1")).load_model(str(run))
    with pytest.raises(ValueError, match="has 5 classes but the dataset has 4"):
        _build(_cfg(swin_root, tmp_path / "c", backbone=swin_root / "swin_5cls"))
    lora = _build(_cfg(swin_root, tmp_path / "lora", trainer="LoRA"))
    assert sorted(lora.adapters.ranks()) == [("visual", "W_up", (s, b)) for s in (0, 1) for b in (0, 1)]
    lora.train()
    for key in lora.adapters.keys():
        assert torch.count_nonzero(lora.adapters.layer(key).lora_B[ADAPTER_NAME].weight) > 0


# ====================================================================================== configs
def test_shipped_swin_and_clip_large_finetune_configs_load():
    from locoop.config.checks import check_setar_ft, validate_cfg

    paths = sorted(glob.glob(os.path.join(REPO, "configs/setar/finetune/imagenet/*/*.yaml")))
    names = {os.path.relpath(p, os.path.join(REPO, "configs/setar/finetune/imagenet")) for p in paths}
    assert {"swin_base/SeTAR+FT.yaml", "swin_base/LoRA.yaml", "clip_large/SeTAR+FT.yaml",
            "clip_large/LoRA.yaml"} <= names
    # SeTAR's values: (batch, lambda, top-K, T, LoRA rank)
    want = {"swin_base": (50, 0.01, 700, 100.0, 112), "clip_large": (20, 0.5, 300, 1.0, 64)}
    for path in paths:
        family, kind = path.split(os.sep)[-2], os.path.basename(path)
        if family not in want:
            continue
        cfg = get_cfg_default()
        cfg.merge_from_file(path)
        validate_cfg(cfg)
        check_setar_ft(cfg)
        batch, lam, top_k, t, rank = want[family]
        assert (cfg.DATALOADER.TRAIN_X.BATCH_SIZE, cfg.SETAR.FT.LAMBDA, cfg.SETAR.FT.TOPK, cfg.OOD.T) == \
            (batch, lam, top_k, t), path
        assert cfg.SEED == 5 and cfg.OPTIM.MAX_EPOCH == 5 and cfg.OPTIM.LR == 0.01 and cfg.SETAR.FT.LR_STEP == "iter"
        assert cfg.TRAINER.NAME == ("SeTARFT" if kind == "SeTAR+FT.yaml" else "LoRA")
        if kind == "LoRA.yaml":
            assert cfg.SETAR.FT.LORA_RANK == rank and list(cfg.SETAR.WEIGHT_TYPES) == ["W_up"]
        if family == "swin_base":
            assert is_swinv2_backbone(cfg.MODEL.BACKBONE.NAME)
        else:
            assert cfg.MODEL.BACKBONE.NAME == "ViT-L/14" and cfg.SETAR.FT.PROMPT_TEMPLATE == "a photo of a {}"
            assert not is_swinv2_backbone(cfg.MODEL.BACKBONE.NAME)
            arch = get_config(cfg.MODEL.BACKBONE.NAME)
            assert tuple(cfg.INPUT.SIZE) == (arch.image_resolution,) * 2 == (224, 224)


# ====================================================================================== CLIP-L/14
def test_vit_l14_shapes_load_as_our_clip_from_an_hf_snapshot_layout():
    """openai/clip-vit-large-patch14 (SeTAR's CLIP-L): its HF layout converts to our ViT-L/14 (no memory used)."""
    from clip import hf

    sd = random_state_dict("ViT-L/14", device="meta")
    hf_sd = hf.openai_to_hf_state_dict(sd)
    config = hf.hf_config_dict(sd)
    assert config["vision_config"]["patch_size"] == 14 and config["vision_config"]["image_size"] == 224
    assert config["vision_config"]["hidden_size"] == 1024 and config["text_config"]["hidden_size"] == 768
    hf.check_hf_config(config)
    back = hf.convert_hf_state_dict(hf_sd, config)
    assert infer_architecture(back) == get_config("ViT-L/14").model_kwargs()
    assert get_config("ViT-L/14").grid_size == 16


def test_tiny_vit_l14_forward_backward_and_setar_ft():
    cfg = get_config("tiny-vit-l14")
    assert cfg.vision_patch_size == 14 and cfg.grid_size == 4 and cfg.vision_width > cfg.transformer_width
    ref, model = (build_model(random_state_dict("tiny-vit-l14", seed=0)) for _ in range(2))
    images = _images(2, size=56)
    tokens = clip.tokenize([f"a photo of a thing{i}" for i in range(3)])
    settings = [["visual", "W_up", 2, 0.25], ["visual", "W_o", 0, 0.1], ["text", "W_up", 1, 0.2]]
    adapters = add_setar_adapters(model, settings)
    assert adapters.ranks() == {("visual", "W_up", 2): 32, ("visual", "W_o", 0): 13, ("text", "W_up", 1): 13}
    with torch.no_grad():
        g, loc = model.encode_image(images, return_local=True)
        g0, loc0 = ref.encode_image(images, return_local=True)
    assert loc.shape == (2, 16, cfg.embed_dim)  # the 4x4 grid of 14 px patches
    assert _max_rel(g, g0) < START_TOL and _max_rel(loc, loc0) < START_TOL
    g, loc = model.encode_image(images, return_local=True)
    text = model.encode_text(tokens)
    (g.sum() + loc.square().mean() + text.sum()).backward()
    for p in adapters.params.values():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# ====================================================================================== command
def test_swin_finetune_command_end_to_end(swin_root, tmp_path):
    """setar-finetune on a tiny Swin-V2 snapshot: fine-tune, then the shared OOD benchmark (the runner's
    classifier path), the same result files as CLIP; a rerun and a --model-dir test give the same scores."""
    import numpy as np

    from locoop.cli import main

    out = tmp_path / "cmd"
    cfg_file = os.path.join(REPO, "configs/setar/finetune/imagenet/swin_base/SeTAR+FT.yaml")
    overrides = ["MODEL.BACKBONE.NAME", str(swin_root / "swin"), "MODEL.DEVICE", "cpu", "DATASET.VAL_SPLIT_FILE",
                 str(swin_root / "val.json"), "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0",
                 "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "OPTIM.MAX_EPOCH", "1", "OOD.DATASETS", str(OOD_SETS),
                 "OOD.PLOT", "False", "SETAR.FT.TOPK", "2", "VERBOSE", "False"]
    argv = ["setar-finetune", "--root", str(swin_root), "--config-file", cfg_file, "--output-dir", str(out),
            "--settings", str(swin_root / "settings.json")] + overrides
    assert main(argv) == 0
    for name in ("ood_results.json", "ood_results.md", "ood_results.csv", "ood_scores.npz", "run_info.json",
                 "finetune_settings.json", "config.yaml", "adapters/model.pth.tar-1"):
        assert (out / name).is_file(), name
    results = json.loads((out / "ood_results.json").read_text())
    text = json.dumps(results)
    assert "GL-MCM" in text and "iNaturalist" in text and "Texture" in text and "id_accuracy" in results
    saved = json.loads((out / "finetune_settings.json").read_text())
    assert saved == [s for s in SWIN_SETTINGS if s[3] > 0]
    assert load_settings(str(out / "finetune_settings.json"), swin())[0][2] == (1, 1)
    info = json.loads((out / "run_info.json").read_text())
    assert info["adapters"]["kind"] == "setar" and info["trainer"] == "SeTARFT"
    # testing the finished run from its folder alone (no settings): the same scores
    again = tmp_path / "again"
    assert main(["setar-finetune", "--root", str(swin_root), "--config-file", cfg_file, "--model-dir", str(out),
                 "--output-dir", str(again)] + overrides) == 0
    assert json.loads((again / "ood_results.json").read_text())["id_accuracy"] == results["id_accuracy"]
    a, b = np.load(out / "ood_scores.npz"), np.load(again / "ood_scores.npz")
    assert sorted(a.files) == sorted(b.files) and "Texture/GL-MCM" in a.files
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    # the ID scores are those of the fine-tuned classifier, written out (T 100 on the raw logits)
    evaluator = _build(_cfg(swin_root, tmp_path / "hand", settings=""))
    evaluator.load_model(str(out))
    evaluator.set_model_mode("eval")
    logits, local, labels = [], [], []
    with torch.no_grad():
        for batch in evaluator.test_loader:
            g, loc = evaluator.swin_model(batch["img"], return_local=True)
            logits.append(g), local.append(loc), labels.append(batch["label"])
    logits, local, labels = torch.cat(logits), torch.cat(local), torch.cat(labels)
    mcm = torch.softmax(logits / 100.0, dim=-1).max(-1).values
    gl_mcm = mcm + torch.softmax(local / 100.0, dim=-1).amax(dim=(1, 2))
    np.testing.assert_array_equal(a["id_labels"], labels.numpy())
    np.testing.assert_allclose(a["ID/MCM"], mcm.numpy(), atol=1e-6)
    np.testing.assert_allclose(a["ID/GL-MCM"], gl_mcm.numpy(), atol=1e-6)
    # fine-tuning only
    only = tmp_path / "only"
    assert main(["setar-finetune", "--root", str(swin_root), "--config-file", cfg_file, "--output-dir", str(only),
                 "--settings", str(swin_root / "settings.json"), "--no-test"] + overrides) == 0
    assert (only / "adapters" / "model.pth.tar-1").is_file() and not (only / "ood_results.json").exists()


def test_setar_json_finetune_configs_build_on_the_family_configs(tmp_path):
    """SeTAR's own swin_base / clip_large fine-tuning JSON files merge on our config of that family."""
    from locoop.config import merge_from_file

    common = {"id_dataset": "ID_ImageNet1K", "split": "val", "seed": 5, "num_train_epochs": 5,
              "learning_rate": 0.01, "lr_scheduler_type": "cosine", "num_warmup_steps": 0}
    swin_json = dict(common, model_name="microsoft/swinv2-base-patch4-window16-256", model_type="SwinTransformerV2",
                     batch_size=50, temperature=100, locoop_lambda=0.01, locoop_top_k=700, lora_svd_init_type="small",
                     lora_settings=SWIN_SETTINGS, scorers=["mcm_score", "gl_mcm_score"])
    path = tmp_path / "swin_ft.json"
    path.write_text(json.dumps(swin_json))
    cfg = merge_from_file(get_cfg_default(), str(path))
    assert tuple(cfg.INPUT.SIZE) == (256, 256) and list(cfg.INPUT.PIXEL_MEAN) == [0.485, 0.456, 0.406]
    assert is_swinv2_backbone(cfg.MODEL.BACKBONE.NAME) and cfg.TRAINER.NAME == "SeTARFT"
    assert (cfg.SETAR.FT.LAMBDA, cfg.SETAR.FT.TOPK, cfg.OOD.T) == (0.01, 700, 100.0)
    lora_json = dict(common, model_name="openai/clip-vit-large-patch14", model_type="CLIP", batch_size=20,
                     temperature=100, locoop_lambda=0.5, locoop_top_k=300, lora_svd_init=False, lora_r=64,
                     lora_alpha=16, target_modules=["mlp.fc1"], scorers=["mcm_score", "gl_mcm_score"])
    path = tmp_path / "clip_large_lora.json"
    path.write_text(json.dumps(lora_json))
    cfg = merge_from_file(get_cfg_default(), str(path))
    assert cfg.MODEL.BACKBONE.NAME == "ViT-L/14" and cfg.TRAINER.NAME == "LoRA"
    assert (cfg.SETAR.FT.LORA_RANK, list(cfg.SETAR.WEIGHT_TYPES), cfg.OOD.T) == (64, ["W_up"], 1.0)
    assert cfg.SETAR.FT.PROMPT_TEMPLATE == "a photo of a {}"


def test_swin_search_then_finetune_on_its_best_settings(swin_root, tmp_path):
    """The chain SeTAR runs: setar-search on the Swin-V2 writes [stage, block] settings, SeTAR+FT trains on them."""
    from locoop.cli import main

    search = tmp_path / "search"
    common = ["MODEL.BACKBONE.NAME", str(swin_root / "swin"), "MODEL.DEVICE", "cpu", "DATASET.VAL_SPLIT_FILE",
              str(swin_root / "val.json"), "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0",
              "OOD.DATASETS", str(OOD_SETS), "OOD.PLOT", "False", "VERBOSE", "False"]
    assert main(["setar-search", "--root", str(swin_root), "--config-file",
                 os.path.join(REPO, "configs/setar/imagenet/swin_base/SeTAR.yaml"), "--output-dir", str(search),
                 "SETAR.TOPK", "2", "SETAR.RATIOS", "[0.0, 0.25, 0.5]"] + common) == 0
    best = json.loads((search / "best_settings.json").read_text())["settings"]
    assert all(isinstance(s[2], list) and len(s[2]) == 2 for s in best)
    if not any(s[3] > 0 for s in best):  # the criterion may keep every matrix whole: prune one for the chain
        best[0][3] = 0.25
        (search / "best_settings.json").write_text(json.dumps({"format": "locoop.setar.settings", "complete": True,
                                                               "settings": best}))
    out = tmp_path / "ft"
    assert main(["setar-finetune", "--root", str(swin_root), "--config-file",
                 os.path.join(REPO, "configs/setar/finetune/imagenet/swin_base/SeTAR+FT.yaml"), "--output-dir",
                 str(out), "--settings", str(search / "best_settings.json"), "DATALOADER.TRAIN_X.BATCH_SIZE", "2",
                 "OPTIM.MAX_EPOCH", "1", "SETAR.FT.TOPK", "2"] + common) == 0
    assert json.loads((out / "finetune_settings.json").read_text()) == [s for s in best if s[3] > 0]
    assert (out / "ood_results.json").is_file()
