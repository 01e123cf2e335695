"""PromptLearner (CoOp layout, CTX_INIT, CSC, class-token positions, checkpoints) and zero-shot features."""
import pytest
import torch
import torch.nn.functional as F

import clip
from clip.model import CLIP
from clip.tokenizer import get_tokenizer
from locoop.trainers.prompt_learner import PromptLearner, zero_shot_text_features

NAMES = ["dog", "great_white_shark", "cat"]


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
    return CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                transformer_layers=2).eval()


def _token_embeddings(model, text):
    return model.token_embedding(clip.tokenize([text]))[0].detach()


def test_end_layout_matches_tokenized_prompt(model):
    pl = PromptLearner(NAMES, model, n_ctx=4)
    assert pl.ctx.shape == (4, 64) and pl.ctx.requires_grad
    assert pl.ctx.std().item() == pytest.approx(0.02, rel=0.3)
    out = pl()
    assert out.shape == (3, 77, 64)
    # Prompt 1 is "X X X X great white shark." with the X embeddings replaced by ctx.
    ref = _token_embeddings(model, "X X X X great white shark.")
    assert torch.equal(out[1, 0], ref[0])  # SOS
    assert torch.equal(out[1, 1:5], pl.ctx.detach())
    assert torch.equal(out[1, 5:], ref[5:])
    n_name = len(get_tokenizer().encode("great white shark"))
    assert pl.name_lens == [1, n_name, 1]
    assert pl.eot_idx.tolist() == [1 + 4 + 1 + 1, 1 + 4 + n_name + 1, 7]
    assert pl.shared_prefix_len == 5
    prefix, suffix = pl.prefix_and_suffix()
    assert torch.equal(torch.cat([prefix.expand(3, -1, -1), suffix], 1), out)


@pytest.mark.parametrize("position", ["middle", "front"])
def test_middle_and_front_layouts(model, position):
    pl = PromptLearner(NAMES, model, n_ctx=4, class_token_position=position)
    out = pl()
    ref = _token_embeddings(model, "X X X X great white shark.")
    n = pl.name_lens[1]
    ctx = pl.ctx.detach()
    name_tokens = ref[5:5 + n]
    if position == "front":
        expected = torch.cat([ref[:1], name_tokens, ctx, ref[5 + n:]])
    else:
        expected = torch.cat([ref[:1], ctx[:2], name_tokens, ctx[2:], ref[5 + n:]])
    assert torch.equal(out[1], expected)
    assert pl.shared_prefix_len is None
    with pytest.raises(ValueError, match="share no prefix"):
        pl.prefix_and_suffix()
    # Gradient reaches the context through the gather.
    out.sum().backward()
    assert torch.equal(pl.ctx.grad, torch.full_like(pl.ctx, 3.0))


def test_class_specific_context(model):
    pl = PromptLearner(NAMES, model, n_ctx=3, csc=True)
    assert pl.ctx.shape == (3, 3, 64)
    out = pl()
    for c in range(3):
        assert torch.equal(out[c, 1:4], pl.ctx[c].detach())
    assert pl.shared_prefix_len is None


def test_ctx_init_from_words(model):
    pl = PromptLearner(NAMES, model, n_ctx=16, ctx_init="a_photo of a")
    assert pl.n_ctx == 4 and pl.ctx.shape == (4, 64)
    ref = _token_embeddings(model, "a photo of a dog.")
    assert torch.equal(pl.ctx.detach(), ref[1:5])
    assert torch.equal(pl()[0], ref)  # the initial prompt is exactly the tokenised sentence
    csc = PromptLearner(NAMES, model, ctx_init="a photo of a", csc=True)
    assert csc.ctx.shape == (3, 4, 64) and torch.equal(csc.ctx[2].detach(), ref[1:5])


def test_checkpoint_holds_only_ctx_and_ignores_reference_buffers(model):
    pl = PromptLearner(NAMES, model, n_ctx=4)
    sd = pl.state_dict()
    assert list(sd) == ["ctx"]
    other = PromptLearner(NAMES, model, n_ctx=4)
    # A reference-style checkpoint also stores token_prefix/token_suffix (of other class names here).
    ref_sd = {"ctx": sd["ctx"], "token_prefix": torch.zeros(9, 1, 64), "token_suffix": torch.zeros(9, 72, 64)}
    other.load_state_dict(ref_sd)
    assert torch.equal(other.ctx, pl.ctx)
    assert torch.equal(other(), pl())


@pytest.mark.parametrize("kwargs, text", [
    (dict(n_ctx=8), "N_CTX=8, CSC=False"),
    (dict(n_ctx=4, csc=True), "N_CTX=4, CSC=True"),
])
def test_wrong_ctx_shape_is_refused(model, kwargs, text):
    saved = PromptLearner(NAMES, model, n_ctx=4).state_dict()
    pl = PromptLearner(NAMES, model, **kwargs)
    with pytest.raises(ValueError, match="N_CTX=4, CSC=False") as e:
        pl.load_state_dict(saved)
    assert text in str(e.value) and "TRAINER.LOCOOP.N_CTX" in str(e.value)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="class_token_position"):
        PromptLearner(NAMES, model, class_token_position="start")
    with pytest.raises(ValueError, match="N_CTX"):
        PromptLearner(NAMES, model, n_ctx=0)
    with pytest.raises(ValueError, match="non-empty"):
        PromptLearner([], model)
    with pytest.raises(ValueError, match="longer than"):
        PromptLearner(["word " * 70], model, n_ctx=16)


def test_zero_shot_text_features(model):
    feats = zero_shot_text_features(model, NAMES, batch_size=2)
    tokens = clip.tokenize(["a photo of a dog.", "a photo of a great white shark.", "a photo of a cat."])
    ref = F.normalize(model.encode_text(tokens), dim=-1)
    assert feats.shape == (3, 32)
    assert torch.allclose(feats, ref, atol=1e-6)
    two = zero_shot_text_features(model, NAMES, template=["a photo of a {}.", "a {}."])
    ref2 = F.normalize(ref + F.normalize(model.encode_text(clip.tokenize(["a dog.", "a great white shark.", "a cat."])),
                                         dim=-1), dim=-1)
    assert torch.allclose(two, ref2, atol=1e-6)
    with pytest.raises(ValueError, match="template"):
        zero_shot_text_features(model, NAMES, template="a photo")


# ---------------------------------------------------------------------------- the papers' initial context
def _openai_clip_construction(c):
    """What building OpenAI's CLIP module (clip.model.build_model) does to the CPU generator, written with
    torch.nn modules in its constructor's order, then its initialize_parameters() draws."""
    from torch import nn

    def block(d):
        return [nn.MultiheadAttention(d, max(1, d // 64)), nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]

    text_blocks = []
    if isinstance(c.vision_layers, tuple):
        w = c.vision_width
        stem = [nn.Conv2d(3, w // 2, 3, bias=False), nn.Conv2d(w // 2, w // 2, 3, bias=False),
                nn.Conv2d(w // 2, w, 3, bias=False)]
        inplanes, stages = w, []
        for k, blocks in enumerate(c.vision_layers):
            planes = w * 2 ** k
            for b in range(blocks):
                stride = 2 if (k > 0 and b == 0) else 1
                convs = [nn.Conv2d(inplanes, planes, 1, bias=False), nn.Conv2d(planes, planes, 3, bias=False),
                         nn.Conv2d(planes, 4 * planes, 1, bias=False)]
                if stride > 1 or inplanes != 4 * planes:
                    convs.append(nn.Conv2d(inplanes, 4 * planes, 1, bias=False))
                stages.append(convs)
                inplanes = 4 * planes
        e = w * 32
        pool_pos = torch.randn((c.image_resolution // 32) ** 2 + 1, e)
        k_proj, q_proj, v_proj, c_proj = (nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, c.embed_dim))
        del stem, stages, pool_pos
    else:
        w = c.vision_width
        nn.Conv2d(3, w, c.vision_patch_size, stride=c.vision_patch_size, bias=False)
        torch.randn(w), torch.randn((c.image_resolution // c.vision_patch_size) ** 2 + 1, w)
        [block(w) for _ in range(c.vision_layers)]
        torch.randn(w, c.embed_dim)
    text_blocks = [block(c.transformer_width) for _ in range(c.transformer_layers)]
    token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
    positional = torch.empty(c.context_length, c.transformer_width)
    text_projection = torch.empty(c.transformer_width, c.embed_dim)
    nn.init.normal_(token_embedding.weight, std=0.02)
    nn.init.normal_(positional, std=0.01)
    if isinstance(c.vision_layers, tuple):
        for lin in (q_proj, k_proj, v_proj, c_proj):
            nn.init.normal_(lin.weight, std=0.1)
    for attn, _, fc, proj in text_blocks:
        for t in (attn.in_proj_weight, attn.out_proj.weight, fc.weight, proj.weight):
            nn.init.normal_(t, std=0.02)
    nn.init.normal_(text_projection, std=0.02)


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
@pytest.mark.parametrize("csc,half", [(False, False), (True, False), (False, True)])
def test_random_context_is_the_papers_draw_for_the_seed(arch, csc, half):
    from clip.configs import get_config
    from clip.model import build_model, convert_weights_fp16
    from clip.tiny import random_state_dict

    c = get_config(arch)
    ours = build_model(random_state_dict(c, seed=3)).eval()
    if half:
        convert_weights_fp16(ours)
    dtype = torch.float16 if half else torch.float32
    torch.manual_seed(11)  # what set_random_seed(11) does to torch before the model is built
    ours_again = build_model(random_state_dict(c, seed=3))  # our CLIP draws differently from OpenAI's module
    del ours_again
    pl = PromptLearner(NAMES, ours, n_ctx=4, csc=csc)
    torch.manual_seed(11)
    _openai_clip_construction(c)
    expected = torch.empty((3, 4, c.transformer_width) if csc else (4, c.transformer_width), dtype=dtype)
    torch.nn.init.normal_(expected, std=0.02)
    assert pl.ctx.dtype == dtype
    assert torch.equal(pl.ctx.detach(), expected)
    # Another seed, another context; the global generator draws something else.
    assert not torch.equal(PromptLearner(NAMES, ours, n_ctx=4, csc=csc, init_seed=12).ctx.detach(), expected)
    assert not torch.equal(PromptLearner(NAMES, ours, n_ctx=4, csc=csc, init_rng="global").ctx.detach(), expected)
    with pytest.raises(ValueError, match="init_rng"):
        PromptLearner(NAMES, ours, n_ctx=4, init_rng="numpy")
