"""CLIP model: shapes, exact fast paths vs. their naive twins, OpenAI state-dict round trip, errors."""
import pytest
import torch
import torch.nn.functional as F

from clip.model import CLIP, build_model, convert_weights_fp16, from_openai_state_dict, to_openai_state_dict
from clip.naive import encode_image_local_naive, encode_text_full_naive

VIT = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
           context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
RN = dict(VIT, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16, vision_patch_size=None)


def _random_model(arch: dict, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(**arch)
    with torch.no_grad():  # move LayerNorm/BatchNorm away from identity so every path matters
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _tokens() -> torch.Tensor:
    toks = torch.zeros(3, 77, dtype=torch.long)
    toks[:, 0] = 49406
    toks[0, 1:4] = torch.tensor([320, 1125, 49407])
    toks[1, 1:8] = torch.tensor([320, 1125, 539, 320, 1929, 269, 49407])
    toks[2, 1] = 49407
    return toks


@pytest.fixture(params=["vit", "rn"])
def model(request):
    return _random_model(VIT if request.param == "vit" else RN)


def test_shapes(model):
    res = model.visual.input_resolution
    images = torch.randn(2, 3, res, res)
    with torch.no_grad():
        glob = model.encode_image(images)
        glob2, local = model.encode_image(images, return_local=True)
        text = model.encode_text(_tokens())
        logits_per_image, logits_per_text = model(images, _tokens())
    n_patches = (res // model.visual.patch_size) ** 2
    assert glob.shape == (2, 32) and local.shape == (2, n_patches, 32) and text.shape == (3, 32)
    assert logits_per_image.shape == (2, 3) and torch.equal(logits_per_text, logits_per_image.t())
    torch.testing.assert_close(glob, glob2, rtol=0, atol=1e-6)


def test_local_features_match_naive_value_path():
    model = _random_model(VIT)
    images = torch.randn(2, 3, model.visual.input_resolution, model.visual.input_resolution)
    with torch.no_grad():
        glob, local = model.encode_image(images, return_local=True)
        glob_ref, local_ref = encode_image_local_naive(model, images)
    torch.testing.assert_close(glob, glob_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(local, local_ref, rtol=0, atol=1e-5)


def _resnet_reference(model: CLIP, images: torch.Tensor) -> tuple:
    """Global and local features of a ModifiedResNet with the attention pool written out independently.

    Sequence-first, with the packed-bias multi-head attention of ``F.multi_head_attention_forward``
    (how OpenAI's AttentionPool2d computes the global feature); the local features are every
    position of the final feature map, without positional embedding, through the pool's value
    then output projection (LoCoOp's RN local path). The convolutional trunk is not under test.
    """
    v = model.visual
    x = images
    for conv, bn, relu in ((v.conv1, v.bn1, v.relu1), (v.conv2, v.bn2, v.relu2), (v.conv3, v.bn3, v.relu3)):
        x = relu(bn(conv(x)))
    x = v.layer4(v.layer3(v.layer2(v.layer1(v.avgpool(x)))))
    ap = v.attnpool
    tokens = x.flatten(start_dim=2).permute(2, 0, 1)  # [HW, B, C]
    seq = torch.cat([tokens.mean(dim=0, keepdim=True), tokens]) + ap.positional_embedding[:, None, :]
    glob, _ = F.multi_head_attention_forward(
        query=seq[:1], key=seq, value=seq, embed_dim_to_check=seq.shape[-1], num_heads=ap.num_heads,
        q_proj_weight=ap.q_proj.weight, k_proj_weight=ap.k_proj.weight, v_proj_weight=ap.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([ap.q_proj.bias, ap.k_proj.bias, ap.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=ap.c_proj.weight,
        out_proj_bias=ap.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    local = F.linear(F.linear(tokens, ap.v_proj.weight, ap.v_proj.bias), ap.c_proj.weight, ap.c_proj.bias)
    return glob[0], local.permute(1, 0, 2)


def test_resnet_local_features_match_an_independent_attention_pool():
    model = _random_model(RN)
    images = torch.randn(2, 3, model.visual.input_resolution, model.visual.input_resolution)
    with torch.no_grad():
        glob, local = model.encode_image(images, return_local=True)
        glob_ref, local_ref = _resnet_reference(model, images)
    assert local.shape == (2, (model.visual.input_resolution // 32) ** 2, 32)
    torch.testing.assert_close(glob, glob_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(local, local_ref, rtol=0, atol=1e-5)
    # The local path has no positional embedding: moving it changes the global feature only.
    with torch.no_grad():
        model.visual.attnpool.positional_embedding.add_(0.5)
        glob2, local2 = model.encode_image(images, return_local=True)
    assert not torch.allclose(glob2, glob, atol=1e-3) and torch.equal(local2, local)


def test_local_features_hand_computed_value_path():
    """ViT local features are ln_post/proj of the last block's value path (docs/ARCHITECTURE.md, "CLIP")."""
    model = _random_model(VIT, seed=1)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        x = model.visual.stem(images)
        x = model.visual.transformer.resblocks[0](x)
        last = model.visual.transformer.resblocks[1]
        attn = last.attn
        y = x + attn.out_proj(attn.v_proj(last.ln_1(x)))
        y = y + last.mlp(last.ln_2(y))
        expected = model.visual.ln_post(y[:, 1:]) @ model.visual.proj.weight.t()
        _, local = model.encode_image(images, return_local=True)
    torch.testing.assert_close(local, expected, rtol=0, atol=1e-5)


def test_truncated_text_matches_full_context(model):
    with torch.no_grad():
        fast = model.encode_text(_tokens())
        full = encode_text_full_naive(model, _tokens())
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)


def test_encode_text_embeddings_equals_encode_text(model):
    toks = _tokens()
    with torch.no_grad():
        a = model.encode_text(toks)
        b = model.encode_text_embeddings(model.token_embedding(toks), toks.argmax(-1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_from_every_layer_matches_full_forward():
    model = _random_model(VIT)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.visual(images, return_local=True)
        x = model.visual.stem(images)
        for start in range(model.visual.transformer.layers):
            out = model.visual.forward_from(x, start, return_local=True)
            torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-6)
            x = model.visual.transformer.resblocks[start](x)


def test_block_level_access_is_the_encoders_path():
    """Stem, blocks start..end, finish (with or without the projection) and project, per tower: the
    operations of encode_image / encode_text, so a cached prefix plus finish gives the same bits."""
    model = _random_model(VIT)
    images, toks = torch.randn(2, 3, 32, 32), _tokens()
    assert (model.num_visual_blocks, model.num_text_blocks) == (2, 2)
    with torch.no_grad():
        glob, local = model.encode_image(images, return_local=True)
        text = model.encode_text(toks)
        eot = toks.argmax(-1)
        for start in range(2):
            h = model.visual_blocks(model.visual_stem(images), 0, start)
            g, loc = model.visual_finish(h, start)
            assert torch.equal(g, glob) and torch.equal(loc, local)
            pre_g, pre_l = model.visual_finish(h, start, project=False)
            assert pre_g.shape == (2, 64) and torch.equal(model.visual_project(pre_g), glob)
            assert torch.equal(model.visual_project(pre_l), local)
            t = model.text_blocks(model.text_stem(model.token_embedding(toks), eot), 0, start)
            assert torch.equal(model.text_finish(t, start, eot), text)
            assert torch.equal(model.text_project(model.text_finish(t, start, eot, project=False)), text)
        assert model.text_stem(model.token_embedding(toks), eot).shape[1] == int(eot.max()) + 1  # cut after the EOT
    rn = _random_model(RN)
    assert rn.num_visual_blocks == 0
    with pytest.raises(ValueError, match="ModifiedResNet, which has no transformer blocks"):
        rn.visual_stem(torch.randn(1, 3, 64, 64))


def test_other_input_resolution_interpolates_positions(model):
    res = model.visual.input_resolution * 2
    with torch.no_grad():
        _, local = model.encode_image(torch.randn(1, 3, res, res), return_local=True)
    assert local.shape[1] == (res // model.visual.patch_size) ** 2


def test_openai_state_dict_round_trip(model):
    sd = model.openai_state_dict()
    assert not any(".q_proj." in k for k in sd if not k.startswith("visual.attnpool"))
    if "visual.proj" in sd:
        w = model.visual.transformer.width
        assert sd["visual.proj"].shape == (w, 32)
        assert sd["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * w, w)
    assert sd["text_projection"].shape == (64, 32)
    rebuilt = build_model(sd)
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key
    assert from_openai_state_dict(to_openai_state_dict(model.state_dict())).keys() == model.state_dict().keys()


def test_build_model_ignores_openai_metadata_keys():
    sd = _random_model(VIT).openai_state_dict()
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    build_model(sd)


def test_missing_and_unexpected_keys_are_named():
    sd = _random_model(VIT).openai_state_dict()
    del sd["ln_final.bias"]
    sd["visual.extra_thing"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['ln_final.bias'\].*unexpected keys \['visual.extra_thing'\]"):
        build_model(sd)


def test_wrong_shape_is_named():
    sd = _random_model(VIT).openai_state_dict()
    sd["ln_final.weight"] = torch.ones(65)
    with pytest.raises(ValueError):
        build_model(sd)
    sd = _random_model(VIT).openai_state_dict()
    sd["visual.ln_post.weight"] = torch.ones(5)
    with pytest.raises(ValueError, match="visual.ln_post.weight"):
        build_model(sd)


def test_not_a_clip_state_dict():
    with pytest.raises(ValueError, match="OpenAI's key names"):
        build_model({"fc.weight": torch.zeros(2, 2)})


def test_fp16_conversion_keeps_norms_fp32():
    model = convert_weights_fp16(_random_model(RN))
    assert model.dtype == torch.float16
    assert model.visual.layer1[0].bn1.weight.dtype == torch.float32
    assert model.ln_final.weight.dtype == torch.float32
    assert model.text_projection.weight.dtype == torch.float16
    assert model.positional_embedding.dtype == torch.float16


def test_length_buckets_match_full_context_and_keep_order():
    """Large batches are encoded in EOT-sorted buckets; features and order equal the full context."""
    model = _random_model(VIT)
    g = torch.Generator().manual_seed(0)
    n = 3 * CLIP.TEXT_BUCKET_SIZE + 7
    lengths = torch.randint(1, 40, (n,), generator=g)
    toks = torch.zeros(n, 77, dtype=torch.long)
    toks[:, 0] = 49406
    for i, ln in enumerate(lengths.tolist()):
        toks[i, 1:ln + 1] = torch.randint(1, 49000, (ln,), generator=g)
        toks[i, ln + 1] = 49407
    with torch.no_grad():
        fast = model.encode_text(toks)
        full = encode_text_full_naive(model, toks)
        one_by_one = torch.cat([model.encode_text(toks[i:i + 1]) for i in range(0, n, 97)])
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast[::97], one_by_one, rtol=0, atol=1e-5)


def test_length_buckets_propagate_gradients_to_embeddings():
    model = _random_model(VIT)
    n = 2 * CLIP.TEXT_BUCKET_SIZE
    toks = torch.zeros(n, 77, dtype=torch.long)
    toks[:, 0] = 49406
    eot = 2 + torch.arange(n) % 30
    toks[torch.arange(n), eot] = 49407
    emb = model.token_embedding(toks).detach().requires_grad_(True)
    model.encode_text_embeddings(emb, eot).sum().backward()
    emb_ref = emb.detach().clone().requires_grad_(True)
    from clip.naive import encode_text_embeddings_full_naive

    encode_text_embeddings_full_naive(model, emb_ref, eot).sum().backward()
    torch.testing.assert_close(emb.grad, emb_ref.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 5])
def test_global_feature_does_not_depend_on_return_local_at_vit_b16_width(batch):
    # At real widths a matmul over [B, 1, W] and one over [B, N, W] can round differently; the CLS
    # row must take the same operations whether or not the local features are asked for.
    from clip.model import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(768, 12).eval()
    x = torch.randn(batch, 197, 768)
    with torch.no_grad():
        cls_only, none = block.forward_cls_and_local(x, False)
        cls, local = block.forward_cls_and_local(x, True)
    assert none is None and local.shape == (batch, 196, 768)
    assert torch.equal(cls_only, cls)
