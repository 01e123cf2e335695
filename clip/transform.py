"""CLIP's image preprocessing: resize the shorter side (bicubic), center crop, RGB, normalise."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image mode to 8-bit RGB.

    Grayscale, CMYK, YCbCr, ... use PIL's conversion. Transparent images (RGBA, LA, palette with a
    transparent colour) drop the alpha channel as CLIP's preprocessing does, going through RGBA so
    that PIL does not warn about palette transparency. 16-bit and float grayscale images are scaled
    to 0..255 first; PIL would otherwise clip them.

    Raises:
        TypeError: ``image`` is not a PIL image.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}; open files with PIL.Image.open")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if mode == "F":
            # Float images are taken as 0..1 intensities when they look like it.
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


# Kept under OpenAI's private name for code that imports it from there.
_convert_image_to_rgb = convert_to_rgb


def build_preprocess(n_px: int) -> T.Compose:
    """CLIP's test-time preprocessing for images of side ``n_px``.

    Convert to RGB, resize the shorter side to ``n_px`` (bicubic, antialiased), center crop
    ``n_px x n_px``, to a float tensor in [0, 1], normalise with CLIP's mean and std.

    OpenAI converts to RGB after cropping; converting first gives the same pixels for RGB and
    grayscale images, and lets palette and 16-bit images be resized bicubically (PIL resizes a
    palette image with nearest neighbour and cannot resize some 16-bit modes bicubically).

    Args:
        n_px: the model's input resolution (``model.visual.input_resolution``).

    Returns:
        A picklable transform mapping a PIL image to a float32 tensor ``[3, n_px, n_px]``.

    Raises:
        ValueError: ``n_px`` is not a positive integer.
    """
    if not isinstance(n_px, int) or isinstance(n_px, bool) or n_px <= 0:
        raise ValueError(f"n_px must be a positive int (the model's input resolution), got {n_px!r}")
    return T.Compose([
        convert_to_rgb,
        T.Resize(n_px, interpolation=InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(n_px),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


_transform = build_preprocess
