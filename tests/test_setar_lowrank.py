"""Low-rank editing of CLIP weights (locoop/setar/lowrank.py)."""
import pytest
import torch

from clip.model import build_model
from clip.tiny import random_state_dict
from locoop.setar.lowrank import WEIGHT_TYPES, LowRankEditor, get_linear, n_removed


@pytest.fixture()
def model():
    return build_model(random_state_dict("tiny-vit", seed=0))


def _frob2(a, b):
    return float(((a.detach().double() - b.detach().double()) ** 2).sum())


def test_get_linear_addresses_every_weight_type(model):
    vb, tb = model.visual.transformer.resblocks[1], model.transformer.resblocks[0]
    assert get_linear(model, "visual", "W_q", 1) is vb.attn.q_proj
    assert get_linear(model, "visual", "W_k", 1) is vb.attn.k_proj
    assert get_linear(model, "visual", "W_v", 1) is vb.attn.v_proj
    assert get_linear(model, "visual", "W_o", 1) is vb.attn.out_proj
    assert get_linear(model, "visual", "W_up", 1) is vb.mlp.c_fc
    assert get_linear(model, "visual", "W_down", 1) is vb.mlp.c_proj
    assert get_linear(model, "text", "W_up", 0) is tb.mlp.c_fc
    assert get_linear(model, "visual", "W_p") is model.visual.proj
    assert get_linear(model, "text", "W_p", None) is model.text_projection


@pytest.mark.parametrize("args, match", [
    (("visual", "W_x", 0), "valid weight types: W_q, W_k, W_v, W_o, W_up, W_down, W_p"),
    (("image", "W_up", 0), "valid towers: visual, text"),
    (("visual", "W_up", 2), r"layer index in 0\.\.1"),
    (("text", "W_up", -1), r"layer index in 0\.\.1"),
    (("text", "W_up", None), r"layer index in 0\.\.1"),
    (("text", "W_p", 0), "has no layer"),
])
def test_get_linear_errors(model, args, match):
    with pytest.raises(ValueError, match=match):
        get_linear(model, *args)


def test_resnet_visual_tower_is_explained():
    rn = build_model(random_state_dict("tiny-rn", seed=0))
    with pytest.raises(ValueError, match="ModifiedResNet"):
        get_linear(rn, "visual", "W_up", 0)
    assert get_linear(rn, "text", "W_up", 1) is rn.transformer.resblocks[1].mlp.c_fc


def test_n_removed_rounds_like_setar():
    # min(256, 64) = 64 components
    assert n_removed(0.05, (256, 64)) == 3  # round(3.2)
    assert n_removed(0.3, (256, 64)) == 19  # round(19.2)
    assert n_removed(0.0, (256, 64)) == 0
    assert n_removed(0.125, (4, 4)) == 0  # round(0.5) -> 0: Python rounds halves to even, as SeTAR's round()
    assert n_removed(0.375, (4, 4)) == 2  # round(1.5) -> 2


@pytest.mark.parametrize("ratio", [-0.1, 1.5, 7.25, float("inf"), True, "0.1"])
def test_ratio_neither_fraction_nor_rank(model, ratio):
    ed = LowRankEditor(model)
    before = model.visual.transformer.resblocks[0].mlp.c_fc.weight.clone()
    with pytest.raises(ValueError, match=r"\[0, 1\).*whole number"):
        ed.apply("visual", "W_up", 0, ratio)
    assert torch.equal(model.visual.transformer.resblocks[0].mlp.c_fc.weight, before)


def test_absolute_rank_as_setar():
    # SeTAR's to_target_modules: a value < 1 is a ratio (rounded), anything else is the rank itself
    assert n_removed(5, (256, 64)) == 5
    assert n_removed(5.0, (256, 64)) == 5
    assert n_removed(1, (256, 64)) == 1
    assert n_removed(63, (256, 64)) == 63
    with pytest.raises(ValueError, match=r"remove 64 singular components .* which has 64; give at most 63"):
        n_removed(64, (256, 64))
    with pytest.raises(ValueError, match="which has 64"):
        n_removed(100, (64, 256))


@pytest.mark.parametrize("prune_type", ["small", "large"])
def test_absolute_rank_removes_exactly_that_many(model, prune_type):
    lin = get_linear(model, "visual", "W_up", 1)
    w0 = lin.weight.detach().clone()
    m = min(w0.shape)
    # the naive twin: a fresh SVD in float64, the 5 chosen components dropped by hand
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    keep = torch.ones(m, dtype=torch.bool)
    keep[(torch.arange(m - 5, m) if prune_type == "small" else torch.arange(0, 5))] = False
    expected = (u[:, keep] * s[keep]) @ vh[keep]
    ed = LowRankEditor(model, prune_type)
    assert ed.apply("visual", "W_up", 1, 5) == 5
    w = lin.weight.detach().double()
    assert torch.linalg.matrix_rank(w, rtol=1e-5) == m - 5
    assert torch.allclose(w, expected, atol=1e-5)
    ed.revert_all()
    before = lin.weight.detach().clone()
    with pytest.raises(ValueError, match=f"which has {m}"):
        ed.apply("visual", "W_up", 1, m)  # refused before the weight is touched
    assert torch.equal(lin.weight, before)


def test_ratio_removing_every_component_is_refused(model):
    ed = LowRankEditor(model)
    before = model.text_projection.weight.clone()  # [32, 64] -> 32 components
    with pytest.raises(ValueError, match="all of them"):
        ed.apply("text", "W_p", None, 0.99)  # round(31.68) = 32
    assert torch.equal(model.text_projection.weight, before)
    assert not ed._svd  # refused before any SVD


def test_bad_prune_type(model):
    with pytest.raises(ValueError, match="valid prune types: small, large, random"):
        LowRankEditor(model, prune_type="minor")


@pytest.mark.parametrize("weight_type", ["W_up", "W_down", "W_q", "W_p"])
def test_small_truncation_math(model, weight_type):
    layer = None if weight_type == "W_p" else 1
    lin = get_linear(model, "visual", weight_type, layer)
    w0 = lin.weight.detach().clone()
    bias0 = None if lin.bias is None else lin.bias.detach().clone()
    s = torch.linalg.svdvals(w0.double())
    m = min(w0.shape)
    ed = LowRankEditor(model, "small")
    for ratio in (0.05, 0.25, 0.4):
        k = ed.apply("visual", weight_type, layer, ratio)
        assert k == round(ratio * m)
        w = lin.weight.detach()
        assert torch.linalg.matrix_rank(w.double(), rtol=1e-5) == m - k
        dropped = float((s[m - k:] ** 2).sum())
        assert _frob2(w, w0) == pytest.approx(dropped, rel=1e-3)
        # Eckart-Young: the kept singular values are the k largest, unchanged
        assert torch.allclose(torch.linalg.svdvals(w.double())[: m - k], s[: m - k], rtol=1e-4)
    if bias0 is not None:
        assert torch.equal(lin.bias, bias0)
    ed.revert("visual", weight_type, layer)
    assert torch.equal(lin.weight, w0)


def test_large_and_random_drop_the_right_components(model):
    lin = get_linear(model, "text", "W_up", 0)
    w0 = lin.weight.detach().clone()
    s = torch.linalg.svdvals(w0.double())
    ed = LowRankEditor(model, "large")
    k = ed.apply("text", "W_up", 0, 0.25)
    assert k == 16
    assert _frob2(lin.weight, w0) == pytest.approx(float((s[:k] ** 2).sum()), rel=1e-4)
    ed.revert_all()
    assert torch.equal(lin.weight, w0)

    ed = LowRankEditor(model, "random", seed=3)
    ed.apply("text", "W_up", 0, 0.25)
    idx = ed.removed_indices("text", "W_up", 0, 16)
    assert len(set(idx.tolist())) == 16
    assert _frob2(lin.weight, w0) == pytest.approx(float((s[idx] ** 2).sum()), rel=1e-4)
    w_random = lin.weight.detach().clone()
    # the same seed gives the same subset; a larger ratio removes a superset
    ed2 = LowRankEditor(build_model(random_state_dict("tiny-vit", seed=0)), "random", seed=3)
    assert torch.equal(ed2.removed_indices("text", "W_up", 0, 16), idx)
    assert set(idx.tolist()) <= set(ed.removed_indices("text", "W_up", 0, 24).tolist())
    ed3 = LowRankEditor(build_model(random_state_dict("tiny-vit", seed=0)), "random", seed=4)
    assert not torch.equal(ed3.removed_indices("text", "W_up", 0, 16), idx)
    ed.revert("text", "W_up", 0)
    assert torch.equal(lin.weight, w0)
    assert not torch.equal(w_random, w0)


def test_ratio_zero_is_identity_and_revert_is_bitwise(model):
    lin = get_linear(model, "visual", "W_up", 0)
    w0 = lin.weight.detach().clone()
    ed = LowRankEditor(model)
    assert ed.apply("visual", "W_up", 0, 0.0) == 0
    assert torch.equal(lin.weight, w0)
    ed.apply("visual", "W_up", 0, 0.35)
    assert not torch.equal(lin.weight, w0)
    assert ed.applied == {("visual", "W_up", 0): 0.35}
    ed.apply("visual", "W_up", 0, 0.0)  # back to the original bit for bit
    assert torch.equal(lin.weight, w0)
    assert ed.applied == {}
    # applying twice starts from the original each time (no compounding)
    ed.apply("visual", "W_up", 0, 0.2)
    w_a = lin.weight.detach().clone()
    ed.apply("visual", "W_up", 0, 0.2)
    assert torch.equal(lin.weight, w_a)


def test_every_weight_type_listed():
    assert WEIGHT_TYPES == ("W_q", "W_k", "W_v", "W_o", "W_up", "W_down", "W_p")
