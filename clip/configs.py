"""Architecture hyper-parameters of OpenAI's CLIP models and of tiny test models.

The values are the constructor arguments of :class:`clip.model.CLIP`, i.e. what
:func:`clip.model.infer_architecture` reads back from a checkpoint's shapes. Attention heads are not
free parameters: OpenAI's checkpoints imply ``width // 64`` heads (``width * 32 // 64`` for the
ResNet attention pool), so every config here keeps to that rule.

Tiny models (for tests and demos, random weights only) are registered with
:func:`register_tiny_model` (into :data:`CONFIGS`, the one registry of architectures) and listed by
:func:`list_tiny_models`; :func:`clip.tiny.create_tiny_model` builds one with random weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

from .registry import Registry

VisionLayers = Union[int, tuple[int, int, int, int]]


@dataclass(frozen=True)
class CLIPConfig:
    """Hyper-parameters of one CLIP architecture.

    Attributes:
        name: model name (``"ViT-B/16"``, ``"tiny-vit"``, ...).
        embed_dim: joint image-text embedding size.
        image_resolution: input image side in pixels.
        vision_layers: ViT depth (int) or the ResNet's blocks per stage (4-tuple).
        vision_width: ViT width, or the ResNet stem width (stage ``k`` has ``width * 2**k * 4`` channels).
        vision_patch_size: ViT patch size; None for a ResNet.
        context_length: text positions (77).
        vocab_size: BPE vocabulary size (49408).
        transformer_width: text transformer width.
        transformer_heads: text attention heads (``transformer_width // 64``).
        transformer_layers: text transformer depth.
    """

    name: str
    embed_dim: int
    image_resolution: int
    vision_layers: VisionLayers
    vision_width: int
    vision_patch_size: Optional[int]
    transformer_width: int
    transformer_layers: int
    transformer_heads: Optional[int] = None
    context_length: int = 77
    vocab_size: int = 49408

    def __post_init__(self) -> None:
        if self.transformer_heads is None:
            object.__setattr__(self, "transformer_heads", self.transformer_width // 64)
        if isinstance(self.vision_layers, list):
            object.__setattr__(self, "vision_layers", tuple(self.vision_layers))
        self.validate()

    @property
    def is_vit(self) -> bool:
        """True for a Vision Transformer image tower, False for a ModifiedResNet."""
        return not isinstance(self.vision_layers, tuple)

    @property
    def vision_heads(self) -> int:
        """Attention heads of the image tower (ViT blocks or the ResNet attention pool)."""
        return self.vision_width // 64 if self.is_vit else self.vision_width * 32 // 64

    @property
    def grid_size(self) -> int:
        """Side of the patch grid (ViT) or of the final feature map (ResNet, stride 32)."""
        return self.image_resolution // (self.vision_patch_size if self.is_vit else 32)

    def validate(self) -> None:
        """Check that the numbers describe a model that an OpenAI-format checkpoint can encode.

        Raises:
            ValueError: naming the inconsistent field.
        """
        if self.transformer_width % 64 or self.transformer_width <= 0:
            raise ValueError(f"{self.name}: transformer_width must be a positive multiple of 64 "
                             f"(heads = width // 64), got {self.transformer_width}")
        if self.transformer_heads != self.transformer_width // 64:
            raise ValueError(f"{self.name}: transformer_heads must be transformer_width // 64 = "
                             f"{self.transformer_width // 64}, got {self.transformer_heads}")
        if self.is_vit:
            if not self.vision_patch_size:
                raise ValueError(f"{self.name}: a ViT needs vision_patch_size")
            if self.vision_width % 64:
                raise ValueError(f"{self.name}: ViT vision_width must be a multiple of 64, got {self.vision_width}")
            if self.image_resolution % self.vision_patch_size:
                raise ValueError(f"{self.name}: image_resolution {self.image_resolution} is not a multiple "
                                 f"of the patch size {self.vision_patch_size}")
        else:
            if len(self.vision_layers) != 4 or min(self.vision_layers) < 1:
                raise ValueError(f"{self.name}: a ResNet needs 4 stages of >= 1 block, got {self.vision_layers}")
            if self.vision_patch_size is not None:
                raise ValueError(f"{self.name}: a ResNet has no patch size; set vision_patch_size=None")
            if self.vision_width % 2:
                raise ValueError(f"{self.name}: ResNet vision_width must be even, got {self.vision_width}")
            if self.image_resolution % 32:
                raise ValueError(f"{self.name}: ResNet image_resolution must be a multiple of 32, "
                                 f"got {self.image_resolution}")

    def model_kwargs(self) -> dict:
        """Keyword arguments of :class:`clip.model.CLIP` (everything but the name)."""
        kwargs = dataclasses.asdict(self)
        kwargs.pop("name")
        return kwargs


#: Every architecture by name: OpenAI's released models, then the registered tiny test models.
CONFIGS = Registry("CLIP_CONFIG", kind="CLIP architecture", plural="architectures")
for _c in [
    CLIPConfig("RN50", 1024, 224, (3, 4, 6, 3), 64, None, 512, 12),
    CLIPConfig("RN101", 512, 224, (3, 4, 23, 3), 64, None, 512, 12),
    CLIPConfig("RN50x4", 640, 288, (4, 6, 10, 6), 80, None, 640, 12),
    CLIPConfig("RN50x16", 768, 384, (6, 8, 18, 8), 96, None, 768, 12),
    CLIPConfig("RN50x64", 1024, 448, (3, 15, 36, 10), 128, None, 1024, 12),
    CLIPConfig("ViT-B/32", 512, 224, 12, 768, 32, 512, 12),
    CLIPConfig("ViT-B/16", 512, 224, 12, 768, 16, 512, 12),
    CLIPConfig("ViT-L/14", 768, 224, 24, 1024, 14, 768, 12),
    CLIPConfig("ViT-L/14@336px", 768, 336, 24, 1024, 14, 768, 12),
]:
    CONFIGS.register(_c, name=_c.name)
del _c
_OPENAI_NAMES = tuple(CONFIGS.registered_names())


def register_tiny_model(fn: Callable[[], CLIPConfig]) -> Callable[[], CLIPConfig]:
    """Decorator registering a function that returns a tiny test config under the config's name.

    Every registered tiny model is covered by the contract tests (forward, backward, no NaN).

    Raises:
        RegistryError: the name is taken (by an OpenAI model or another tiny model).
    """
    config = fn()
    CONFIGS.register(config, name=config.name)
    return fn


@register_tiny_model
def tiny_vit() -> CLIPConfig:
    """ViT, 32 px images, 4x4 patches of 8 px, one head per tower, 2 layers each."""
    return CLIPConfig("tiny-vit", embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                      vision_patch_size=8, transformer_width=64, transformer_layers=2)


@register_tiny_model
def tiny_vit_h2() -> CLIPConfig:
    """Like tiny-vit but width 128, i.e. two attention heads (catches head-splitting mistakes)."""
    return CLIPConfig("tiny-vit-h2", embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128,
                      vision_patch_size=8, transformer_width=128, transformer_layers=2)


@register_tiny_model
def tiny_vit_p16() -> CLIPConfig:
    """ViT-B/16's input geometry (224 px, 14x14 grid of 16 px patches) with a tiny width and depth."""
    return CLIPConfig("tiny-vit-p16", embed_dim=32, image_resolution=224, vision_layers=2, vision_width=64,
                      vision_patch_size=16, transformer_width=64, transformer_layers=2)


@register_tiny_model
def tiny_vit_l14() -> CLIPConfig:
    """ViT-L/14's structure scaled down: 14 px patches (a 4x4 grid at 56 px), an image tower wider and
    deeper than the text tower (2 heads vs 1, 3 vs 2 layers) and embed_dim = text width, as L/14's
    1024 / 768 / 768."""
    return CLIPConfig("tiny-vit-l14", embed_dim=64, image_resolution=56, vision_layers=3, vision_width=128,
                      vision_patch_size=14, transformer_width=64, transformer_layers=2)


@register_tiny_model
def tiny_rn() -> CLIPConfig:
    """ModifiedResNet with one block per stage, stem width 16 (512 channels, 8 pooling heads), 64 px."""
    return CLIPConfig("tiny-rn", embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                      vision_patch_size=None, transformer_width=64, transformer_layers=2)


def list_openai_models() -> list[str]:
    """Names of OpenAI's released CLIP architectures."""
    return list(_OPENAI_NAMES)


def list_tiny_models() -> list[str]:
    """Names of the registered tiny test architectures."""
    return sorted(CONFIGS.list(lambda name, _: name not in _OPENAI_NAMES))


def list_models() -> list[str]:
    """All config names: OpenAI's, then the tiny ones."""
    return list_openai_models() + list_tiny_models()


def get_config(name: Union[str, CLIPConfig]) -> CLIPConfig:
    """The config of a model name (a config is returned as is).

    Raises:
        RegistryError (a ValueError): unknown name, naming the closest and all valid ones.
    """
    if isinstance(name, CLIPConfig):
        return name
    return CONFIGS.get(name)
