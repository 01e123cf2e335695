"""SeTAR+FT and LoRA adapters (locoop/setar/adapters.py), their trainers and the setar-finetune command."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import clip
from clip.model import build_model
from clip.tiny import make_tiny_checkpoint, random_state_dict
from locoop.config import get_cfg_default
from locoop.data.synthetic import make_imagenet_like, make_ood_sets, make_val_split
from locoop.engine.checkpoint import load_checkpoint
from locoop.setar.adapters import (ADAPTER_NAME, AdapterSet, add_lora_adapters, add_setar_adapters,
                                   adapters_from_meta, base_weights_sha256)
from locoop.setar.lowrank import get_linear
from locoop.trainers.loss import locoop_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
NUM_CLASSES = 4
OOD_SETS = ["iNaturalist", "Texture"]

# tiny-vit: width 64 (W_q [64, 64], W_up [256, 64], W_down [64, 256]), embed 32 (visual W_p [32, 64]).
SETTINGS = [
    ["visual", "W_up", 1, 0.25],      # round(0.25 * 64) = 16
    ["visual", "W_up", 0, 0.0],       # kept in the file, no adapter
    ["visual", "W_p", None, 0.1],     # round(0.1 * 32) = 3
    ["text", "W_q", 0, 0.2],          # round(12.8) = 13
    ["text", "W_k", 1, 0.0390625],    # 0.0390625 * 64 = 2.5 exactly -> Python's round -> 2
    ["text", "W_down", 1, 0.1],       # round(6.4) = 6
]
RANKS = {("visual", "W_up", 1): 16, ("visual", "W_p", None): 3, ("text", "W_q", 0): 13, ("text", "W_k", 1): 2,
         ("text", "W_down", 1): 6}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed=0):
    return build_model(random_state_dict("tiny-vit", seed=seed))


def _inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = clip.tokenize([f"a photo of a thing{i}." for i in range(NUM_CLASSES)])
    return images, tokens


def _features(model, images, tokens):
    with torch.no_grad():
        g, loc = model.encode_image(images, return_local=True)
        return g, loc, model.encode_text(tokens)


# ====================================================================================== adapters
def test_setar_adapters_start_equal_to_the_unpruned_model():
    ref, model = tiny(), tiny()
    images, tokens = _inputs()
    adapters = add_setar_adapters(model, SETTINGS)
    for a, b in zip(_features(model, images, tokens), _features(ref, images, tokens)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-5
    # and the base alone is a real truncation: without the adapters the output moves
    for key in RANKS:
        adapters.layer(key).lora_B[ADAPTER_NAME].weight.data.zero_()
    g, _, t = _features(model, images, tokens)
    g0, _, t0 = _features(ref, images, tokens)
    assert (g - g0).abs().max().item() > 1e-4 and (t - t0).abs().max().item() > 1e-4


def test_setar_split_matches_the_svd_by_hand():
    ref, model = tiny(), tiny()
    adapters = add_setar_adapters(model, SETTINGS)
    assert adapters.ranks() == RANKS
    assert sorted(adapters.keys(), key=str) == sorted(RANKS, key=str)
    for key, k in RANKS.items():
        w = get_linear(ref, *key).weight.detach()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        layer = adapters.layer(key)
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        base = layer.get_base_layer().weight
        assert a.shape == (k, w.shape[1]) and b.shape == (w.shape[0], k)
        assert float(layer.scaling[ADAPTER_NAME]) == 1.0
        minor = (u[:, -k:] * s[-k:]) @ vh[-k:]
        principal = (u[:, :-k] * s[:-k]) @ vh[:-k]
        assert torch.allclose(b @ a, minor, atol=1e-5)
        assert torch.allclose(base, principal, atol=1e-5)
        # A = sqrt(S) V^T and B = U sqrt(S): equal factor norms per component, each sqrt(s_i)
        assert torch.allclose(a.norm(dim=1), s[-k:].sqrt(), atol=1e-5)
        assert torch.allclose(b.norm(dim=0), s[-k:].sqrt(), atol=1e-5)
        assert torch.linalg.matrix_rank(base).item() == min(w.shape) - k
        assert torch.allclose(adapters.merged_weight(key), w, atol=1e-5)
        # biases stay as they were, frozen
        if layer.get_base_layer().bias is not None:
            assert torch.equal(layer.get_base_layer().bias, get_linear(ref, *key).bias)
            assert not layer.get_base_layer().bias.requires_grad


def test_large_prune_type_puts_the_largest_components_in_the_adapter():
    ref, model = tiny(), tiny()
    adapters = add_setar_adapters(model, [["visual", "W_up", 1, 0.25]], prune_type="large")
    key = ("visual", "W_up", 1)
    s = torch.linalg.svdvals(get_linear(ref, *key).weight.detach())
    s_adapter = torch.linalg.svdvals(adapters.delta_weight(key).detach())[:16]
    assert torch.allclose(s_adapter, s[:16], atol=1e-4)


def test_only_adapters_receive_gradients():
    model = tiny()
    adapters = add_setar_adapters(model, SETTINGS)
    images, tokens = _inputs()
    labels = torch.tensor([0, 1, 3])
    g, loc = model.encode_image(images, return_local=True)
    t = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    scale = model.logit_scale.exp()
    logits = scale * torch.nn.functional.normalize(g, dim=-1) @ t.t()
    local = scale * torch.nn.functional.normalize(loc, dim=-1) @ t.t()
    loss, _, _ = locoop_loss(logits, local, labels, 0.1, 2)
    loss.backward()
    adapter_ids = {id(p) for p in adapters.params.values()}
    assert len(adapter_ids) == 2 * len(RANKS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(adapter_ids) and all("lora_" in n for n in trainable)
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.grad is not None and p.grad.abs().sum().item() > 0, name
        else:
            assert p.grad is None, name


def test_lora_baseline_starts_equal_and_has_one_rank():
    ref, model = tiny(), tiny()
    torch.manual_seed(0)
    adapters = add_lora_adapters(model, ["W_up", "W_v"], rank=4, alpha=16)
    keys = [(t, w, l) for t in ("visual", "text") for l in (0, 1) for w in ("W_up", "W_v")]
    assert adapters.keys() == keys
    assert set(adapters.ranks().values()) == {4}
    images, tokens = _inputs()
    for a, b in zip(_features(model, images, tokens), _features(ref, images, tokens)):
        assert torch.equal(a, b)  # B = 0 adds exactly nothing
    for key in keys:
        layer = adapters.layer(key)
        assert torch.count_nonzero(layer.lora_B[ADAPTER_NAME].weight) == 0
        assert layer.lora_A[ADAPTER_NAME].weight.abs().sum() > 0
        assert float(layer.scaling[ADAPTER_NAME]) == 4.0  # alpha / rank
        assert torch.equal(layer.get_base_layer().weight, get_linear(ref, *key).weight)
    with_proj = add_lora_adapters(tiny(), ["W_up"], rank=2, alpha=2, include_proj=True)
    assert ("visual", "W_p", None) in with_proj.keys() and ("text", "W_p", None) in with_proj.keys()


def test_text_and_visual_module_names_do_not_collide():
    # 'transformer.resblocks.0.mlp.c_fc' (text) is a suffix of the visual block's name.
    model = tiny()
    adapters = add_setar_adapters(model, [["text", "W_up", 0, 0.25]])
    assert adapters.keys() == [("text", "W_up", 0)]
    from peft.tuners.lora import LoraLayer

    assert not isinstance(model.visual.transformer.resblocks[0].mlp.c_fc, LoraLayer)
    assert isinstance(model.transformer.resblocks[0].mlp.c_fc, LoraLayer)


def test_base_hash_identifies_the_weights(tiny_vit_path, tiny_vit_jit_path):
    a, _ = clip.load(tiny_vit_path, device="cpu")
    b, _ = clip.load(tiny_vit_jit_path, device="cpu")
    assert base_weights_sha256(a) == base_weights_sha256(b)  # same weights, other file format
    with torch.no_grad():
        b.transformer.resblocks[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert base_weights_sha256(a) != base_weights_sha256(b)


@pytest.mark.parametrize("settings, err, match", [
    ([["visual", "W_up", 5, 0.1]], ValueError, "layer index in 0..1"),
    ([["visual", "W_xx", 0, 0.1]], ValueError, "unknown weight type"),
    ([["visual", "W_up", 0, 2.5]], ValueError, r"\[0, 1\) .* or a whole number >= 1"),
    ([["visual", "W_up", 0, 0.1], ["text", "W_up", 1, 64]], ValueError, "which has 64; give at most 63"),
    ([["visual", "W_up", 0, 0.0], ["text", "W_up", 1, 0.001]], ValueError, "nothing to fine-tune"),
    ([["visual", "W_up", 0, 0.1], ["visual", "W_up", 0, 0.2]], ValueError, "already set"),
])
def test_bad_settings_are_refused_before_the_model_changes(settings, err, match):
    model = tiny()
    before = base_weights_sha256(model)
    with pytest.raises(err, match=match):
        add_setar_adapters(model, settings)
    assert base_weights_sha256(model) == before


# ====================================================================================== checkpoints
def _trained(adapters):
    with torch.no_grad():
        for p in adapters.params.values():
            p.add_(0.01 * torch.randn_like(p))
    return adapters


def test_state_dict_round_trip_and_refusals():
    torch.manual_seed(0)
    model = tiny()
    adapters = _trained(add_setar_adapters(model, SETTINGS))
    state = adapters.state_dict()
    assert set(state) == {"_extra_state"} | {f"params.{k}" for k in adapters.params}
    images, tokens = _inputs()
    want = _features(model, images, tokens)

    # rebuilt from the description on a fresh base, then loaded: the same model
    fresh = tiny()
    rebuilt = adapters_from_meta(fresh, state["_extra_state"])
    rebuilt.load_state_dict(state)
    for a, b in zip(_features(fresh, images, tokens), want):
        assert (a - b).abs().max().item() < 1e-5

    # other settings, another base model, another kind, no description: refused, nothing copied
    other = add_setar_adapters(tiny(), SETTINGS[:3])
    snapshot = {k: v.clone() for k, v in other.state_dict().items() if k != "_extra_state"}
    with pytest.raises(ValueError, match="adapts other matrices or ranks"):
        other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in snapshot.items())
    with pytest.raises(ValueError, match="another base model"):
        add_setar_adapters(tiny(seed=1), SETTINGS).load_state_dict(state)
    with pytest.raises(ValueError, match="another base model"):
        adapters_from_meta(tiny(seed=1), state["_extra_state"])
    with pytest.raises(ValueError, match="holds 'setar' adapters"):
        add_lora_adapters(tiny(), ["W_up"], 2, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="prune_type"):
        add_setar_adapters(tiny(), SETTINGS, prune_type="large").load_state_dict(state)
    no_meta = {k: v for k, v in state.items() if k != "_extra_state"}
    with pytest.raises(ValueError, match="no adapter description"):
        add_setar_adapters(tiny(), SETTINGS).load_state_dict(no_meta)
    with pytest.raises(ValueError, match="no adapters were built"):
        AdapterSet().load_state_dict(state)


# ====================================================================================== trainers
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftdata")
    make_imagenet_like(str(root), num_classes=NUM_CLASSES, train_per_class=4, val_per_class=2, image_size=(32, 32),
                       seed=0)
    make_ood_sets(str(root), names=OOD_SETS, per_set=3, image_size=(32, 32), seed=1)
    make_val_split(str(root / "val.json"), str(root / "imagenet" / "images" / "train"), per_class=1, seed=0)
    with open(root / "settings.json", "w") as f:
        json.dump(SETTINGS, f)
    return root


def _cfg(root, backbone, out, trainer="SeTARFT", epochs=2, settings=None, **ft):
    cfg = get_cfg_default()
    cfg.SEED = 1
    cfg.VERBOSE = False
    cfg.OUTPUT_DIR = str(out)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.TRAINER.NAME = trainer
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NAME = "ImageNet"
    cfg.DATASET.NUM_SHOTS = 2
    cfg.INPUT.SIZE = (32, 32)
    cfg.INPUT.TRANSFORMS = ["random_flip", "normalize"]
    cfg.INPUT.PIXEL_MEAN = MEAN
    cfg.INPUT.PIXEL_STD = STD
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 4
    cfg.DATALOADER.TEST.BATCH_SIZE = 8
    cfg.OPTIM.NAME = "sgd"
    cfg.OPTIM.LR = 0.05
    cfg.OPTIM.MAX_EPOCH = epochs
    cfg.OPTIM.LR_SCHEDULER = "cosine"
    cfg.TRAIN.CHECKPOINT_FREQ = 1
    cfg.TEST.NO_TEST = True
    cfg.SETAR.SETTINGS_FILE = str(root / "settings.json") if settings is None else settings
    cfg.SETAR.FT.TOPK = 2
    cfg.SETAR.FT.LORA_RANK = 4
    for k, v in ft.items():
        setattr(cfg.SETAR.FT, k, v)
    return cfg


def _build(cfg):
    import locoop.setar.finetune  # noqa: F401  (registers the trainers)
    from locoop.engine.registry import build_trainer

    return build_trainer(cfg)


def _adapter_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.adapters.params.items()}


def test_setar_ft_trains_checkpoints_resumes_and_reloads(data_root, tiny_vit_path, tmp_path):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref, _ = clip.load(tiny_vit_path, device="cpu")
    run = tmp_path / "run"
    trainer = _build(_cfg(data_root, tiny_vit_path, run))
    # step 0: the adapted model is the unpruned one
    with torch.no_grad():
        g, loc = trainer.clip_model.encode_image(images, return_local=True)
        g0, loc0 = ref.encode_image(images, return_local=True)
        zs = torch.nn.functional.normalize(ref.encode_text(trainer.tokens), dim=-1)
    assert (g - g0).abs().max() < 1e-5 and (loc - loc0).abs().max() < 1e-5
    assert (trainer.text_features() - zs).abs().max() < 1e-5
    assert trainer.adapters.ranks() == RANKS
    start = _adapter_state(trainer)
    trainer.train()
    end = _adapter_state(trainer)
    assert all(not torch.equal(start[k], end[k]) for k in start)  # every adapter was trained
    assert sorted(os.listdir(run / "adapters")) == ["checkpoint", "model.pth.tar-1", "model.pth.tar-2"]
    ckpt = load_checkpoint(str(run / "adapters" / "model.pth.tar-2"))
    assert ckpt["trainer"] == "SeTARFT"
    assert set(ckpt["state_dict"]) == {"_extra_state"} | {f"params.{k}" for k in end}  # adapters only
    meta = ckpt["state_dict"]["_extra_state"]
    assert meta["kind"] == "setar" and meta["base_sha256"] == base_weights_sha256(ref)
    assert [s[:3] for s in meta["settings"]] == [list(k) for k in RANKS]
    # cosine per optimiser step: 2 epochs x 2 batches, ending at 0
    assert trainer.sched.last_epoch == 4 and trainer.get_current_lr() == pytest.approx(0.0, abs=1e-12)

    # resume from the epoch-1 checkpoint: the same final adapters as the uninterrupted run
    resumed_dir = tmp_path / "resumed" / "adapters"
    resumed_dir.mkdir(parents=True)
    shutil.copy(run / "adapters" / "model.pth.tar-1", resumed_dir)
    (resumed_dir / "checkpoint").write_text("model.pth.tar-1\n")
    resumed = _build(_cfg(data_root, tiny_vit_path, tmp_path / "resumed"))
    resumed.train()
    assert resumed.start_epoch == 1
    assert all(torch.equal(v, end[k]) for k, v in _adapter_state(resumed).items())

    # evaluation without the settings file: adapters rebuilt from the checkpoint's description
    evaluator = _build(_cfg(data_root, tiny_vit_path, tmp_path / "eval", settings=""))
    assert not evaluator.adapters.attached
    evaluator.load_model(str(run))
    assert evaluator.adapters.ranks() == RANKS
    assert torch.allclose(evaluator.text_features(), trainer.text_features(), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(evaluator.model_inference(images), trainer.model_inference(images), atol=1e-4)
    with pytest.raises(ValueError, match="no adapters to train"):
        evaluator_untrained = _build(_cfg(data_root, tiny_vit_path, tmp_path / "none", settings=""))
        evaluator_untrained.train()

    # a checkpoint of other settings, or of another base model, is refused
    other = data_root / "other_settings.json"
    other.write_text(json.dumps(SETTINGS[:2]))
    with pytest.raises(ValueError, match="adapts other matrices"):
        _build(_cfg(data_root, tiny_vit_path, tmp_path / "o1", settings=str(other))).load_model(str(run))
    other_base = tmp_path / "tiny_seed1.pt"
    make_tiny_checkpoint(other_base, like="tiny-vit", fmt="state_dict", seed=1)
    with pytest.raises(ValueError, match="another base model"):
        _build(_cfg(data_root, str(other_base), tmp_path / "o2")).load_model(str(run))
    lora_cfg = _cfg(data_root, tiny_vit_path, tmp_path / "o3", trainer="LoRA")
    lora_cfg.RESUME = str(run)
    with pytest.raises(ValueError, match="saved by trainer 'SeTARFT'"):
        _build(lora_cfg).train()


def test_lora_trainer_on_the_val_split(data_root, tiny_vit_path, tmp_path):
    cfg = _cfg(data_root, tiny_vit_path, tmp_path / "lora", trainer="LoRA", epochs=1, TRAIN_SPLIT="val",
               LR_STEP="epoch")
    cfg.DATASET.VAL_SPLIT_FILE = str(data_root / "val.json")
    trainer = _build(cfg)
    assert len(trainer.train_loader_x.dataset) == NUM_CLASSES  # the one-image-per-class split
    assert {d.impath for d in trainer.dm.dataset.val}.isdisjoint({d.impath for d in trainer.dm.dataset.test})
    assert set(trainer.adapters.ranks().values()) == {4} and len(trainer.adapters.ranks()) == 4
    trainer.train()
    for key in trainer.adapters.keys():
        assert torch.count_nonzero(trainer.adapters.layer(key).lora_B[ADAPTER_NAME].weight) > 0
    ckpt = load_checkpoint(str(tmp_path / "lora" / "adapters" / "model.pth.tar-1"))
    assert ckpt["state_dict"]["_extra_state"]["kind"] == "lora"
    # the validation split may not be the test split
    bad = _cfg(data_root, tiny_vit_path, tmp_path / "bad", trainer="LoRA", TRAIN_SPLIT="val")
    with pytest.raises(ValueError, match="VAL_SPLIT_FILE"):
        _build(bad)


@pytest.mark.parametrize("key, value, match", [
    ("PREC", "fp16", "SETAR.FT.PREC"),
    ("TRAIN_SPLIT", "test", "SETAR.FT.TRAIN_SPLIT"),
    ("LR_STEP", "batch", "SETAR.FT.LR_STEP"),
    ("TOPK", 0, "SETAR.FT.TOPK"),
])
def test_bad_finetune_config(data_root, tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        _build(_cfg(data_root, "unused.pt", tmp_path, **{key: value}))


def test_missing_or_bad_settings_file(data_root, tiny_vit_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="best_settings.json"):
        _build(_cfg(data_root, tiny_vit_path, tmp_path / "a", settings=str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("[['visual', 'W_up'")
    with pytest.raises(ValueError, match="not valid JSON"):
        _build(_cfg(data_root, tiny_vit_path, tmp_path / "b", settings=str(bad)))


# ====================================================================================== command / script
def test_command_refuses_bad_input_before_loading(data_root, tmp_path, capsys):
    from locoop.cli import main

    base = ["setar-finetune", "--root", str(data_root), "--config-file",
            os.path.join(REPO, "configs/setar/finetune/imagenet/SeTAR+FT.yaml"), "--output-dir", str(tmp_path / "x")]
    assert main(base) == 2
    assert "--settings" in capsys.readouterr().err
    assert main(base + ["--settings", str(tmp_path / "nope.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(base + ["--settings", str(data_root / "settings.json"), "--trainer", "LoCoOp"]) == 2
    assert "SeTARFT or LoRA" in capsys.readouterr().err


def test_finetune_command_end_to_end(data_root, tiny_vit_path, tmp_path):
    from locoop.cli import main

    out = tmp_path / "e2e"
    argv = ["setar-finetune", "--root", str(data_root), "--config-file",
            os.path.join(REPO, "configs/setar/finetune/imagenet/SeTAR+FT.yaml"), "--output-dir", str(out),
            "--settings", str(data_root / "settings.json"),
            "MODEL.BACKBONE.NAME", tiny_vit_path, "MODEL.DEVICE", "cpu", "DATASET.VAL_SPLIT_FILE",
            str(data_root / "val.json"), "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "OPTIM.MAX_EPOCH", "1", "OOD.DATASETS", str(OOD_SETS),
            "OOD.PLOT", "False", "SETAR.FT.TOPK", "2", "VERBOSE", "False"]
    assert main(argv) == 0
    for name in ("ood_results.json", "ood_results.md", "ood_scores.npz", "run_info.json", "finetune_settings.json",
                 "config.yaml", "adapters/model.pth.tar-1"):
        assert (out / name).is_file(), name
    text = (out / "ood_results.json").read_text()
    assert "GL-MCM" in text and "iNaturalist" in text and "Texture" in text
    info = json.loads((out / "run_info.json").read_text())
    assert info["adapters"]["kind"] == "setar" and info["trainer"] == "SeTARFT"
    assert json.loads((out / "finetune_settings.json").read_text()) == [s for s in SETTINGS if s[3] > 0]
    # started again on the finished run: nothing is retrained, the same adapters are tested
    before = load_checkpoint(str(out / "adapters" / "model.pth.tar-1"))["state_dict"]
    assert main(argv) == 0
    assert sorted(os.listdir(out / "adapters")) == ["checkpoint", "model.pth.tar-1"]
    after = load_checkpoint(str(out / "adapters" / "model.pth.tar-1"))["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before if k != "_extra_state")
    # testing the finished run from its folder alone (no settings): the same results
    again = tmp_path / "again"
    assert main(["setar-finetune", "--root", str(data_root), "--config-file",
                 os.path.join(REPO, "configs/setar/finetune/imagenet/SeTAR+FT.yaml"), "--model-dir", str(out),
                 "--output-dir", str(again)] + argv[argv.index("MODEL.BACKBONE.NAME"):]) == 0
    first, second = (json.loads((d / "ood_results.json").read_text()) for d in (out, again))
    assert second["id_accuracy"] == first["id_accuracy"]
    a, b = np.load(out / "ood_scores.npz"), np.load(again / "ood_scores.npz")
    assert sorted(a.files) == sorted(b.files) and "Texture/GL-MCM" in a.files
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)


@pytest.mark.parametrize("extra, want", [
    (["SETTINGS.json", "A", "1"], ["--settings", "SETTINGS.json", "A", "1"]),    # odd count: settings given
    (["A", "1"], ["A", "1"]),                                                    # LoRA: no settings
    ([], []),
])
def test_finetune_script_passes_its_arguments(tmp_path, extra, want):
    stub = tmp_path / "stub.sh"
    stub.write_text("#!/bin/bash\nprintf '%s\\n' \"$@\"\n")
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), SEED="7")
    res = subprocess.run(["bash", os.path.join(REPO, "scripts/setar/finetune.sh"), "DATA", "CFG.yaml", "OUT"] + extra,
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    args = res.stdout.splitlines()
    assert args[:9] == ["-m", "locoop", "setar-finetune", "--root", "DATA", "--config-file", "CFG.yaml",
                        "--output-dir", "OUT"]
    settings = want[:2] if want[:1] == ["--settings"] else []
    assert args[9:] == settings + ["--seed", "7"] + want[len(settings):]
    res = subprocess.run(["bash", os.path.join(REPO, "scripts/setar/finetune.sh"), "DATA"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr


@pytest.mark.parametrize("ft_prompt, search_prompt, used", [
    ("a photo of a {}", "a photo of a {}.", "a photo of a {}"),  # SeTAR's finetune.py prompt, the default
    ("", "itap of a {}", "itap of a {}"),  # empty: the search's SETAR.PROMPT_TEMPLATE
])
def test_ft_trainer_encodes_setar_ft_prompt_template(data_root, tiny_vit_path, tmp_path, ft_prompt, search_prompt,
                                                     used):
    assert get_cfg_default().SETAR.FT.PROMPT_TEMPLATE == "a photo of a {}"
    cfg = _cfg(data_root, tiny_vit_path, tmp_path / "p", epochs=1, PROMPT_TEMPLATE=ft_prompt)
    cfg.SETAR.PROMPT_TEMPLATE = search_prompt
    trainer = _build(cfg)
    names = list(trainer.dm.dataset.classnames)
    assert torch.equal(trainer.tokens.cpu(), clip.tokenize([used.replace("{}", c) for c in names]))


def test_finetune_topk_at_least_the_classes_refused(data_root, tiny_vit_path, tmp_path, capsys):
    # The shipped SETAR.FT.TOPK 300 on a small class set would select no patch (SeTAR+FT = plain CE):
    # refused before CLIP is loaded, naming the key, the value and the class count.
    from locoop.cli import main

    out = tmp_path / "k"
    argv = ["setar-finetune", "--root", str(data_root), "--config-file",
            os.path.join(REPO, "configs/setar/finetune/imagenet/SeTAR+FT.yaml"), "--output-dir", str(out),
            "--settings", str(data_root / "settings.json"),
            "MODEL.BACKBONE.NAME", tiny_vit_path, "MODEL.DEVICE", "cpu", "DATASET.VAL_SPLIT_FILE",
            str(data_root / "val.json"), "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0",
            "OOD.DATASETS", str(OOD_SETS), "VERBOSE", "False"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "SETAR.FT.TOPK 300 must be below the" in err and "Traceback" not in err
    assert not (out / "adapters").exists()
