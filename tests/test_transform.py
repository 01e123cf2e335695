"""Tests of clip/transform.py (CLIP preprocessing)."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from clip.transform import CLIP_MEAN, CLIP_STD, _transform, build_preprocess, convert_to_rgb

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def expected_constant(rgb, n):
    """Normalised tensor of an n x n image filled with one 8-bit colour."""
    return ((torch.tensor(rgb, dtype=torch.float32) / 255).view(3, 1, 1) - MEAN) / STD * torch.ones(3, n, n)


def test_constant_rgb_image_values():
    out = build_preprocess(32)(Image.new("RGB", (50, 40), (200, 100, 0)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected_constant((200, 100, 0), 32), atol=1e-5, rtol=0)


def test_non_square_crop_is_centered():
    # 96x32: the shorter side is already 32, so only the crop acts: columns 32..63 stay.
    arr = np.zeros((32, 96, 3), dtype=np.uint8)
    arr[:, :, 0] = 255
    arr[:, 32:64] = (0, 255, 0)
    out = build_preprocess(32)(Image.fromarray(arr))
    torch.testing.assert_close(out, expected_constant((0, 255, 0), 32), atol=1e-5, rtol=0)
    # Portrait image: rows are cropped instead.
    out = build_preprocess(32)(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))))
    torch.testing.assert_close(out, expected_constant((0, 255, 0), 32), atol=1e-5, rtol=0)


def test_resize_then_crop_matches_pil_by_hand():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (100, 200, 3), dtype=np.uint8))
    out = build_preprocess(50)(img)
    ref = img.resize((100, 50), Image.BICUBIC).crop((25, 0, 75, 50))
    ref = (torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255 - MEAN) / STD
    assert out.shape == (3, 50, 50)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_grayscale_same_as_openai_order():
    # OpenAI converts to RGB after resizing; for grayscale the pixels are identical.
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (45, 70), dtype=np.uint8), mode="L")
    ours = build_preprocess(24)(img)
    theirs = build_preprocess(24)(img.resize((37, 24), Image.BICUBIC).crop((6, 0, 30, 24)).convert("RGB"))
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (40, 40), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    if transparent:
        img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(
    "make, rgb",
    [
        (lambda: Image.new("L", (40, 40), 128), (128, 128, 128)),
        (lambda: Image.new("LA", (40, 40), (128, 7)), (128, 128, 128)),
        (lambda: Image.new("1", (40, 40), 1), (255, 255, 255)),
        (lambda: Image.new("RGBA", (40, 40), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped
        (lambda: Image.new("CMYK", (40, 40), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: _palette(False), (10, 20, 30)),
        (lambda: _palette(True), (10, 20, 30)),
        (lambda: Image.fromarray(np.full((40, 40), 257 * 128, dtype=np.uint16)), (128, 128, 128)),  # I;16
        (lambda: Image.new("I", (40, 40), 257 * 128), (128, 128, 128)),  # 16-bit stored as I
        (lambda: Image.new("F", (40, 40), 0.5), (128, 128, 128)),
    ],
    ids=["L", "LA", "1", "RGBA", "CMYK", "P", "P-transparent", "I;16", "I", "F"],
)
def test_every_mode_converts(make, rgb):
    img = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning
        out = build_preprocess(16)(img)
    assert convert_to_rgb(img).mode == "RGB"
    torch.testing.assert_close(out, expected_constant(rgb, 16), atol=1e-5, rtol=0)


def test_bad_input_and_pickling():
    with pytest.raises(TypeError, match="PIL"):
        build_preprocess(16)(np.zeros((16, 16, 3), dtype=np.uint8))
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="n_px"):
            build_preprocess(bad)
    # DataLoader workers may pickle the transform.
    tfm = pickle.loads(pickle.dumps(_transform(16)))
    assert tfm(Image.new("RGB", (20, 20))).shape == (3, 16, 16)
