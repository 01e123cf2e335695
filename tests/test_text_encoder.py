"""Fast text encoding (shared prefix + packing, truncation) against the naive full-77-token encoder.

Features, the LoCoOp loss built on them and the gradient wrt the context must agree (fp32,
rtol/atol ~1e-5) for shared and class-specific context and every class-token position.
"""
import pytest
import torch
import torch.nn.functional as F

from clip.model import CLIP
from locoop.trainers.loss import locoop_loss
from locoop.trainers.prompt_learner import PromptLearner
from locoop.trainers.text_encoder import TextEncoder, encode_text_naive, encode_text_shared_prefix

# Names of 1 to 6 BPE tokens, so suffix lengths differ (padded grid) ...
MIXED = ["dog", "great white shark", "cat", "yellow lady's slipper orchid", "x", "tench"]
# ... and names of one token each (dense grid, no padding).
EQUAL = ["dog", "cat", "fish", "bird"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: a second thread only adds synchronisation cost (large on a shared, busy CPU).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
             context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
             transformer_layers=3).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _loss_and_grad(pl, encoder, mode, image_global, image_local, labels):
    pl.zero_grad()
    text = encoder(pl, mode)
    t = F.normalize(text, dim=-1)
    loss, _, _ = locoop_loss(100 * image_global @ t.t(), 100 * image_local @ t.t(), labels, 0.25, 2)
    loss.backward()
    return text.detach(), loss.detach(), pl.ctx.grad.clone()


def _check(pl, model, modes):
    g = torch.Generator().manual_seed(1)
    n = pl.n_cls
    image_global = F.normalize(torch.randn(3, 32, generator=g), dim=-1)
    image_local = F.normalize(torch.randn(3, 5, 32, generator=g), dim=-1)
    labels = torch.tensor([0, 1, n - 1])
    encoder = TextEncoder(model)
    ref_text, ref_loss, ref_grad = _loss_and_grad(pl, encoder, "naive", image_global, image_local, labels)
    assert ref_grad.abs().max() > 0
    for mode in modes:
        text, loss, grad = _loss_and_grad(pl, encoder, mode, image_global, image_local, labels)
        assert torch.allclose(text, ref_text, rtol=1e-5, atol=1e-5), mode
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5), mode
        scale = ref_grad.abs().max()
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * scale), (mode, (grad - ref_grad).abs().max())


@pytest.mark.parametrize("names", [MIXED, EQUAL], ids=["mixed-lengths", "equal-lengths"])
@pytest.mark.parametrize("ctx_init", ["", "a photo of a"])
def test_shared_prefix_matches_naive(model, names, ctx_init):
    torch.manual_seed(2)
    pl = PromptLearner(names, model, n_ctx=4, ctx_init=ctx_init)
    assert TextEncoder(model).resolve_mode(pl) == "shared_prefix"
    _check(pl, model, ["shared_prefix", "truncate", "auto"])


@pytest.mark.parametrize("csc, position", [(False, "middle"), (False, "front"), (True, "end"), (True, "middle"),
                                           (True, "front")])
def test_fallback_matches_naive(model, csc, position):
    torch.manual_seed(3)
    pl = PromptLearner(MIXED, model, n_ctx=4, csc=csc, class_token_position=position)
    encoder = TextEncoder(model)
    assert encoder.resolve_mode(pl) == "truncate"
    with pytest.raises(ValueError, match="shared-prefix"):
        TextEncoder(model, "shared_prefix")(pl)
    _check(pl, model, ["truncate", "auto"])


def test_single_class_and_one_layer():
    torch.manual_seed(4)
    m = CLIP(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
             context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    pl = PromptLearner(["great white shark"], m, n_ctx=2)
    prefix, suffix = pl.prefix_and_suffix()
    fast = encode_text_shared_prefix(m, prefix, suffix, pl.eot_idx)
    assert torch.allclose(fast, encode_text_naive(m, pl(), pl.eot_idx), atol=1e-5)


def test_shared_prefix_runs_through_the_models_modules(model):
    # An edit of a text-tower weight (as SeTAR/LoRA make) reaches the fast path like the naive one.
    torch.manual_seed(5)
    pl = PromptLearner(MIXED, model, n_ctx=4)
    prefix, suffix = pl.prefix_and_suffix()
    before = encode_text_shared_prefix(model, prefix, suffix, pl.eot_idx)
    w = model.transformer.resblocks[2].mlp.c_fc.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(0.5)
        after = encode_text_shared_prefix(model, prefix, suffix, pl.eot_idx)
        assert not torch.allclose(before, after, atol=1e-4)
        assert torch.allclose(after, encode_text_naive(model, pl(), pl.eot_idx), atol=1e-5)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_bad_input(model):
    pl = PromptLearner(EQUAL, model, n_ctx=4)
    prefix, suffix = pl.prefix_and_suffix()
    with pytest.raises(ValueError, match="inside the shared prefix"):
        encode_text_shared_prefix(model, prefix, suffix, torch.tensor([2, 6, 6, 6]))
    with pytest.raises(ValueError, match="expected prefix"):
        encode_text_shared_prefix(model, prefix[None], suffix, pl.eot_idx)
    with pytest.raises(ValueError, match="mode"):
        TextEncoder(model, "fast")
