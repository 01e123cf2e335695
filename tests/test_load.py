"""clip.load on tiny checkpoints: TorchScript archive and state dict give the same model."""
import pytest
import torch
from PIL import Image

import clip


@pytest.mark.parametrize("arch", ["vit", "rn"])
def test_torchscript_and_state_dict_load_identically(arch, request):
    sd_path = request.getfixturevalue(f"tiny_{arch}_path")
    jit_path = request.getfixturevalue(f"tiny_{arch}_jit_path")
    m1, pre1 = clip.load(sd_path, device="cpu")
    m2, _ = clip.load(jit_path, device="cpu")
    assert m1.dtype == torch.float32
    for key, value in m1.state_dict().items():
        assert torch.equal(value, m2.state_dict()[key]), key
    image = pre1(Image.new("RGB", (50, 40), (200, 30, 30))).unsqueeze(0)
    assert image.shape[-1] == m1.visual.input_resolution
    tokens = clip.tokenize(["a photo of a dog.", "a photo of a cat."])
    with torch.no_grad():
        logits, _ = m1(image, tokens)
        glob, local = m1.encode_image(image, return_local=True)
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert local.shape[0] == 1 and local.shape[-1] == glob.shape[-1]


def test_export_and_reload_round_trip(tiny_vit_path, tmp_path):
    model, _ = clip.load(tiny_vit_path)
    path = tmp_path / "exported.pt"
    torch.save(model.openai_state_dict(), path)
    reloaded, _ = clip.load(str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    original = torch.load(tiny_vit_path, weights_only=True)
    exported = torch.load(path, weights_only=True)
    meta = {"input_resolution", "context_length", "vocab_size"}
    assert set(exported) == set(original) - meta
    for key in exported:
        assert torch.equal(exported[key].float(), original[key].float()), key


def test_jit_true_is_refused(tiny_vit_path):
    with pytest.raises(ValueError, match="jit=False"):
        clip.load(tiny_vit_path, jit=True)


def test_available_models_lists_openai_names():
    names = clip.available_models()
    for name in ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]:
        assert name in names
