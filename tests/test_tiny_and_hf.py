"""Tests of clip/configs.py, clip/tiny.py, tools/make_tiny_clip.py and clip/hf.py."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from clip import hf
from clip.configs import CLIPConfig, get_config, list_models, list_openai_models, list_tiny_models
from clip.model import CLIP, build_model, infer_architecture
from clip.pretrained import load_state_dict
from clip.tiny import random_state_dict, save_checkpoint
from clip.tokenizer import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = ("input_resolution", "context_length", "vocab_size")


def _params(sd):
    return {k: v for k, v in sd.items() if k not in META}


# --------------------------------------------------------------------------------------- configs
def test_config_registry():
    assert list_openai_models() == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
                                    "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    assert {"tiny-vit", "tiny-vit-h2", "tiny-vit-p16", "tiny-rn"} <= set(list_tiny_models())
    assert list_models() == list_openai_models() + list_tiny_models()
    b16 = get_config("ViT-B/16")
    assert (b16.grid_size, b16.vision_heads, b16.transformer_heads, b16.embed_dim) == (14, 12, 8, 512)
    rn = get_config("RN50x4")
    assert (rn.image_resolution, rn.grid_size, rn.vision_heads, rn.is_vit) == (288, 9, 40, False)
    assert get_config(b16) is b16
    with pytest.raises(ValueError, match=r"unknown CLIP architecture 'ViT-B/8'.*ViT-B/16.*tiny-vit"):
        get_config("ViT-B/8")


@pytest.mark.parametrize("kwargs, match", [
    (dict(vision_layers=2, vision_width=96, vision_patch_size=8), "multiple of 64"),
    (dict(vision_layers=2, vision_width=64, vision_patch_size=None), "patch_size"),
    (dict(vision_layers=2, vision_width=64, vision_patch_size=5), "multiple of the patch size"),
    (dict(vision_layers=(1, 1, 1), vision_width=16, vision_patch_size=None), "4 stages"),
    (dict(vision_layers=(1, 1, 1, 1), vision_width=16, vision_patch_size=8), "no patch size"),
    (dict(vision_layers=2, vision_width=64, vision_patch_size=8, transformer_heads=2), "transformer_heads"),
])
def test_config_validation(kwargs, match):
    base = dict(name="bad", embed_dim=32, image_resolution=64, transformer_width=64, transformer_layers=1)
    with pytest.raises(ValueError, match=match):
        CLIPConfig(**base, **kwargs)


# ------------------------------------------------------------------------------- random weights
@pytest.mark.parametrize("name", list_models())
def test_shapes_match_model_for_every_architecture(name):
    """Our independently written key layout equals the layout the model exports (no memory used)."""
    cfg = get_config(name)
    sd = random_state_dict(name, device="meta")
    assert infer_architecture(sd) == cfg.model_kwargs()
    with torch.device("meta"):
        expected = CLIP(**cfg.model_kwargs()).openai_state_dict()
    ours = _params(sd)
    assert set(ours) == set(expected)
    assert all(ours[k].shape == expected[k].shape for k in expected)


def test_parameter_counts_of_released_models():
    # Figures printed by OpenAI's CLIP notebook ("Model parameters: ...").
    for name, count in (("RN50", 102_007_137), ("ViT-B/32", 151_277_313)):
        sd = random_state_dict(name, device="meta")
        n = sum(v.numel() for k, v in _params(sd).items() if "running_" not in k and "num_batches" not in k)
        assert n == count, name


def test_tiny_vit_layout():
    sd = random_state_dict("tiny-vit")
    expected_shapes = {
        "positional_embedding": (77, 64), "text_projection": (64, 32), "logit_scale": (),
        "token_embedding.weight": (49408, 64), "ln_final.weight": (64,),
        "transformer.resblocks.1.attn.in_proj_weight": (192, 64),
        "transformer.resblocks.1.attn.in_proj_bias": (192,),
        "transformer.resblocks.1.mlp.c_fc.weight": (256, 64), "transformer.resblocks.1.mlp.c_proj.weight": (64, 256),
        "visual.class_embedding": (64,), "visual.positional_embedding": (17, 64), "visual.proj": (64, 32),
        "visual.conv1.weight": (64, 3, 8, 8), "visual.ln_pre.bias": (64,), "visual.ln_post.weight": (64,),
        "visual.transformer.resblocks.0.attn.out_proj.weight": (64, 64),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("transformer.resblocks.2") for k in sd)
    assert sd["logit_scale"].item() == pytest.approx(math.log(100))
    assert [sd[k].item() for k in META] == [32, 77, 49408]
    assert all(sd[k].dtype == torch.long and sd[k].dim() == 0 for k in META)


def test_tiny_rn_layout():
    sd = random_state_dict("tiny-rn")
    assert tuple(sd["visual.conv1.weight"].shape) == (8, 3, 3, 3)
    assert tuple(sd["visual.conv3.weight"].shape) == (16, 8, 3, 3)
    for stage, planes in zip((1, 2, 3, 4), (16, 32, 64, 128)):
        p = f"visual.layer{stage}.0"
        assert tuple(sd[f"{p}.conv3.weight"].shape) == (planes * 4, planes, 1, 1)
        # Every first block changes channels (and stages 2-4 the stride): all have a downsample.
        assert tuple(sd[f"{p}.downsample.0.weight"].shape)[:2] == (planes * 4, planes * 2 if stage > 1 else 16)
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert f"{p}.downsample.1.{buf}" in sd and f"{p}.bn2.{buf}" in sd
    assert tuple(sd["visual.attnpool.positional_embedding"].shape) == (5, 512)  # (64 / 32)^2 + 1
    assert tuple(sd["visual.attnpool.c_proj.weight"].shape) == (32, 512)
    # A second block inside a stage keeps stride and channels: no downsample.
    deeper = random_state_dict(CLIPConfig("rn2", 32, 64, (2, 1, 1, 1), 16, None, 64, 1), device="meta")
    assert "visual.layer1.1.conv1.weight" in deeper and "visual.layer1.1.downsample.0.weight" not in deeper


def test_seed_and_half():
    a, b, c = (random_state_dict("tiny-vit", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])
    h = random_state_dict("tiny-rn", half=True)
    half_keys = {"text_projection", "visual.conv1.weight", "visual.layer2.0.downsample.0.weight",
                 "visual.attnpool.q_proj.bias", "transformer.resblocks.0.attn.in_proj_weight",
                 "transformer.resblocks.0.mlp.c_fc.bias"}
    fp32_keys = {"token_embedding.weight", "positional_embedding", "logit_scale", "visual.bn1.weight",
                 "visual.layer2.0.downsample.1.weight", "visual.attnpool.positional_embedding", "ln_final.bias",
                 "transformer.resblocks.0.ln_1.weight"}
    assert all(h[k].dtype == torch.float16 for k in half_keys)
    assert all(h[k].dtype == torch.float32 for k in fp32_keys)


@pytest.mark.parametrize("name", list_tiny_models())
def test_tiny_models_run(name):
    cfg = get_config(name)
    model = build_model(random_state_dict(name))
    images = torch.randn(2, 3, cfg.image_resolution, cfg.image_resolution)
    with torch.no_grad():
        glob, local = model.encode_image(images, return_local=True)
        text = model.encode_text(tokenize(["a photo of a dog.", "a cat"]))
    assert glob.shape == (2, cfg.embed_dim) and local.shape == (2, cfg.grid_size ** 2, cfg.embed_dim)
    assert text.shape == (2, cfg.embed_dim)
    for t in (glob, local, text):
        assert torch.isfinite(t).all() and 0.05 < t.std().item() < 20


def test_torchscript_archive_has_openai_keys(tmp_path):
    sd = random_state_dict("tiny-rn", half=True)
    path = save_checkpoint(tmp_path / "rn.pt", sd, fmt="torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, OpenAI's format is not
        archive = torch.jit.load(path, map_location="cpu")
    assert isinstance(archive, torch.jit.ScriptModule)
    loaded = archive.state_dict()
    assert list(loaded) == list(sd)
    assert all(loaded[k].dtype == sd[k].dtype and torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="format"):
        save_checkpoint(tmp_path / "x.pt", sd, fmt="onnx")
    assert sorted(os.listdir(tmp_path)) == ["rn.pt"]  # no temporary files left


def test_make_tiny_clip_tool(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import make_tiny_clip
    finally:
        sys.path.pop(0)
    out = tmp_path / "sub" / "rn.pt"
    assert make_tiny_clip.main(["--like", "tiny-rn", "--format", "torchscript", "--out", str(out), "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "torchscript" in printed and "tiny-rn" in printed
    sd, kind = load_state_dict(out)
    assert kind == "torchscript"
    assert torch.equal(sd["visual.attnpool.q_proj.weight"], random_state_dict("tiny-rn", seed=4)["visual.attnpool.q_proj.weight"])
    # Standalone run from another directory (the script finds the package by itself).
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_clip.py"), "--out",
                          str(tmp_path / "v.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "like tiny-vit" in res.stdout and load_state_dict(tmp_path / "v.pt")[1] == "state_dict"
    with pytest.raises(SystemExit):
        make_tiny_clip.main(["--like", "ViT-B/8", "--out", str(tmp_path / "bad.pt")])


# ---------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _features(outputs):
    # transformers >= 5 returns a model output whose pooler_output holds the projected features.
    return outputs if isinstance(outputs, torch.Tensor) else outputs.pooler_output


@pytest.fixture(scope="module")
def hf_model(transformers):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=64,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        # HF initialises biases to 0 and LayerNorms to 1; perturb so every mapping is exercised.
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _compare(ours, theirs):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(["a photo of a dog.", "an extremely long caption " * 5, ""])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), _features(theirs.get_image_features(pixel_values=images)),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), _features(theirs.get_text_features(input_ids=tokens)),
                                   atol=1e-5, rtol=1e-5)


def test_hf_snapshot_loads_and_matches_transformers(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    assert hf.is_hf_snapshot(tmp_path)
    sd, kind = load_state_dict(tmp_path)
    assert kind == "hf"
    model = build_model(sd)
    assert model.visual.input_resolution == 32 and model.embed_dim == 64
    _compare(model, hf_model)


def test_our_snapshot_loads_in_transformers(transformers, tmp_path):
    sd = random_state_dict("tiny-vit-h2", seed=5)
    hf.save_hf_snapshot(sd, tmp_path)
    theirs = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    _compare(build_model(sd), theirs)
    back, kind = load_state_dict(tmp_path)
    assert kind == "hf" and set(back) == set(_params(sd))
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_bin_and_sharded_snapshots(tmp_path):
    sd = random_state_dict("tiny-vit", seed=2)
    hf.save_hf_snapshot(sd, tmp_path / "bin", safe_serialization=False)
    assert os.listdir(tmp_path / "bin") and (tmp_path / "bin" / "pytorch_model.bin").exists()
    back = hf.load_hf_snapshot(tmp_path / "bin")
    assert all(torch.equal(back[k], sd[k]) for k in back)
    # Two safetensors shards with an index, as save_pretrained writes for big models.
    from safetensors.torch import save_file

    hf_sd = hf.openai_to_hf_state_dict(sd)
    keys = list(hf_sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    (tmp_path / "sharded").mkdir()
    for file, names in shards.items():
        save_file({k: hf_sd[k] for k in names}, str(tmp_path / "sharded" / file))
    index = {"weight_map": {k: f for f, names in shards.items() for k in names}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "sharded" / "config.json").write_text(json.dumps(hf.hf_config_dict(sd)))
    assert hf.is_hf_snapshot(tmp_path / "sharded")
    back = hf.load_hf_snapshot(tmp_path / "sharded")
    assert set(back) == set(_params(sd)) and all(torch.equal(back[k], sd[k]) for k in back)


def test_hf_errors(tmp_path):
    sd = random_state_dict("tiny-vit")
    config = hf.hf_config_dict(sd)
    hf_sd = hf.openai_to_hf_state_dict(sd)

    gelu = json.loads(json.dumps(config))
    gelu["text_config"]["hidden_act"] = "gelu"
    with pytest.raises(ValueError, match="quick_gelu"):
        hf.convert_hf_state_dict(hf_sd, gelu)
    with pytest.raises(ValueError, match="model_type 'siglip'"):
        hf.convert_hf_state_dict(hf_sd, {**config, "model_type": "siglip"})
    heads = json.loads(json.dumps(config))
    heads["vision_config"]["num_attention_heads"] = 4
    with pytest.raises(ValueError, match="width // 64"):
        hf.convert_hf_state_dict(hf_sd, heads)

    missing = {k: v for k, v in hf_sd.items() if "layers.1.self_attn.k_proj.bias" not in k}
    with pytest.raises(ValueError, match="k_proj.bias"):
        hf.convert_hf_state_dict(missing, config)
    with pytest.raises(ValueError, match="no OpenAI CLIP counterpart.*extra.weight"):
        hf.convert_hf_state_dict({**hf_sd, "extra.weight": torch.zeros(1)}, config)
    no_proj = {k: v for k, v in hf_sd.items() if k != "visual_projection.weight"}
    with pytest.raises(ValueError, match="visual_projection.weight"):
        hf.convert_hf_state_dict(no_proj, config)
    with pytest.raises(ValueError, match="ResNet"):
        hf.openai_to_hf_state_dict(random_state_dict("tiny-rn", device="meta"))

    # Config problems are reported before any weights are read.
    hf.save_hf_snapshot(sd, tmp_path / "snap")
    (tmp_path / "snap" / "config.json").write_text(json.dumps(gelu))
    with pytest.raises(ValueError, match="quick_gelu"):
        load_state_dict(tmp_path / "snap")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert not hf.is_hf_snapshot(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no weights"):
        hf.load_hf_weights(tmp_path / "empty")


def test_legacy_config_dict_overrides(tmp_path):
    sd = random_state_dict("tiny-vit")
    hf.save_hf_snapshot(sd, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["hidden_act"] = "gelu"
    config["text_config_dict"] = {"hidden_act": "quick_gelu"}  # old configs: the *_dict entry wins
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert set(hf.load_hf_snapshot(tmp_path)) == set(_params(sd))
