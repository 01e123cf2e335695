"""Random-weight CLIP checkpoints in OpenAI's exact format (keys, shapes, archive kinds).

Pretrained weights cannot be downloaded on the machines we build on, so every loading path is
exercised with checkpoints made here: a plain ``torch.save`` state dict, or a TorchScript archive
whose ``state_dict()`` has OpenAI's key names, as the released ``.pt`` files do. Any architecture
can be made: a tiny test model (:func:`clip.configs.list_tiny_models`) or the real shapes of an
OpenAI model (for benchmarks with random weights).
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from typing import Union

import torch
from torch import nn

from .configs import CLIPConfig, get_config
from .fileio import atomic_write

Tensor = torch.Tensor
FORMATS = ("state_dict", "torchscript")


class _Init:
    """Draws tensors from one seeded generator so a (config, seed) pair always gives the same weights."""

    def __init__(self, seed: int, meta: bool = False) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.meta = meta

    def normal(self, shape: tuple[int, ...], std: float, mean: float = 0.0) -> Tensor:
        if self.meta:
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=self.gen) * std + mean

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> Tensor:
        if self.meta:
            return torch.empty(shape, device="meta")
        return torch.rand(shape, generator=self.gen) * (high - low) + low


def _layer_norm(sd: dict, prefix: str, width: int, init: _Init) -> None:
    # Not exactly 1/0, so that a loader mixing up LayerNorms changes the outputs.
    sd[f"{prefix}.weight"] = init.normal((width,), 0.02, mean=1.0)
    sd[f"{prefix}.bias"] = init.normal((width,), 0.02)


def _batch_norm(sd: dict, prefix: str, channels: int, init: _Init, scale: float = 1.0) -> None:
    sd[f"{prefix}.weight"] = init.normal((channels,), 0.1 * scale, mean=scale)
    sd[f"{prefix}.bias"] = init.normal((channels,), 0.05)
    sd[f"{prefix}.running_mean"] = init.normal((channels,), 0.05)
    sd[f"{prefix}.running_var"] = init.uniform((channels,), 0.8, 1.25)
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)


def _conv(sd: dict, key: str, c_out: int, c_in: int, k: int, init: _Init, gain: float = 2.0) -> None:
    # He initialisation keeps activation scale through conv + ReLU with identity-like BatchNorm.
    sd[key] = init.normal((c_out, c_in, k, k), math.sqrt(gain / (c_in * k * k)))


def _transformer(sd: dict, prefix: str, width: int, layers: int, init: _Init) -> None:
    # OpenAI's initialisation scales (attention 1/sqrt(w), residual outputs shrunk with depth).
    attn_std = width ** -0.5
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}"
        sd[f"{p}.attn.in_proj_weight"] = init.normal((3 * width, width), attn_std)
        sd[f"{p}.attn.in_proj_bias"] = init.normal((3 * width,), 0.02)
        sd[f"{p}.attn.out_proj.weight"] = init.normal((width, width), proj_std)
        sd[f"{p}.attn.out_proj.bias"] = init.normal((width,), 0.02)
        _layer_norm(sd, f"{p}.ln_1", width, init)
        sd[f"{p}.mlp.c_fc.weight"] = init.normal((4 * width, width), fc_std)
        sd[f"{p}.mlp.c_fc.bias"] = init.normal((4 * width,), 0.02)
        sd[f"{p}.mlp.c_proj.weight"] = init.normal((width, 4 * width), proj_std)
        sd[f"{p}.mlp.c_proj.bias"] = init.normal((width,), 0.02)
        _layer_norm(sd, f"{p}.ln_2", width, init)


def _visual_vit(sd: dict, cfg: CLIPConfig, init: _Init) -> None:
    w, p = cfg.vision_width, cfg.vision_patch_size
    sd["visual.class_embedding"] = init.normal((w,), w ** -0.5)
    sd["visual.positional_embedding"] = init.normal((cfg.grid_size ** 2 + 1, w), w ** -0.5)
    sd["visual.proj"] = init.normal((w, cfg.embed_dim), w ** -0.5)
    _conv(sd, "visual.conv1.weight", w, 3, p, init, gain=1.0)
    _layer_norm(sd, "visual.ln_pre", w, init)
    _transformer(sd, "visual.transformer", w, cfg.vision_layers, init)
    _layer_norm(sd, "visual.ln_post", w, init)


def _visual_resnet(sd: dict, cfg: CLIPConfig, init: _Init) -> None:
    w = cfg.vision_width
    # Stem: three 3x3 convolutions (the first with stride 2), then a 2x2 average pool.
    _conv(sd, "visual.conv1.weight", w // 2, 3, 3, init)
    _batch_norm(sd, "visual.bn1", w // 2, init)
    _conv(sd, "visual.conv2.weight", w // 2, w // 2, 3, init)
    _batch_norm(sd, "visual.bn2", w // 2, init)
    _conv(sd, "visual.conv3.weight", w, w // 2, 3, init)
    _batch_norm(sd, "visual.bn3", w, init)
    inplanes = w
    for stage, blocks in enumerate(cfg.vision_layers, start=1):
        planes = w * 2 ** (stage - 1)
        stride = 1 if stage == 1 else 2
        for j in range(blocks):
            p = f"visual.layer{stage}.{j}"
            _conv(sd, f"{p}.conv1.weight", planes, inplanes, 1, init)
            _batch_norm(sd, f"{p}.bn1", planes, init)
            _conv(sd, f"{p}.conv2.weight", planes, planes, 3, init)
            _batch_norm(sd, f"{p}.bn2", planes, init)
            _conv(sd, f"{p}.conv3.weight", planes * 4, planes, 1, init)
            # Residual branches start small (OpenAI zero-initialises this scale) so deep stacks stay finite.
            _batch_norm(sd, f"{p}.bn3", planes * 4, init, scale=0.25)
            # Only a block's first unit changes stride or channel count (OpenAI's Bottleneck rule).
            if (stride > 1 and j == 0) or inplanes != planes * 4:
                _conv(sd, f"{p}.downsample.0.weight", planes * 4, inplanes, 1, init, gain=1.0)
                _batch_norm(sd, f"{p}.downsample.1", planes * 4, init)
            inplanes = planes * 4
    c = w * 32
    sd["visual.attnpool.positional_embedding"] = init.normal((cfg.grid_size ** 2 + 1, c), c ** -0.5)
    for name, out in (("k_proj", c), ("q_proj", c), ("v_proj", c), ("c_proj", cfg.embed_dim)):
        sd[f"visual.attnpool.{name}.weight"] = init.normal((out, c), c ** -0.5)
        sd[f"visual.attnpool.{name}.bias"] = init.normal((out,), 0.02)


def random_state_dict(
    config_or_name: Union[str, CLIPConfig] = "tiny-vit",
    seed: int = 0,
    half: bool = False,
    device: Union[str, torch.device] = "cpu",
) -> "OrderedDict[str, Tensor]":
    """A random-weight CLIP state dict with OpenAI's key names, shapes and metadata entries.

    Args:
        config_or_name: a :class:`CLIPConfig` or a name from :func:`clip.configs.list_models`.
        seed: seed of the weights (same seed, same tensors).
        half: store weights in fp16 the way OpenAI's ``convert_weights`` does (convolutions,
            linear layers, packed in-projections, ``text_projection`` and ``visual.proj``);
            embeddings and normalisation layers stay fp32.
        device: where the tensors live. Weights are always drawn on the CPU (identical on every
            machine); ``"meta"`` draws nothing and gives shapes only (cheap for the largest models).

    Returns:
        Ordered dict: text parameters, metadata ints (``input_resolution``, ``context_length``,
        ``vocab_size`` as 0-d int64 tensors, as in OpenAI's archives), ``visual.*``,
        ``transformer.*``, ``token_embedding.weight``, ``ln_final.*``.
    """
    cfg = get_config(config_or_name)
    device = torch.device(device)
    init = _Init(seed, meta=device.type == "meta")
    tw = cfg.transformer_width
    sd: "OrderedDict[str, Tensor]" = OrderedDict()
    sd["positional_embedding"] = init.normal((cfg.context_length, tw), 0.01)
    sd["text_projection"] = init.normal((tw, cfg.embed_dim), tw ** -0.5)
    # Trained CLIP models sit at the clamp value 100 = exp(4.6052).
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    sd["input_resolution"] = torch.tensor(cfg.image_resolution, dtype=torch.long)
    sd["context_length"] = torch.tensor(cfg.context_length, dtype=torch.long)
    sd["vocab_size"] = torch.tensor(cfg.vocab_size, dtype=torch.long)
    if cfg.is_vit:
        _visual_vit(sd, cfg, init)
    else:
        _visual_resnet(sd, cfg, init)
    _transformer(sd, "transformer", tw, cfg.transformer_layers, init)
    sd["token_embedding.weight"] = init.normal((cfg.vocab_size, tw), 0.02)
    _layer_norm(sd, "ln_final", tw, init)
    if half:
        for key, value in sd.items():
            if _is_half_in_openai(key, value):
                sd[key] = value.half()
    if device.type not in ("cpu", "meta"):
        sd = OrderedDict((k, v.to(device)) for k, v in sd.items())
    return sd


def _is_half_in_openai(key: str, value: Tensor) -> bool:
    """Whether OpenAI's ``convert_weights`` casts this entry to fp16 (Conv/Linear layers, projections)."""
    if not value.is_floating_point():
        return False
    if key in ("text_projection", "visual.proj") or ".in_proj_" in key:
        return True
    if not key.endswith((".weight", ".bias")) or key == "token_embedding.weight":
        return False
    module = key.rsplit(".", 2)[-2]
    is_norm = module.startswith(("ln", "bn")) or key.startswith("ln_") or ".downsample.1." in key
    return not is_norm


class _Holder(nn.Module):
    """Plain container: its state dict is exactly the tensors attached to it and its children."""


def _module_tree(state_dict: dict[str, Tensor]) -> nn.Module:
    root = _Holder()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            child = node._modules.get(part)
            if child is None:
                child = _Holder()
                node.add_module(part, child)
            node = child
        if value.is_floating_point() and not leaf.startswith("running_"):
            node.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=False))
        else:
            node.register_buffer(leaf, value.detach().clone())
    return root


def save_checkpoint(path: Union[str, os.PathLike], state_dict: dict[str, Tensor], fmt: str = "state_dict") -> str:
    """Write a CLIP checkpoint atomically (:func:`clip.fileio.atomic_write`).

    Args:
        path: output file.
        state_dict: OpenAI-format state dict (e.g. from :func:`random_state_dict`).
        fmt: ``"state_dict"`` (``torch.save`` of the dict) or ``"torchscript"`` (a scripted module
            whose ``state_dict()`` has the same keys, like OpenAI's released archives).

    Returns:
        The path written.

    Raises:
        ValueError: unknown ``fmt`` or a key that is not a valid module path.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
    bad = [k for k in state_dict if not all(part and "/" not in part for part in k.split("."))]
    if bad:
        raise ValueError(f"state dict keys are not dotted module paths: {bad[:5]}")
    path = os.fspath(path)

    def write(f) -> None:
        if fmt == "state_dict":
            torch.save(OrderedDict(state_dict), f)
        else:
            with warnings.catch_warnings():
                # torch.jit is deprecated in favour of torch.export, but it is the format OpenAI ships.
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(torch.jit.script(_module_tree(state_dict)), f)

    atomic_write(path, write)
    return path


def make_tiny_checkpoint(
    path: Union[str, os.PathLike],
    like: Union[str, CLIPConfig] = "tiny-vit",
    fmt: str = "state_dict",
    seed: int = 0,
    half: bool = False,
) -> str:
    """Write a random-weight checkpoint of architecture ``like`` to ``path`` (see :func:`save_checkpoint`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
    return save_checkpoint(path, random_state_dict(like, seed=seed, half=half), fmt=fmt)


def create_tiny_model(name: Union[str, CLIPConfig] = "tiny-vit", seed: int = 0, half: bool = False) -> "nn.Module":
    """A random-weight CLIP model of architecture ``name`` (in eval mode, on the CPU).

    Built through :func:`clip.model.build_model` from :func:`random_state_dict`, i.e. exactly what
    loading a checkpoint written by :func:`make_tiny_checkpoint` gives (fp32 weights; ``half``
    then casts them to fp16 as :func:`clip.model.convert_weights_fp16` does on a GPU).
    """
    from .model import build_model, convert_weights_fp16

    model = build_model(random_state_dict(name, seed=seed))
    if half:
        convert_weights_fp16(model)
    return model.eval()
