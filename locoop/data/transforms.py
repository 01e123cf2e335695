"""Image transforms built from Dassl's names in ``cfg.INPUT.TRANSFORMS``, with torchvision.

Training pipeline, in this order (only the named steps are included):

- a plain resize to ``INPUT.SIZE`` unless ``random_crop``, ``random_resized_crop``,
  ``center_crop`` or ``resize`` is named (so every image ends at ``INPUT.SIZE``);
- ``resize``: resize to ``INPUT.SIZE`` (exact height x width);
- ``random_translation``: with probability 0.5 enlarge 1.125x and crop ``INPUT.SIZE`` at a random
  place, else resize to ``INPUT.SIZE`` (Dassl's ``Random2DTranslation``);
- ``random_crop``: random ``INPUT.SIZE`` crop after zero padding ``INPUT.CROP_PADDING``;
- ``random_resized_crop``: random area ``INPUT.RRCROP_SCALE``, resized to ``INPUT.SIZE``;
- ``center_crop``: resize the shorter side to ``max(INPUT.SIZE)`` and crop the centre;
- ``random_flip``: horizontal flip with probability 0.5;
- ``colorjitter`` (``INPUT.COLORJITTER_B/C/S/H``), ``randomgrayscale`` (``INPUT.RGS_P``, default
  0.2), ``gaussian_blur`` (kernel ``INPUT.GB_K`` with probability ``INPUT.GB_P``);
- to a float tensor in [0, 1]; ``normalize`` with ``INPUT.PIXEL_MEAN/STD``.

Test pipeline (Dassl's): resize the shorter side to ``max(INPUT.SIZE)``, centre crop
``INPUT.SIZE``, to tensor, normalise. Unlike Dassl, the test pipeline always normalises: CLIP
features are meaningless on unnormalised pixels, and the papers' configs all name ``normalize``.
Every resize uses ``INPUT.INTERPOLATION`` (bilinear, bicubic or nearest) with antialiasing.

All randomness comes from torch's generator, so a seeded data loader (whose workers are seeded
from it) reproduces the same augmentations.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

INTERPOLATION_MODES = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}

AVAILABLE_TRANSFORMS = (
    "resize", "random_translation", "random_crop", "random_resized_crop", "center_crop",
    "random_flip", "colorjitter", "randomgrayscale", "gaussian_blur", "normalize",
)

# Dassl names this framework does not implement; named separately so the error says so.
_DASSL_UNSUPPORTED = (
    "instance_norm", "cutout", "imagenet_policy", "cifar10_policy", "svhn_policy", "randaugment",
    "randaugment_fixmatch", "randaugment2", "gaussian_noise",
)


class RandomTranslation(torch.nn.Module):
    """Dassl's ``Random2DTranslation``: with probability ``p`` enlarge by 1.125 and random-crop.

    Otherwise (and for the enlargement) resize to exactly ``(height, width)``.
    """

    def __init__(self, height: int, width: int, p: float = 0.5,
                 interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> None:
        super().__init__()
        self.height, self.width, self.p, self.interpolation = int(height), int(width), float(p), interpolation

    def forward(self, img):
        if torch.rand(1).item() > self.p:
            return TF.resize(img, [self.height, self.width], interpolation=self.interpolation, antialias=True)
        new_h, new_w = int(round(self.height * 1.125)), int(round(self.width * 1.125))
        img = TF.resize(img, [new_h, new_w], interpolation=self.interpolation, antialias=True)
        top = int(round(torch.rand(1).item() * (new_h - self.height)))
        left = int(round(torch.rand(1).item() * (new_w - self.width)))
        return TF.crop(img, top, left, self.height, self.width)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size=({self.height}, {self.width}), p={self.p}, interpolation={self.interpolation.value})"


def _input_size(cfg) -> tuple:
    size = tuple(int(s) for s in cfg.INPUT.SIZE)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"INPUT.SIZE must be (height, width) with positive values, got {cfg.INPUT.SIZE!r}")
    return size


def get_interpolation(name: str) -> InterpolationMode:
    """torchvision interpolation mode for ``INPUT.INTERPOLATION``.

    Raises:
        ValueError: unknown name (the valid ones are listed).
    """
    key = str(name).lower()
    if key not in INTERPOLATION_MODES:
        raise ValueError(f"INPUT.INTERPOLATION={name!r} is not valid; choose one of {sorted(INTERPOLATION_MODES)}")
    return INTERPOLATION_MODES[key]


def check_transform_names(choices: Sequence[str]) -> None:
    """Raise ``ValueError`` for a transform name that is not available, listing the valid ones."""
    if isinstance(choices, str):
        raise ValueError(f"INPUT.TRANSFORMS must be a list of names, got the string {choices!r}")
    for name in choices:
        if name in _DASSL_UNSUPPORTED:
            raise ValueError(f"transform {name!r} (a Dassl name) is not supported by this framework; "
                             f"available: {', '.join(AVAILABLE_TRANSFORMS)}")
        if name not in AVAILABLE_TRANSFORMS:
            raise ValueError(f"unknown transform {name!r} in INPUT.TRANSFORMS; available: "
                             f"{', '.join(AVAILABLE_TRANSFORMS)}")


def _normalize(cfg) -> T.Normalize:
    return T.Normalize(mean=list(cfg.INPUT.PIXEL_MEAN), std=list(cfg.INPUT.PIXEL_STD))


def build_train_transform(cfg, choices: Optional[Sequence[str]] = None) -> T.Compose:
    """The training pipeline for ``choices`` (default ``cfg.INPUT.TRANSFORMS``); see module docstring."""
    choices = list(cfg.INPUT.TRANSFORMS if choices is None else choices)
    check_transform_names(choices)
    size = _input_size(cfg)
    interp = get_interpolation(cfg.INPUT.INTERPOLATION)
    steps: list = []
    sizing = {"random_crop", "random_resized_crop", "center_crop", "resize"}
    if not sizing & set(choices) or "resize" in choices:
        steps.append(T.Resize(size, interpolation=interp, antialias=True))
    if "random_translation" in choices:
        steps.append(RandomTranslation(size[0], size[1], interpolation=interp))
    if "random_crop" in choices:
        steps.append(T.RandomCrop(size, padding=int(cfg.INPUT.CROP_PADDING)))
    if "random_resized_crop" in choices:
        scale = tuple(float(s) for s in cfg.INPUT.RRCROP_SCALE)
        steps.append(T.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True))
    if "center_crop" in choices:
        steps += [T.Resize(max(size), interpolation=interp, antialias=True), T.CenterCrop(size)]
    if "random_flip" in choices:
        steps.append(T.RandomHorizontalFlip())
    if "colorjitter" in choices:
        steps.append(T.ColorJitter(brightness=cfg.INPUT.COLORJITTER_B, contrast=cfg.INPUT.COLORJITTER_C,
                                   saturation=cfg.INPUT.COLORJITTER_S, hue=cfg.INPUT.COLORJITTER_H))
    if "randomgrayscale" in choices:
        steps.append(T.RandomGrayscale(p=float(getattr(cfg.INPUT, "RGS_P", 0.2))))
    if "gaussian_blur" in choices:
        steps.append(T.RandomApply([T.GaussianBlur(int(cfg.INPUT.GB_K))], p=float(cfg.INPUT.GB_P)))
    steps.append(T.ToTensor())
    if "normalize" in choices:
        steps.append(_normalize(cfg))
    return T.Compose(steps)


def build_test_transform(cfg) -> T.Compose:
    """Dassl's test pipeline: resize shorter side to ``max(INPUT.SIZE)``, centre crop, tensor, normalise."""
    size = _input_size(cfg)
    interp = get_interpolation(cfg.INPUT.INTERPOLATION)
    return T.Compose([T.Resize(max(size), interpolation=interp, antialias=True), T.CenterCrop(size),
                      T.ToTensor(), _normalize(cfg)])


def _is_swin(cfg) -> bool:
    from locoop.models.swinv2 import is_swinv2_backbone

    backbone = getattr(getattr(cfg, "MODEL", None), "BACKBONE", None)
    return is_swinv2_backbone(str(getattr(backbone, "NAME", "") or ""))


def build_transform(cfg, is_train: bool = True, choices: Optional[Sequence[str]] = None) -> T.Compose:
    """Training or test pipeline from the config (Dassl's ``build_transform``).

    A Swin-V2 backbone (``MODEL.BACKBONE.NAME``, :func:`locoop.models.swinv2.is_swinv2_backbone`) gets
    SeTAR's Swin pipelines instead (:func:`~locoop.models.swinv2.build_swin_preprocess` for test,
    :func:`~locoop.models.swinv2.build_swin_train_preprocess` for training) at ``max(INPUT.SIZE)``;
    ``INPUT.TRANSFORMS`` / ``INPUT.INTERPOLATION`` / ``PIXEL_MEAN`` do not apply to it.

    With ``INPUT.NO_TRANSFORM`` the images are only resized to ``INPUT.SIZE`` and made tensors
    (no augmentation, no normalisation), so they can still be batched.

    Raises:
        ValueError: unknown transform or interpolation name, bad ``INPUT.SIZE``.
    """
    if getattr(cfg.INPUT, "NO_TRANSFORM", False):
        size = _input_size(cfg)
        return T.Compose([T.Resize(size, interpolation=get_interpolation(cfg.INPUT.INTERPOLATION), antialias=True),
                          T.ToTensor()])
    if _is_swin(cfg):  # SeTAR's Swin-V2 pipelines (timm's), at INPUT.SIZE (256 in SeTAR's configs)
        from locoop.models.swinv2 import build_swin_preprocess, build_swin_train_preprocess

        n_px = max(_input_size(cfg))
        return build_swin_train_preprocess(n_px) if is_train else build_swin_preprocess(n_px)
    if is_train:
        return build_train_transform(cfg, choices)
    check_transform_names(list(cfg.INPUT.TRANSFORMS if choices is None else choices))
    return build_test_transform(cfg)
