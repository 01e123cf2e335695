"""Hugging Face ``CLIPModel`` snapshots <-> OpenAI-format CLIP state dicts.

A snapshot is a directory with ``config.json`` and the weights as ``model.safetensors``,
``pytorch_model.bin`` or sharded files listed in ``model.safetensors.index.json`` /
``pytorch_model.bin.index.json`` (what ``CLIPModel.save_pretrained`` writes and what the Hub cache
holds for ``openai/clip-vit-base-patch16`` and friends). Only what OpenAI's architecture can express
is accepted: ViT image tower, QuickGELU, LayerNorm eps 1e-5, MLP ratio 4, 64-wide attention heads.

Key mapping (HF -> OpenAI), per tower: ``embeddings.*`` -> embeddings, ``encoder.layers.N`` ->
``resblocks.N`` with ``self_attn.{q,k,v}_proj`` packed into ``attn.in_proj_{weight,bias}``,
``layer_norm1/2`` -> ``ln_1/2``, ``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj``; ``pre_layrnorm`` (sic) /
``post_layernorm`` -> ``ln_pre/ln_post``; ``text_model.final_layer_norm`` -> ``ln_final``;
projections are ``nn.Linear`` weights in HF, i.e. OpenAI's matrices transposed.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any, Union

import torch

Tensor = torch.Tensor

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Defaults of transformers' CLIPTextConfig / CLIPVisionConfig for fields a config.json may omit.
_TEXT_DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_attention_heads": 8}
_VISION_DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_attention_heads": 12}
# Per-block parameter names: HF suffix -> OpenAI suffix (q/k/v handled separately).
_BLOCK_MAP = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
}
_TOP_MAP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_TOWERS = (("text_model.encoder.layers.", "transformer.resblocks."),
           ("vision_model.encoder.layers.", "visual.transformer.resblocks."))
_IGNORED_SUFFIXES = (".position_ids",)  # index buffers of older transformers versions


def _find_weights(path: str) -> list[str]:
    """Weight files of a snapshot directory (one file, or the shards named by an index)."""
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    for name in _INDEX_FILES:
        index_path = os.path.join(path, name)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
            return [os.path.join(path, shard) for shard in sorted(set(weight_map.values()))]
    return []


def is_hf_snapshot(path: Union[str, os.PathLike]) -> bool:
    """True if ``path`` is a directory with ``config.json`` and model weights."""
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and bool(_find_weights(path))


def read_hf_config(path: Union[str, os.PathLike]) -> dict:
    """``config.json`` of a snapshot directory, with legacy ``*_config_dict`` entries merged in."""
    config_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found; a Hugging Face snapshot directory needs config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    for tower in ("text", "vision"):
        # Old CLIP configs keep overrides in text_config_dict / vision_config_dict; those win.
        merged = dict(config.get(f"{tower}_config") or {})
        merged.update(config.get(f"{tower}_config_dict") or {})
        config[f"{tower}_config"] = merged
    return config


def check_hf_config(config: dict) -> None:
    """Reject configs that OpenAI's CLIP architecture (and so our model) cannot represent.

    Raises:
        ValueError: naming the unsupported setting.
    """
    model_type = config.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(f"config.json has model_type {model_type!r}; only Hugging Face 'clip' (CLIPModel) "
                         "snapshots can be converted to OpenAI's CLIP")
    if not config.get("text_config") and not config.get("vision_config") and "hidden_size" in config:
        raise ValueError("config.json describes a single tower (CLIPTextModel/CLIPVisionModel); "
                         "a full CLIPModel snapshot with text_config and vision_config is needed")
    for tower, defaults in (("text", _TEXT_DEFAULTS), ("vision", _VISION_DEFAULTS)):
        sub = {**defaults, **config.get(f"{tower}_config", {})}
        act = sub["hidden_act"]
        if act != "quick_gelu":
            raise ValueError(f"{tower}_config.hidden_act is {act!r}; OpenAI's CLIP (and this model) uses "
                             "'quick_gelu', so this snapshot (e.g. an OpenCLIP/LAION model with exact GELU) "
                             "cannot be loaded without changing its outputs")
        if abs(float(sub["layer_norm_eps"]) - 1e-5) > 1e-12:
            raise ValueError(f"{tower}_config.layer_norm_eps is {sub['layer_norm_eps']}; only 1e-5 is supported")
        width = sub.get("hidden_size")
        if width is not None:
            if width % 64 or sub["num_attention_heads"] != width // 64:
                raise ValueError(f"{tower}_config has {sub['num_attention_heads']} heads for width {width}; "
                                 f"OpenAI-format checkpoints imply width // 64 = {width // 64} heads")
            inter = sub.get("intermediate_size")
            if inter is not None and inter != 4 * width:
                raise ValueError(f"{tower}_config.intermediate_size is {inter}; OpenAI's CLIP uses 4 * hidden_size "
                                 f"= {4 * width}")


def convert_hf_state_dict(hf_sd: dict[str, Tensor], config: dict | None = None) -> "OrderedDict[str, Tensor]":
    """Convert a Hugging Face ``CLIPModel`` state dict to OpenAI's format.

    Args:
        hf_sd: HF keys (``text_model.*``, ``vision_model.*``, projections, ``logit_scale``).
        config: the snapshot's ``config.json`` as a dict, checked with :func:`check_hf_config`.

    Returns:
        OpenAI-format state dict (packed q/k/v, transposed projections).

    Raises:
        ValueError: unsupported config, missing or unknown keys (a ResNet tower, for instance).
    """
    if config is not None:
        check_hf_config(config)
    sd = {k: v for k, v in hf_sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if any(k.startswith("vision_model.embedder") or ".stages." in k for k in sd):
        raise ValueError("the snapshot's vision tower is not a ViT; only ViT CLIP snapshots can be converted")
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    used: set[str] = set()
    for hf_key, oa_key in {**_TOP_MAP, **_TRANSPOSED}.items():
        if hf_key in sd:
            out[oa_key] = sd[hf_key].t().contiguous() if hf_key in _TRANSPOSED else sd[hf_key]
            used.add(hf_key)
    for hf_prefix, oa_prefix in _TOWERS:
        blocks = sorted({int(k[len(hf_prefix):].split(".")[0]) for k in sd if k.startswith(hf_prefix)})
        if blocks != list(range(len(blocks))):
            raise ValueError(f"{hf_prefix}N blocks are not numbered 0..{len(blocks) - 1}: {blocks}")
        for i in blocks:
            hp, op = f"{hf_prefix}{i}.", f"{oa_prefix}{i}."
            for kind in ("weight", "bias"):
                parts = [f"{hp}self_attn.{n}_proj.{kind}" for n in "qkv"]
                missing = [p for p in parts if p not in sd]
                if missing:
                    raise ValueError(f"Hugging Face state dict lacks {missing}")
                out[f"{op}attn.in_proj_{kind}"] = torch.cat([sd[p] for p in parts], dim=0)
                used.update(parts)
            for h, o in _BLOCK_MAP.items():
                if hp + h not in sd:
                    raise ValueError(f"Hugging Face state dict lacks {hp + h}")
                out[op + o] = sd[hp + h]
                used.add(hp + h)
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"Hugging Face state dict has keys with no OpenAI CLIP counterpart: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
    required = set(_TOP_MAP.values()) | set(_TRANSPOSED.values())
    missing = sorted(required - set(out))
    if missing:
        inverse = {v: k for k, v in {**_TOP_MAP, **_TRANSPOSED}.items()}
        raise ValueError(f"Hugging Face state dict lacks {[inverse[m] for m in missing]}; "
                         "a full CLIPModel snapshot (both towers and projections) is needed")
    return out


def load_hf_weights(path: Union[str, os.PathLike]) -> dict[str, Tensor]:
    """Read a snapshot's weights (safetensors, or ``pytorch_model.bin`` with ``weights_only=True``).

    Raises:
        FileNotFoundError: no weight file in the directory.
    """
    path = os.fspath(path)
    files = _find_weights(path)
    if not files:
        raise FileNotFoundError(f"no weights in {path}: expected one of {_WEIGHT_FILES + _INDEX_FILES}")
    sd: dict[str, Tensor] = {}
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"weight shard {file} listed in the index is missing")
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd.update(load_file(file, device="cpu"))
        else:
            sd.update(torch.load(file, map_location="cpu", weights_only=True))
    return sd


def load_hf_snapshot(path: Union[str, os.PathLike]) -> "OrderedDict[str, Tensor]":
    """OpenAI-format state dict of a Hugging Face CLIP snapshot directory.

    The config is checked before the weights are read.
    """
    config = read_hf_config(path)
    check_hf_config(config)
    return convert_hf_state_dict(load_hf_weights(path), config)


def openai_to_hf_state_dict(sd: dict[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """Convert an OpenAI-format ViT CLIP state dict to Hugging Face ``CLIPModel`` keys.

    Raises:
        ValueError: a ResNet image tower (``CLIPModel`` has none).
    """
    if "visual.proj" not in sd:
        raise ValueError("only ViT CLIP models can be written as Hugging Face CLIPModel snapshots "
                         "(this state dict has no 'visual.proj', i.e. a ResNet image tower)")
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    inverse_top = {v: k for k, v in _TOP_MAP.items()}
    inverse_transposed = {v: k for k, v in _TRANSPOSED.items()}
    inverse_block = {v: k for k, v in _BLOCK_MAP.items()}
    for key, value in sd.items():
        if key in ("input_resolution", "context_length", "vocab_size"):
            continue
        if key in inverse_top:
            out[inverse_top[key]] = value
        elif key in inverse_transposed:
            out[inverse_transposed[key]] = value.t().contiguous()
        else:
            for hf_prefix, oa_prefix in _TOWERS:
                if key.startswith(oa_prefix):
                    i, rest = key[len(oa_prefix):].split(".", 1)
                    hp = f"{hf_prefix}{i}."
                    if rest.startswith("attn.in_proj_"):
                        kind = rest[len("attn.in_proj_"):]
                        for n, part in zip("qkv", value.chunk(3, dim=0)):
                            out[f"{hp}self_attn.{n}_proj.{kind}"] = part.contiguous()
                    elif rest in inverse_block:
                        out[hp + inverse_block[rest]] = value
                    else:
                        raise ValueError(f"unexpected key {key!r} in an OpenAI CLIP state dict")
                    break
            else:
                raise ValueError(f"unexpected key {key!r} in an OpenAI CLIP state dict")
    return out


def hf_config_dict(sd: dict[str, Tensor]) -> dict[str, Any]:
    """``config.json`` contents of a Hugging Face ``CLIPModel`` matching an OpenAI-format ViT state dict."""
    if "visual.proj" not in sd:
        raise ValueError("only ViT CLIP models have a Hugging Face CLIPModel config")

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    text_width = sd["ln_final.weight"].shape[0]
    vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    embed_dim = sd["text_projection"].shape[1]
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_attention_heads": text_width // 64,
            "num_hidden_layers": count("transformer.resblocks."),
            "max_position_embeddings": sd["positional_embedding"].shape[0],
            "vocab_size": sd["token_embedding.weight"].shape[0],
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision_width,
            "intermediate_size": 4 * vision_width,
            "num_attention_heads": vision_width // 64,
            "num_hidden_layers": count("visual.transformer.resblocks."),
            "image_size": grid * patch,
            "patch_size": patch,
            "num_channels": 3,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": embed_dim,
        },
    }


def save_hf_snapshot(sd: dict[str, Tensor], path: Union[str, os.PathLike], safe_serialization: bool = True) -> str:
    """Write an OpenAI-format ViT state dict as a Hugging Face CLIP snapshot directory.

    Args:
        sd: OpenAI-format state dict.
        path: directory to create (or reuse).
        safe_serialization: ``model.safetensors`` if True, else ``pytorch_model.bin``.

    Returns:
        The directory path.
    """
    path = os.fspath(path)
    config = hf_config_dict(sd)
    hf_sd = openai_to_hf_state_dict(sd)
    os.makedirs(path, exist_ok=True)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in hf_sd.items()}, os.path.join(path, "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        torch.save(dict(hf_sd), os.path.join(path, "pytorch_model.bin"))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return path
