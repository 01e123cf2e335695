"""The CLIP head (locoop/models/head.py): features, logits and accuracy against hand-computed values."""
import copy

import pytest
import torch
import torch.nn.functional as F

import clip
from clip.model import build_model, convert_weights_fp16
from clip.naive import encode_image_local_naive, encode_text_full_naive
from clip.tiny import random_state_dict
from locoop.models.head import (CLIPHead, ClassPrompts, ImageClassifier, accuracy, class_logits, l2_normalize,
                                num_correct, zero_shot_prompts, zero_shot_text_features)
from locoop.trainers.prompt_learner import PromptLearner

NAMES = ["dog", "great_white_shark", "cat", "red striped thing 3"]


@pytest.fixture(scope="module")
def model():
    return build_model(random_state_dict("tiny-vit", seed=0))


def _images(n=3, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_image_features_are_normalised_fp32_and_match_the_reference(model):
    head = CLIPHead(model)
    x = _images()
    with torch.no_grad():
        g, loc = head.encode_image(x)
        g_ref, loc_ref = encode_image_local_naive(model, x)  # LoCoOp's every-block value path
    assert g.dtype == loc.dtype == torch.float32 and g.shape == (3, 32) and loc.shape == (3, 16, 32)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(loc.norm(dim=-1), torch.ones(3, 16))
    torch.testing.assert_close(g, g_ref / g_ref.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)
    torch.testing.assert_close(loc, loc_ref / loc_ref.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)
    # the CLS row takes the same operations with and without local features: bit-identical
    assert torch.equal(head.encode_image(x, return_local=False), g)


def test_fp16_model_gives_fp32_features_close_to_fp32(model):
    half = convert_weights_fp16(copy.deepcopy(model))
    assert half.dtype == torch.float16
    x = _images()
    tokens = zero_shot_prompts(NAMES, "a photo of a {}.")
    with torch.no_grad():
        g16, loc16 = CLIPHead(half).encode_image(x)
        t16 = CLIPHead(half).text_features(tokens)
        g32, loc32 = CLIPHead(model).encode_image(x)
        t32 = CLIPHead(model).text_features(tokens)
    assert g16.dtype == loc16.dtype == t16.dtype == torch.float32
    for a, b in ((g16, g32), (loc16, loc32), (t16, t32)):
        assert (a - b).abs().max() < 2e-2  # fp16 weights and activations: ~3 decimal digits


def test_text_features_of_tokens_embeddings_and_prompt_learners(model):
    head = CLIPHead(model)
    prompts = zero_shot_prompts(NAMES, "a photo of a {}.", chunk_size=3)
    assert prompts.num_classes == 4 and prompts.chunks() == [slice(0, 3), slice(3, 4)]
    tokens = clip.tokenize(["a photo of a dog.", "a photo of a great white shark.", "a photo of a cat.",
                            "a photo of a red striped thing 3."])
    assert torch.equal(prompts.tokens, tokens)
    with torch.no_grad():
        feats = head.text_features(prompts)
        ref = encode_text_full_naive(model, tokens)  # 77 tokens, explicit causal mask
        emb = head.text_features(ClassPrompts(embeddings=model.token_embedding(tokens), eot_idx=tokens.argmax(-1)))
    torch.testing.assert_close(feats, ref / ref.norm(dim=-1, keepdim=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(emb, feats, rtol=0, atol=1e-6)
    # a prompt learner goes through the shared-prefix encoder, and the gradient reaches its context
    torch.manual_seed(0)
    pl = PromptLearner(NAMES, model, n_ctx=4)
    out = head.text_features(pl)
    with torch.no_grad():
        plain = head.text_features(ClassPrompts(embeddings=pl(), eot_idx=pl.eot_idx))
    assert head.text_encoder.resolve_mode(pl) == "shared_prefix"
    torch.testing.assert_close(out.detach(), plain, rtol=0, atol=1e-5)
    out.sum().backward()
    assert pl.ctx.grad is not None and pl.ctx.grad.abs().sum() > 0


def test_logits_are_scaled_cosines_and_the_classifier_interface(model):
    head = CLIPHead(model)
    x = _images()
    text = zero_shot_text_features(model, NAMES)
    with torch.no_grad():
        glob, local = head(x, text)
        g, loc = model.encode_image(x, return_local=True)
    scale = model.logit_scale.detach().exp()
    assert float(scale) == pytest.approx(100.0, rel=1e-5)
    torch.testing.assert_close(glob, scale * F.normalize(g, dim=-1) @ text.t(), rtol=0, atol=1e-4)
    torch.testing.assert_close(local, scale * F.normalize(loc, dim=-1) @ text.t(), rtol=0, atol=1e-4)
    classifier = head.classifier(text)
    assert isinstance(classifier, ImageClassifier) and classifier.num_classes == 4
    with torch.no_grad():
        g2, l2 = classifier(x)
        assert torch.equal(g2, glob) and torch.equal(l2, local)
        torch.testing.assert_close(classifier(x, return_local=False), glob, rtol=0, atol=1e-4)
    assert torch.equal(class_logits(torch.eye(2), torch.eye(2), 3.0), 3.0 * torch.eye(2))


def test_image_graph_only_when_the_image_tower_trains(model):
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    head = CLIPHead(m)
    g, loc = head.encode_image(_images())
    assert g.grad_fn is None and loc.grad_fn is None
    m.visual.transformer.resblocks[1].mlp.c_fc.weight.requires_grad_(True)
    g, loc = head.encode_image(_images())
    loc.sum().backward()
    assert m.visual.transformer.resblocks[1].mlp.c_fc.weight.grad.abs().sum() > 0


def test_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([1, 1, 2, 2])
    # rows: correct; tie -> first index 0 != 1; correct; wrong
    assert num_correct(logits, labels) == 2
    assert accuracy(logits, labels) == 50.0
    assert accuracy(logits[:0], labels[:0]) == 0.0
    assert l2_normalize(torch.tensor([[3.0, 4.0]], dtype=torch.float16)).dtype == torch.float32


def test_prompt_errors():
    with pytest.raises(ValueError, match="template must contain"):
        zero_shot_prompts(NAMES, "a photo")
    with pytest.raises(ValueError, match="template must contain"):
        zero_shot_prompts(NAMES, "{} and {}")
    with pytest.raises(ValueError, match="longer than"):
        zero_shot_prompts(["word " * 80], "a photo of a {}.")
    with pytest.raises(ValueError, match="exactly one of tokens"):
        ClassPrompts()
    with pytest.raises(ValueError, match="eot_idx"):
        ClassPrompts(embeddings=torch.zeros(2, 77, 8))
    with pytest.raises(ValueError, match="chunk_size"):
        ClassPrompts(tokens=torch.zeros(2, 77, dtype=torch.long), chunk_size=0)
