"""CLIP (ViT and ModifiedResNet) returning global *and* local features.

The architecture is OpenAI's, rebuilt from an OpenAI-format state dict. Two deliberate
differences in the module layout:

* attention uses separate ``q_proj/k_proj/v_proj/out_proj`` :class:`torch.nn.Linear` layers
  (OpenAI's packed ``in_proj_weight`` is split on load and packed again by
  :meth:`CLIP.openai_state_dict`), computed with ``scaled_dot_product_attention``;
* the final projections ``visual.proj`` and ``text_projection`` are bias-free ``nn.Linear``
  layers (their weight is OpenAI's matrix transposed).

So every weight matrix SeTAR edits or a LoRA library targets is one ``nn.Linear``, and the
local-feature path runs through the very same modules.

Local features (LoCoOp; docs/ARCHITECTURE.md, "Where each idea lives"). ViT: in the *last* block only, the "value
path" ``y = x + out_proj(v_proj(ln_1(x))); y = y + mlp(ln_2(y))`` is applied to the patch
tokens of the block input, then ``ln_post`` and the projection. ModifiedResNet: each
position of the final feature map through the attention pool's ``v_proj`` then ``c_proj``.

Block-level access (used by SeTAR's prefix cache, which reruns only the blocks above an edited
one): :class:`CLIP` exposes each tower as stem -> blocks ``start..end`` -> finish (with local
features, optionally stopping before the final projection) -> project, for the image tower
(``visual_*``) and the text tower (``text_*``). The encoders themselves are built from the same
methods, so a cached prefix plus ``*_finish`` gives exactly what ``encode_*`` gives.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (weights stay fp32 when the rest is fp16), as OpenAI's."""

    def forward(self, x: Tensor) -> Tensor:
        orig = x.dtype
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(orig)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by the number of heads {heads}")
        self.num_heads = heads
        self.head_dim = width // heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def split_heads(self, x: Tensor) -> Tensor:
        """``[B, N, W] -> [B, H, N, W/H]``."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """``[B, H, N, W/H] -> [B, N, W]``."""
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)

    def attend(self, q_in: Tensor, kv_in: Tensor, attn_mask: Optional[Tensor] = None,
               is_causal: bool = False) -> tuple[Tensor, Tensor]:
        """Attention of queries from ``q_in`` over keys/values from ``kv_in``.

        Returns:
            ``(output after out_proj, values [B, N_kv, W] before the head split)``; the values
            are returned so the LoCoOp value path can reuse them instead of recomputing.
        """
        v = self.v_proj(kv_in)
        o = F.scaled_dot_product_attention(
            self.split_heads(self.q_proj(q_in)), self.split_heads(self.k_proj(kv_in)), self.split_heads(v),
            attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(self.merge_heads(o)), v

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        return self.attend(x, x, attn_mask, is_causal)[0]


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))

    def forward(self, x: Tensor, is_causal: bool = False, attn_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))

    def value_path(self, x: Tensor) -> Tensor:
        """LoCoOp's local path: the block with attention replaced by its value projection."""
        y = x + self.attn.out_proj(self.attn.v_proj(self.ln_1(x)))
        return y + self.mlp(self.ln_2(y))

    def forward_cls_and_local(self, x: Tensor, return_local: bool) -> tuple[Tensor, Optional[Tensor]]:
        """The last ViT block, computing only what the outputs need.

        The CLS output needs the CLS query alone (patch outputs of the last block are never
        used), and the value path reuses the values the attention already computed, so local
        features cost no more than a normal block.

        Returns:
            ``(cls [B, 1, W], value-path patch tokens [B, N-1, W] or None)``.
        """
        h = self.ln_1(x)
        o, v = self.attn.attend(h[:, :1], h)
        cls = x[:, :1] + o
        # The CLS MLP runs on the CLS row alone in both cases: a matmul over [B, 1, W] and one over
        # [B, N, W] may round differently, and the global feature must not depend on return_local.
        cls = cls + self.mlp(self.ln_2(cls))
        if not return_local:
            return cls, None
        y = x[:, 1:] + self.attn.out_proj(v[:, 1:])
        return cls, y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.heads = heads
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor, is_causal: bool = False, start: int = 0, end: Optional[int] = None) -> Tensor:
        """Run blocks ``start .. end-1`` (all by default) on batch-first tokens."""
        for block in self.resblocks[start:end]:
            x = block(x, is_causal=is_causal)
        return x


def resize_pos_embed(pos: Tensor, grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """Bicubically resize a ``[prefix + g*g, W]`` positional embedding to another grid."""
    old = pos.shape[0] - num_prefix
    g = int(round(math.sqrt(old)))
    if (g, g) == tuple(grid):
        return pos
    prefix, body = pos[:num_prefix], pos[num_prefix:]
    body = body.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    body = F.interpolate(body, size=grid, mode="bicubic", align_corners=False)
    body = body.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([prefix, body], dim=0)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Linear(width, output_dim, bias=False)

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return image_hw[0] // self.patch_size, image_hw[1] // self.patch_size

    def stem(self, images: Tensor) -> Tensor:
        """Patch embedding + CLS + positional embedding + ln_pre: ``[B, 1 + N, W]``."""
        x = self.conv1(images.to(self.conv1.weight.dtype))
        b, w, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, w)
        pos = resize_pos_embed(self.positional_embedding, (gh, gw)).to(x.dtype)
        return self.ln_pre(torch.cat([cls, x], dim=1) + pos)

    def head(self, x: Tensor) -> Tensor:
        return self.proj(self.ln_post(x))

    def forward_from(self, x: Tensor, start: int = 0, return_local: bool = False, project: bool = True
                     ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Finish the forward pass from the hidden state ``x`` entering block ``start``.

        Args:
            x: ``[B, 1 + N, W]`` hidden state entering block ``start``.
            start: first block to run (``0 .. layers - 1``).
            return_local: also return the patch (local) features.
            project: False stops after ``ln_post`` (features before ``proj``).
        """
        last = self.transformer.layers - 1
        if not 0 <= start <= last:
            raise ValueError(f"start block {start} outside 0..{last}")
        x = self.transformer(x, start=start, end=last)
        cls, local = self.transformer.resblocks[last].forward_cls_and_local(x, return_local)
        out = self.head if project else self.ln_post
        glob = out(cls[:, 0])
        if not return_local:
            return glob
        return glob, out(local)

    def forward(self, images: Tensor, return_local: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        return self.forward_from(self.stem(images), 0, return_local)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # All convolutions have stride 1; downsampling is an avgpool after conv2 (OpenAI's anti-aliasing).
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling with the mean token as query; also yields per-position local features."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: Optional[int] = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: Tensor, return_local: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        seq = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        seq = seq + resize_pos_embed(self.positional_embedding, (h, w)).to(seq.dtype)
        heads, d = self.num_heads, c // self.num_heads
        q = self.q_proj(seq[:, :1]).view(b, 1, heads, d).transpose(1, 2)
        k = self.k_proj(seq).view(b, -1, heads, d).transpose(1, 2)
        v = self.v_proj(seq).view(b, -1, heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c)
        glob = self.c_proj(o)
        if not return_local:
            return glob
        # Local features: positions without the positional embedding, value then output projection.
        return glob, self.c_proj(self.v_proj(tokens))


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem, anti-aliased strided convs, attention pooling."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int,
                 input_resolution: int = 224, width: int = 64):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.patch_size = 32  # total stride, so grid = resolution // 32 as for a ViT
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return image_hw[0] // 32, image_hw[1] // 32

    def forward(self, images: Tensor, return_local: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        x = images.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x, return_local)


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int,
                 vision_layers: Union[int, tuple[int, int, int, int]], vision_width: int,
                 vision_patch_size: Optional[int], context_length: int, vocab_size: int,
                 transformer_width: int, transformer_heads: int, transformer_layers: int):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(tuple(vision_layers), embed_dim, vision_width * 32 // 64,
                                         image_resolution, vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Linear(transformer_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.positional_embedding, std=0.01)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    # ----------------------------------------------------------------- image
    def encode_image(self, images: Tensor, return_local: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Global image features ``[B, D]``, or ``(global [B, D], local [B, N_patches, D])``."""
        return self.visual(images.to(self.dtype), return_local=return_local)

    # ------------------------------------------------------------------ text
    # Prompts per length bucket; below two buckets' worth, one truncation is cheaper than sorting.
    TEXT_BUCKET_SIZE = 128
    TEXT_MAX_BUCKETS = 4

    def encode_text(self, tokens: Tensor) -> Tensor:
        """EOT features ``[B, D]`` of tokenized text.

        With a causal mask, tokens after a sequence's EOT cannot influence it, so sequences are
        cut after their EOT: the same features as the full context, for less work (see
        :meth:`encode_text_embeddings`).
        """
        return self.encode_text_embeddings(self.token_embedding(tokens), tokens.argmax(dim=-1))

    def encode_text_embeddings(self, x: Tensor, eot_idx: Tensor) -> Tensor:
        """EOT features from token embeddings ``[B, L, W]`` (no positional embedding added yet).

        Prompt learners build the embeddings themselves. Every sequence is cut after the
        longest EOT of its group: large batches are sorted by EOT position and split into a few
        equal-count buckets, each cut after its own longest EOT, so a few long class names do not
        make every prompt pay for their length. Exact: causal attention never looks past a
        sequence's EOT.
        """
        n = x.shape[0]
        n_buckets = min(self.TEXT_MAX_BUCKETS, n // self.TEXT_BUCKET_SIZE)
        if n_buckets <= 1:
            return self._encode_truncated(x, eot_idx)
        order = eot_idx.argsort()
        parts = [self._encode_truncated(x[idx], eot_idx[idx]) for idx in order.tensor_split(n_buckets)]
        return torch.cat(parts)[order.argsort()]

    def _encode_truncated(self, x: Tensor, eot_idx: Tensor) -> Tensor:
        return self.text_finish(self.text_stem(x, eot_idx), 0, eot_idx)

    # ------------------------------------------------------- block-level access: text tower
    @property
    def num_text_blocks(self) -> int:
        return self.transformer.layers

    def text_stem(self, x: Tensor, eot_idx: Tensor) -> Tensor:
        """Hidden state entering text block 0: token embeddings ``[B, L, W]`` cut after the
        longest EOT, plus the positional embedding, in the model dtype."""
        length = int(eot_idx.max()) + 1
        return x[:, :length].to(self.dtype) + self.positional_embedding[:length].to(self.dtype)

    def text_blocks(self, h: Tensor, start: int, end: Optional[int]) -> Tensor:
        """Run text blocks ``start .. end-1`` (causal) on the hidden state ``h``."""
        return self.transformer(h, is_causal=True, start=start, end=end)

    def text_finish(self, h: Tensor, start: int, eot_idx: Tensor, project: bool = True) -> Tensor:
        """EOT features from the hidden state ``h`` entering text block ``start``.

        Args:
            project: False stops after ``ln_final`` (features before ``text_projection``).
        """
        h = self.text_blocks(h, start, None)
        eot = self.ln_final(h[torch.arange(h.shape[0], device=h.device), eot_idx])
        return self.text_projection(eot) if project else eot

    def text_project(self, x: Tensor) -> Tensor:
        """The text tower's final projection of ``ln_final`` features."""
        return self.text_projection(x)

    # ------------------------------------------------------ block-level access: image tower
    @property
    def num_visual_blocks(self) -> int:
        """Transformer blocks of the image tower; 0 for a ModifiedResNet."""
        return self.visual.transformer.layers if isinstance(self.visual, VisionTransformer) else 0

    def _vit(self) -> "VisionTransformer":
        if not isinstance(self.visual, VisionTransformer):
            raise ValueError(f"the image tower is a {type(self.visual).__name__}, which has no transformer blocks; "
                             "block-level access needs a ViT image tower")
        return self.visual

    def visual_stem(self, images: Tensor) -> Tensor:
        """Hidden state entering image block 0 (patch embedding, CLS, positions, ln_pre)."""
        return self._vit().stem(images.to(self.dtype))

    def visual_blocks(self, x: Tensor, start: int, end: Optional[int]) -> Tensor:
        """Run image blocks ``start .. end-1`` on the hidden state ``x``."""
        return self._vit().transformer(x, start=start, end=end)

    def visual_finish(self, x: Tensor, start: int, project: bool = True) -> tuple[Tensor, Tensor]:
        """``(global [B, D], local [B, N, D])`` from the hidden state entering image block ``start``.

        Args:
            project: False stops after ``ln_post`` (features before ``visual.proj``).
        """
        return self._vit().forward_from(x, start, return_local=True, project=project)

    def visual_project(self, x: Tensor) -> Tensor:
        """The image tower's final projection of ``ln_post`` features."""
        return self._vit().proj(x)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()

    # ---------------------------------------------------------------- export
    def openai_state_dict(self) -> dict[str, Tensor]:
        """The weights with OpenAI's key names and layouts (packed in-projection, transposed projections)."""
        return to_openai_state_dict(self.state_dict())


_META_KEYS = ("input_resolution", "context_length", "vocab_size")
_QKV = ("q_proj", "k_proj", "v_proj")


def to_openai_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert our internal state dict to OpenAI's layout."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in ("visual.proj.weight", "text_projection.weight"):
            out[key[: -len(".weight")]] = value.t().contiguous()
        elif ".attn.q_proj." in key and not key.startswith("visual.attnpool"):
            prefix, kind = key.split(".attn.q_proj.")
            parts = [sd[f"{prefix}.attn.{p}.{kind}"] for p in _QKV]
            out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        elif (".attn.k_proj." in key or ".attn.v_proj." in key) and not key.startswith("visual.attnpool"):
            continue
        else:
            out[key] = value
    return out


def from_openai_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert an OpenAI-format state dict to our internal layout (metadata keys dropped)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _META_KEYS:
            continue
        if key in ("visual.proj", "text_projection"):
            out[key + ".weight"] = value.t().contiguous()
        elif key.endswith(".attn.in_proj_weight") or key.endswith(".attn.in_proj_bias"):
            prefix, kind = key.rsplit(".attn.in_proj_", 1)
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}.attn.{name}.{kind}"] = part.contiguous()
        else:
            out[key] = value
    return out


def _count_blocks(sd: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def infer_architecture(sd: dict[str, Tensor]) -> dict:
    """Infer CLIP's constructor arguments from an OpenAI-format state dict's shapes."""
    try:
        if "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            layers: Union[int, tuple] = _count_blocks(sd, "visual.transformer.resblocks.")
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            resolution = patch * grid
        else:
            layers = tuple(_count_blocks(sd, f"visual.layer{b}.") for b in (1, 2, 3, 4))
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            patch = None
            resolution = grid * 32
        text_width = sd["ln_final.weight"].shape[0]
        return dict(
            embed_dim=sd["text_projection"].shape[1], image_resolution=resolution, vision_layers=layers,
            vision_width=width, vision_patch_size=patch, context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=text_width,
            transformer_heads=text_width // 64, transformer_layers=_count_blocks(sd, "transformer.resblocks."))
    except KeyError as e:
        raise ValueError(
            f"state dict lacks {e.args[0]!r}, needed to infer the CLIP architecture; expected a CLIP "
            "checkpoint with OpenAI's key names (e.g. 'visual.conv1.weight', 'text_projection')") from None


def build_model(state_dict: dict[str, Tensor]) -> CLIP:
    """Build a CLIP model (fp32, eval mode) from an OpenAI-format state dict.

    Raises:
        ValueError: naming missing or unexpected keys, or keys whose shapes do not match.
    """
    sd = {k: v for k, v in state_dict.items()}
    model = CLIP(**infer_architecture(sd))
    expected = model.openai_state_dict()
    given = {k: v for k, v in sd.items() if k not in _META_KEYS}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "state dict does not match the CLIP architecture inferred from it: "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    bad = [f"{k}: {tuple(given[k].shape)} vs expected {tuple(v.shape)}"
           for k, v in expected.items() if given[k].shape != v.shape]
    if bad:
        raise ValueError("state dict has tensors of the wrong shape: " + "; ".join(bad[:10]))
    internal = {k: v.float() if v.is_floating_point() else v for k, v in from_openai_state_dict(given).items()}
    model.load_state_dict(internal, strict=True)
    return model.eval()


def convert_weights_fp16(model: nn.Module) -> nn.Module:
    """Cast weights to fp16 as CLIP ships them on GPU; LayerNorm and BatchNorm stay fp32."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.half()
    for name in ("class_embedding", "positional_embedding"):
        for module in (model, getattr(model, "visual", None), getattr(getattr(model, "visual", None), "attnpool", None)):
            p = getattr(module, name, None) if module is not None else None
            if isinstance(p, nn.Parameter):
                p.data = p.data.half()
    return model
