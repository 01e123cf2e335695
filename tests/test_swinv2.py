"""Tests of locoop/models/swinv2.py (the Swin-V2 backbone) and tools/make_tiny_swin.py.

The references are Hugging Face's own ``Swinv2ForImageClassification.from_pretrained`` and, for the
local logits, SeTAR's value path re-written here from the Hugging Face modules (window partition,
cyclic shift and padding included), not through the module under test.
"""
import copy
import importlib
import importlib.util
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import Swinv2ForImageClassification  # noqa: E402

from locoop.models import swinv2 as sw  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> tool arguments. "shift": the last block is shifted (window 4 on an 8x8 grid).
# "pad": the last stage is 6x6 with window 4, so its blocks pad to 8x8 (and the last one shifts).
# "noshift": the last stage (4x4) is no larger than the window, as in Swin-V2-B at 256 px (8x8, window 16).
CONFIGS = {
    "shift": ["--image-size", "32", "--patch-size", "2", "--window-size", "4"],
    "pad": ["--image-size", "24", "--patch-size", "2", "--window-size", "4", "--format", "bin"],
    "noshift": ["--image-size", "32", "--patch-size", "4", "--window-size", "4", "--num-labels", "7",
                "--depths", "2", "3", "--embed-dim", "8"],
}


def _tool():
    spec = importlib.util.spec_from_file_location("make_tiny_swin", os.path.join(ROOT, "tools", "make_tiny_swin.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("swin")
    tool = _tool()
    out = {}
    for name, args in CONFIGS.items():
        assert tool.main(["--out", str(root / name), "--seed", "1", *args]) == 0
        out[name] = root / name
    assert tool.main(["--out", str(root / "hub"), "--hub-layout", "--repo-id", "microsoft/tiny-swin", "--seed", "1",
                      *CONFIGS["shift"]]) == 0
    out["hub"] = root / "hub"
    return out


@pytest.fixture(scope="module")
def models(snapshots):
    """name -> (our model, Hugging Face's independently loaded model)."""
    return {name: (sw.load_swinv2(snapshots[name]),
                   Swinv2ForImageClassification.from_pretrained(str(snapshots[name])).eval())
            for name in CONFIGS}


def _images(size, n=3, seed=0, width=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size if width is None else width, generator=g)


def setar_logits(hf, images):
    """SeTAR's global and local logits, re-written from the Hugging Face modules.

    The last block's input is captured with a hook during Hugging Face's own forward; its value
    path is then run as SeTAR's ``local_feat`` runs it: pad to the window, roll by the shift,
    partition into windows, value projection + output projection, undo all three, post-norm and
    residual, MLP, post-norm and residual; then the final LayerNorm and the classifier.
    """
    last = hf.swinv2.encoder.layers[-1].blocks[-1]
    seen = {}
    handle = last.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], dims=args[1]))
    try:
        logits = hf(images).logits
    finally:
        handle.remove()
    x, (h, w) = seen["x"], seen["dims"]
    b, _, c = x.shape
    ws, shift = last.window_size, last.shift_size
    ph, pw = (-h) % ws, (-w) % ws
    grid = F.pad(x.view(b, h, w, c), (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    if shift:
        grid = torch.roll(grid, (-shift, -shift), (1, 2))
    windows = grid.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    v = last.attention.output.dense(last.attention.self.value(windows))
    grid = v.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if shift:
        grid = torch.roll(grid, (shift, shift), (1, 2))
    v = grid[:, :h, :w].reshape(b, h * w, c)
    h1 = x + last.layernorm_before(v)
    h2 = h1 + last.layernorm_after(last.output.dense(F.gelu(last.intermediate.dense(h1))))
    local = hf.classifier(hf.swinv2.layernorm(h2))
    return logits, local, (h, w), (ws, shift, ph + pw)


# ============================================================================ tool / snapshots
def test_tool_writes_the_real_formats(snapshots):
    plain = snapshots["shift"]
    assert sorted(os.listdir(plain)) == ["config.json", "model.safetensors"]
    cfg = json.loads((plain / "config.json").read_text())
    assert cfg["model_type"] == "swinv2" and len(cfg["id2label"]) == 10 and cfg["depths"] == [2, 2]
    assert cfg["architectures"] == ["Swinv2ForImageClassification"]
    assert sorted(os.listdir(snapshots["pad"])) == ["config.json", "pytorch_model.bin"]
    repo = snapshots["hub"] / "models--microsoft--tiny-swin"
    commit = (repo / "refs" / "main").read_text()
    snap = repo / "snapshots" / commit
    assert sorted(os.listdir(snap)) == ["config.json", "model.safetensors"]
    for name in os.listdir(snap):
        assert os.path.islink(snap / name)
        assert os.path.realpath(snap / name).startswith(os.path.realpath(repo / "blobs"))
    # same seed, same weights, whatever the layout
    assert (snap / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


def test_load_from_every_layout(snapshots, models, monkeypatch):
    ours, hf = models["shift"]
    repo = snapshots["hub"] / "models--microsoft--tiny-swin"
    snap = repo / "snapshots" / (repo / "refs" / "main").read_text()
    monkeypatch.setenv("HF_HUB_CACHE", str(snapshots["hub"]))
    loaded = [sw.load_swinv2(snap), sw.load_swinv2(repo), sw.load_swinv2(str(repo)),
              sw.load_swinv2("microsoft/tiny-swin"), sw.load_swinv2("microsoft/tiny-swin", cache_dir=snapshots["hub"])]
    ref = hf.state_dict()
    for m in [ours] + loaded:
        sd = m.state_dict()
        assert sd.keys() == ref.keys()  # the Hugging Face names, unchanged
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
        assert m.dtype == torch.float32 and not m.training
    assert loaded[0].source == str(snap) == loaded[3].source
    assert sw.resolve_snapshot(repo) == snap


def test_loading_errors(snapshots, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sw.load_swinv2(tmp_path / "nope")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        sw.load_swinv2(tmp_path / "file.bin")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sw.load_swinv2(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="models--microsoft--swinv2-base-patch4-window16-256 does not exist"):
        sw.load_swinv2(sw.SETAR_SWIN_MODEL)

    def copy(name, dst):
        dst.mkdir()
        for f in os.listdir(snapshots[name]):
            (dst / f).write_bytes((snapshots[name] / f).read_bytes())
        return dst

    nowts = copy("shift", tmp_path / "noweights")
    os.remove(nowts / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights"):
        sw.load_swinv2(nowts)
    v1 = copy("shift", tmp_path / "v1")
    cfg = json.loads((v1 / "config.json").read_text())
    (v1 / "config.json").write_text(json.dumps({**cfg, "model_type": "swin"}))
    with pytest.raises(ValueError, match="Swin \\(V1\\)"):
        sw.load_swinv2(v1)
    other = copy("shift", tmp_path / "deeper")
    (other / "config.json").write_text(json.dumps({**cfg, "depths": [2, 3], "num_heads": [2, 4]}))
    with pytest.raises(ValueError, match=r"missing \d+ key\(s\) \['swinv2.encoder.layers.1.blocks.2"):
        sw.load_swinv2(other)
    wide = copy("shift", tmp_path / "wide")
    (wide / "config.json").write_text(json.dumps({**cfg, "embed_dim": 24}))
    with pytest.raises(ValueError, match="shapes other than config.json implies"):
        sw.load_swinv2(wide)
    # a bare Swinv2Model export (no classifier, keys without the 'swinv2.' prefix)
    bare = copy("pad", tmp_path / "bare")
    sd = torch.load(bare / "pytorch_model.bin", weights_only=True)
    torch.save({k[len("swinv2."):]: v for k, v in sd.items() if k.startswith("swinv2.")}, bare / "pytorch_model.bin")
    with pytest.raises(ValueError, match="bare Swinv2Model"):
        sw.load_swinv2(bare)
    # several snapshots and no ref
    repo = tmp_path / "models--a--b"
    (repo / "snapshots").mkdir(parents=True)
    for h in ("1" * 40, "2" * 40):
        copy("shift", repo / "snapshots" / h)
    with pytest.raises(ValueError, match="2 snapshots"):
        sw.load_swinv2(repo)
    assert sw.resolve_snapshot(repo, revision="2" * 40) == repo / "snapshots" / ("2" * 40)


def test_old_exports_with_index_buffers_load(snapshots, models, tmp_path):
    """Older transformers exports may hold the recomputed relative-position buffers; they are ignored."""
    ours, hf = models["pad"]
    dst = tmp_path / "old"
    dst.mkdir()
    (dst / "config.json").write_text((snapshots["pad"] / "config.json").read_text())
    sd = dict(hf.state_dict())
    for name, buf in hf.named_buffers():
        sd[name] = buf.clone()
    assert any(k.endswith(".relative_coords_table") for k in sd)
    torch.save(sd, dst / "pytorch_model.bin")
    x = _images(24)
    with torch.no_grad():
        assert torch.equal(sw.load_swinv2(dst)(x), ours(x))


# ============================================================================ outputs
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_hugging_face(models, name):
    ours, hf = models[name]
    size = ours.image_size
    with torch.no_grad():
        for x in (_images(size), _images(size, n=2, seed=1, width=size - 8)):  # also a non-square input
            ref = hf(x).logits
            assert torch.equal(ours(x), ref)
            g, loc = ours(x, return_local=True)
            assert torch.equal(g, ref)
            gh, gw = ours.final_grid(*x.shape[2:])
            assert loc.shape == (x.shape[0], gh * gw, ours.num_classes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_local_logits_equal_setar_recomputation(models, name):
    ours, hf = models[name]
    x = _images(ours.image_size)
    with torch.no_grad():
        ref_g, ref_l, grid, (ws, shift, pad) = setar_logits(hf, x)
        g, loc = ours(x, return_local=True)
        naive_g, naive_l = ours.reference_forward(x)
    # the cases this test is meant to cover really occur
    assert {"shift": shift > 0 and pad == 0, "pad": shift > 0 and pad > 0, "noshift": shift == 0}[name]
    assert grid == ours.final_grid()
    assert torch.equal(g, ref_g) and torch.equal(naive_g, ref_g)
    assert loc.shape == ref_l.shape == (x.shape[0], grid[0] * grid[1], ours.num_classes)
    torch.testing.assert_close(loc, ref_l, rtol=0, atol=1e-6)
    torch.testing.assert_close(naive_l, ref_l, rtol=0, atol=1e-6)
    assert loc.std() > 0.1 and not torch.allclose(loc.mean(dim=1), g, atol=1e-3)  # not a copy of the global output


def test_every_resume_point_equals_the_full_forward(models):
    ours, hf = models["noshift"]  # 5 blocks over 2 stages
    x = _images(ours.image_size)
    with torch.no_grad():
        full_g, full_l = ours(x, return_local=True)
        h0 = ours.stem(x)
        hs = hf(x, output_hidden_states=True).hidden_states  # HF: embeddings, then each stage's (merged) output
        states = [ours.run_blocks(h0, 0, i) for i in range(ours.num_blocks + 1)]
        for i in range(ours.num_blocks):
            g, loc = ours.forward_from(states[i], i, return_local=True)
            assert torch.equal(g, full_g) and torch.equal(loc, full_l), i
            assert torch.equal(ours.forward_from(states[i], i), full_g)
            for j in sorted({i, i + 1, ours.num_blocks}):  # resuming a resumed state changes nothing
                assert torch.equal(ours.run_blocks(states[i], i, j), states[j]), (i, j)
    assert ours.layers() == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    first_of_stage = [ours.block_index((s, 0)) for s in range(len(ours.depths))]
    assert first_of_stage == [0, 2]
    b = x.shape[0]
    assert torch.equal(states[0].reshape(b, -1, 8), hs[0])
    assert torch.equal(states[2].reshape(b, -1, 16), hs[1])  # entering stage 1 = after stage 0's patch merging
    assert states[2].shape == (b, 4, 4, 16) and states[5].shape == (b, 4, 4, 16)


def test_block_level_errors(models):
    ours, _ = models["shift"]
    h = ours.stem(_images(32, n=1))
    with pytest.raises(ValueError, match=r"entering block 2 must be \[B, H, W, 32\]"):
        ours.run_blocks(h, 2, 4)
    with pytest.raises(ValueError, match="outside 0..4"):
        ours.run_blocks(h, 0, 5)
    with pytest.raises(ValueError, match="start block 4 outside 0..3"):
        ours.forward_from(ours.run_blocks(h, 0, 4), 4)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        ours.stem(torch.zeros(1, 1, 32, 32))


def test_wrapper_needs_a_classifier():
    from transformers import Swinv2Config

    headless = Swinv2ForImageClassification(Swinv2Config(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                                         num_heads=[1, 2], window_size=4, num_labels=0))
    with pytest.raises(ValueError, match="without classes"):
        sw.SwinV2Classifier(headless)
    with pytest.raises(ValueError, match="Swinv2ForImageClassification"):
        sw.SwinV2Classifier(torch.nn.Linear(2, 2))


# ============================================================================ linear layers
def test_linear_layer_enumeration(models):
    ours, hf = models["noshift"]
    layers = ours.linear_layers()
    assert len(layers) == ours.num_blocks * len(sw.WEIGHT_TYPES) == 30
    modules = dict(ours.named_modules())
    hf_keys = set(hf.state_dict())
    seen = set()
    for lin in layers:
        dim = ours.stage_dims[lin.stage]
        mlp = int(ours.config.mlp_ratio * dim)
        shape = {"W_up": (mlp, dim), "W_down": (dim, mlp)}.get(lin.weight_type, (dim, dim))
        assert tuple(lin.module.weight.shape) == shape
        assert (lin.module.bias is None) == (lin.weight_type == "W_k")
        suffix = {"W_q": "attention.self.query", "W_k": "attention.self.key", "W_v": "attention.self.value",
                  "W_o": "attention.output.dense", "W_up": "intermediate.dense", "W_down": "output.dense"}
        assert lin.name == f"swinv2.encoder.layers.{lin.stage}.blocks.{lin.block}.{suffix[lin.weight_type]}"
        assert modules[lin.name] is lin.module is ours.get_linear(lin.weight_type, [lin.stage, lin.block])
        assert lin.name + ".weight" in hf_keys
        assert ours.module_name(lin.weight_type, lin.layer) == lin.name
        seen.add((lin.layer, lin.weight_type))
    assert seen == {(layer, wt) for layer in ours.layers() for wt in sw.WEIGHT_TYPES}
    assert [lin.layer for lin in ours.linear_layers(["W_up"])] == ours.layers()
    assert len({id(lin.module) for lin in layers}) == len(layers)


@pytest.mark.parametrize("layer, match", [
    (3, "pair of ints"), ([1], "pair of ints"), ([True, 0], "pair of ints"), ([2, 0], r"stage 2 .* outside 0..1"),
    ([1, 3], r"block 3 .* outside 0..2 \(stage 1 has 3 blocks"), ((0, -1), "outside 0..1"),
])
def test_layer_addressing_errors(models, layer, match):
    ours, _ = models["noshift"]
    with pytest.raises(ValueError, match=match):
        ours.get_linear("W_up", layer)


def test_layer_addressing(models):
    ours, _ = models["noshift"]
    for i, layer in enumerate(ours.layers()):
        assert ours.block_index(list(layer)) == i and ours.block_layer(i) == layer
    with pytest.raises(ValueError, match="W_p.*no W_p"):
        ours.get_linear("W_p", (0, 0))
    with pytest.raises(ValueError, match="valid weight types: W_q, W_k, W_v, W_o, W_up, W_down"):
        ours.linear_layers(["W_x"])
    with pytest.raises(ValueError, match="outside 0..4"):
        ours.block_layer(5)


def _drop_minor(weight, ratio=0.5):
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    keep = s.numel() - round(ratio * s.numel())
    return (u[:, :keep] * s[:keep]) @ vh[:keep]


@pytest.mark.parametrize("weight_type, layer", [("W_up", (0, 1)), ("W_q", (1, 0)), ("W_v", (1, 1)),
                                                ("W_o", (1, 1)), ("W_down", (1, 1)), ("W_k", (0, 0))])
def test_inplace_edit_matches_editing_the_hf_module(models, weight_type, layer):
    ours, hf = (copy.deepcopy(m) for m in models["shift"])
    x = _images(32)
    with torch.no_grad():
        before_g, before_l = ours(x, return_local=True)
        lin = next(lin for lin in ours.linear_layers() if lin.weight_type == weight_type and lin.layer == layer)
        lin.module.weight.copy_(_drop_minor(lin.module.weight))
        hf_lin = dict(hf.named_modules())[lin.name]
        hf_lin.weight.copy_(_drop_minor(hf_lin.weight))
        g, loc = ours(x, return_local=True)
        ref_g, ref_l, _, _ = setar_logits(hf, x)
    assert torch.equal(g, ref_g)
    torch.testing.assert_close(loc, ref_l, rtol=0, atol=1e-6)
    assert not torch.allclose(loc, before_l, atol=1e-4)
    if weight_type != "W_k" or layer != (1, 1):
        assert not torch.allclose(g, before_g, atol=1e-4)


def test_adapters_and_gradients_reach_the_value_path(models):
    """peft LoRA by SeTAR's module names (SeTAR+FT's targets) starts at the unchanged model; gradients reach it."""
    peft = pytest.importorskip("peft")
    ours = copy.deepcopy(models["shift"][0])
    x = _images(32, n=2)
    with torch.no_grad():
        ref_g, ref_l = ours(x, return_local=True)
    names = [ours.module_name("W_up", (1, 1)), ours.module_name("W_v", (1, 1))]
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=names), ours)
    g, loc = ours(x, return_local=True)
    torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-6)
    torch.testing.assert_close(loc, ref_l, rtol=0, atol=1e-6)
    (F.cross_entropy(g, torch.tensor([0, 1])) + loc.logsumexp(-1).mean()).backward()
    trained = {n: p.grad for n, p in ours.named_parameters() if "lora_B" in n}
    assert len(trained) == 2 and all(gr is not None and gr.abs().sum() > 0 for gr in trained.values())


# ============================================================================ preprocessing
def test_setar_preprocess():
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    tf = sw.build_swin_preprocess(256)
    resize, crop, norm = (next(t for t in tf.transforms if isinstance(t, cls))
                          for cls in (T.Resize, T.CenterCrop, T.Normalize))
    assert resize.size == 284 and resize.interpolation == InterpolationMode.BICUBIC  # floor(256 / 0.9)
    assert crop.size == (256, 256)
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and tuple(norm.std) == (0.229, 0.224, 0.225)
    img = Image.fromarray((torch.rand(300, 400, 3) * 255).byte().numpy())
    out = tf(img.convert("L"))  # grayscale input is converted to RGB first
    pixels = out * torch.tensor(norm.std)[:, None, None] + torch.tensor(norm.mean)[:, None, None]
    assert out.shape == (3, 256, 256)
    torch.testing.assert_close(pixels[0], pixels[1], rtol=0, atol=1e-6)
    train = sw.build_swin_train_preprocess(256)
    rrc = next(t for t in train.transforms if isinstance(t, T.RandomResizedCrop))
    assert rrc.scale == (0.08, 1.0) and rrc.interpolation == InterpolationMode.BICUBIC
    jitter = next(t for t in train.transforms if isinstance(t, T.ColorJitter))
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue is None
    assert train(img).shape == (3, 256, 256)
    with pytest.raises(ValueError, match="crop_pct"):
        sw.build_swin_preprocess(256, crop_pct=0)


# ============================================================================ optional dependency
def test_missing_transformers_gives_one_clear_line(snapshots, monkeypatch):
    import locoop.models

    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "locoop.models.swinv2")
    monkeypatch.setattr(locoop.models, "swinv2", sw)  # restored afterwards, so later tests see the same module
    fresh = importlib.import_module("locoop.models.swinv2")  # importing the module itself needs no transformers
    for call in (fresh.require_transformers, lambda: fresh.load_swinv2(snapshots["shift"]),
                 lambda: fresh.tiny_swinv2_config()):
        with pytest.raises(ImportError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and "locoop-ood[swin]" in msg and "transformers >= 4.37" in msg
    assert sys.modules["locoop.models.swinv2"] is fresh


def test_is_swinv2_backbone_tells_swin_from_clip(tmp_path):
    from locoop.models.swinv2 import is_swinv2_backbone, make_tiny_swinv2, save_snapshot

    snap = tmp_path / "swin"
    save_snapshot(make_tiny_swinv2(num_labels=3), snap)
    assert is_swinv2_backbone(str(snap))
    assert is_swinv2_backbone("microsoft/swinv2-base-patch4-window16-256")
    other = tmp_path / "clip_hf"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "clip"}')
    (other / "model.safetensors").write_bytes(b"")
    for name in ("ViT-B/16", "RN50", "tiny-vit", str(other), ""):
        assert not is_swinv2_backbone(name), name
