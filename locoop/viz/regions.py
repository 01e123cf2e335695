"""Visualisation of the local regions LoCoOp treats as OOD.

For one image and its label, every local feature (ViT patch or ResNet feature-map cell) gets
class logits ``logit_scale * cos(local feature, text)``. A region is OOD for LoCoOp when the
label is not among its top-K classes (:func:`locoop.trainers.loss.select_ood_patches`, the
rule of the training loss). Two PNG files are written:

* ``<name>.png`` -- the image as the model sees it (test transform: resize, centre crop), the
  OOD regions shaded grey; exactly the model's input size (H x W pixels), like the paper's demo.
  (The reference demo script greys out the complementary cells, those whose top-K *does* contain
  the label; we shade what the loss treats as OOD, as the paper's figures describe.)
* ``<name>_regions.png`` -- a figure with that image and a heat map of the local maximum softmax
  probability (the confidence of each region's best class), with a colour bar.

Grids come from the model (``model.visual.grid_size((H, W))``): 14x14 for ViT-B/16 at 224 px,
7x7 for ViT-B/32 and RN50, and whatever another input resolution gives.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["RegionMap", "compute_ood_regions", "visualization_path", "check_image_file", "shade_regions",
           "visualize_ood_regions", "SHADE_RGB"]

SHADE_RGB = (200, 200, 200)  # the grey of the reference demo
SHADE_ALPHA = 0.8  # how strongly OOD regions are greyed (1 = solid grey)


@dataclass
class RegionMap:
    """Per-region results of one image.

    Attributes:
        grid: (rows, cols) of local features.
        ood_mask: bool ``[rows, cols]``, True where LoCoOp treats the region as OOD.
        max_softmax: float ``[rows, cols]`` local maximum softmax probability.
        local_pred: int ``[rows, cols]`` best class per region.
        global_pred: the image's predicted class (global feature).
        label: the given label; top_k: K used (clamped to the number of classes).
        files: written paths (``image``, ``figure``) once saved.
    """

    grid: Tuple[int, int]
    ood_mask: np.ndarray
    max_softmax: np.ndarray
    local_pred: np.ndarray
    global_pred: int
    label: int
    top_k: int
    files: Dict[str, Path] = field(default_factory=dict)

    @property
    def ood_fraction(self) -> float:
        return float(self.ood_mask.mean())


def _model_grid(clip_model: torch.nn.Module, hw: Tuple[int, int]) -> Tuple[int, int]:
    visual = clip_model.visual
    if hasattr(visual, "grid_size"):
        gh, gw = visual.grid_size(tuple(hw))
        return int(gh), int(gw)
    raise ValueError(f"{type(visual).__name__} has no grid_size(); cannot place local features on the image")


@torch.inference_mode()
def compute_ood_regions(clip_model: torch.nn.Module, text_features: torch.Tensor, image: torch.Tensor,
                        label: int, top_k: int, logit_scale: Optional[float] = None) -> RegionMap:
    """Which regions of one preprocessed image LoCoOp treats as OOD, and their confidence.

    Features and logits come from the CLIP head (:class:`locoop.models.head.CLIPHead`), as in training.

    Args:
        clip_model: CLIP model with ``encode_image(x, return_local=True)`` and ``visual.grid_size``.
        text_features: ``[C, D]`` class text features (normalised here).
        image: ``[3, H, W]`` or ``[1, 3, H, W]`` preprocessed image on the model's device.
        label: class index in ``[0, C)``.
        top_k: K of LoCoOp's rule (``TRAINER.LOCOOP.TOPK``), clamped to C.
        logit_scale: multiplier of the cosine for the softmax (default the model's
            ``logit_scale.exp()``, i.e. the logits the loss sees).

    Raises:
        ValueError: label outside ``[0, C)``, ``top_k < 1``, or a local-feature count that does not
            match the model's grid.
    """
    from locoop.models.head import CLIPHead, l2_normalize
    from locoop.trainers.loss import select_ood_patches

    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
    num_classes = int(text_features.shape[0])
    label = int(label)
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside [0, {num_classes}) for this dataset's {num_classes} classes")
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(int(top_k), num_classes)
    grid = _model_grid(clip_model, (image.shape[-2], image.shape[-1]))
    head = CLIPHead(clip_model)
    glob, local = head.encode_image(image, return_local=True)
    if local.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"the model returned {local.shape[1]} local features but its grid for a "
                         f"{image.shape[-2]}x{image.shape[-1]} input is {grid[0]}x{grid[1]}")
    text = l2_normalize(text_features.detach().to(local.device))
    scale = head.logit_scale if logit_scale is None else logit_scale  # the logits the loss sees by default
    logits_local = head.logits(local, text, scale)  # [1, P, C]
    global_pred = int(head.logits(glob, text, scale).argmax(dim=-1).item())
    mask = select_ood_patches(logits_local, torch.tensor([label], device=local.device), k)[0]
    probs = logits_local[0].softmax(dim=-1)
    conf, pred = probs.max(dim=-1)
    return RegionMap(grid=grid, ood_mask=mask.cpu().numpy().reshape(grid),
                     max_softmax=conf.cpu().numpy().reshape(grid).astype(np.float32),
                     local_pred=pred.cpu().numpy().reshape(grid), global_pred=global_pred, label=label, top_k=k)


def _cell_bounds(size: int, cells: int, cell_px: Optional[float]) -> np.ndarray:
    """Pixel edges of the grid cells along one axis (``cells + 1`` values)."""
    step = float(cell_px) if cell_px else size / cells
    return np.clip(np.round(np.arange(cells + 1) * step).astype(int), 0, size)


def shade_regions(image: np.ndarray, mask: np.ndarray, cell_px: Optional[Tuple[float, float]] = None,
                  color: Tuple[int, int, int] = SHADE_RGB, alpha: float = SHADE_ALPHA) -> np.ndarray:
    """Grey out the grid cells of ``image`` where ``mask`` is True.

    Args:
        image: ``[H, W, 3]`` uint8.
        mask: bool ``[rows, cols]``.
        cell_px: pixel size (height, width) of a cell; None spreads the grid over the image (ViTs
            pass their patch size, since a patch grid may not cover an image that is not a multiple
            of it).
        color: the shade's RGB; alpha: its opacity.

    Returns:
        A shaded copy (uint8).
    """
    h, w = image.shape[:2]
    rows, cols = mask.shape
    ys = _cell_bounds(h, rows, cell_px[0] if cell_px else None)
    xs = _cell_bounds(w, cols, cell_px[1] if cell_px else None)
    out = image.astype(np.float32)
    shade = np.asarray(color, dtype=np.float32)
    for r, c in zip(*np.nonzero(mask)):
        block = out[ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
        block[...] = (1 - alpha) * block + alpha * shade
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def visualization_path(image_path: Union[str, Path], output_dir: Union[str, Path],
                       root: Optional[Union[str, Path]] = None, suffix: str = ".png") -> Path:
    """``<output_dir>/visualization/<image path relative to root>`` with the extension ``suffix``.

    An image outside ``root`` (or without a root) mirrors its absolute path without the leading
    separator (and drive), so two images never map to the same file.
    """
    p = Path(os.path.abspath(os.path.expanduser(str(image_path))))
    rel: Optional[Path] = None
    if root:
        r = Path(os.path.abspath(os.path.expanduser(str(root))))
        try:
            rel = p.relative_to(r)
        except ValueError:
            rel = None
    if rel is None:
        rel = Path(*p.parts[1:]) if p.anchor else p
    return Path(output_dir) / "visualization" / rel.with_suffix(suffix)


def check_image_file(path: Union[str, Path]) -> None:
    """Fail early and clearly when ``path`` is not a readable image.

    Raises:
        FileNotFoundError: no such file (or a folder).
        ValueError: the file is not an image PIL can decode.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(str(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"image not found: {path} (give --image_path the path of an existing image file)")
    if not p.is_file():
        raise FileNotFoundError(f"--image_path {path} is a folder, not an image file")
    try:
        with Image.open(p) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e}); give a JPEG/PNG file") from None


def _display_transform(transform: Callable) -> Callable:
    """The test transform without its normalisation, so the picture shows real colours."""
    import torchvision.transforms as T

    steps = getattr(transform, "transforms", None)
    if steps is None:
        return transform
    return T.Compose([s for s in steps if not isinstance(s, T.Normalize)])


def _save_figure(display: np.ndarray, shaded: np.ndarray, regions: RegionMap, title: str, path: Path,
                 cell_px: Optional[Tuple[float, float]]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = display.shape[:2]
    rows, cols = regions.grid
    ys = _cell_bounds(h, rows, cell_px[0] if cell_px else None)
    xs = _cell_bounds(w, cols, cell_px[1] if cell_px else None)
    fig = Figure(figsize=(9.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.imshow(shaded, interpolation="nearest")
    ax1.set_title(f"OOD regions (label not in top-{regions.top_k}): "
                  f"{int(regions.ood_mask.sum())}/{regions.ood_mask.size}", fontsize=9)
    ax2.imshow(display, interpolation="nearest")
    # The heat map covers exactly the cells the model saw (a ViT grid may leave a border).
    im = ax2.imshow(regions.max_softmax, cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0, interpolation="nearest",
                    extent=(xs[0] - 0.5, xs[-1] - 0.5, ys[-1] - 0.5, ys[0] - 0.5))
    ax2.set_xlim(-0.5, w - 0.5)
    ax2.set_ylim(h - 0.5, -0.5)
    ax2.set_title("local max softmax", fontsize=9)
    fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
    for ax in (ax1, ax2):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    fig.clear()
    return path


def visualize_ood_regions(clip_model: torch.nn.Module, text_features: torch.Tensor, image_path: Union[str, Path],
                          label: int, transform: Callable, output_dir: Union[str, Path], top_k: int,
                          root: Optional[Union[str, Path]] = None, classnames: Optional[Any] = None,
                          device: Optional[Union[str, torch.device]] = None) -> RegionMap:
    """Compute and save the OOD-region picture and the heat-map figure of one image.

    Args:
        clip_model: the (trained) model's CLIP, in eval mode.
        text_features: ``[C, D]`` class text features (e.g. ``trainer.text_features()``).
        image_path: the image file.
        label: its class index in ``[0, C)``.
        transform: the test transform (PIL image -> normalised tensor).
        output_dir: files go to ``<output_dir>/visualization/<path relative to root>``.
        top_k: LoCoOp's K.
        root: the data root the mirrored path is relative to.
        classnames: optional class names for the figure title.
        device: where the model runs (default: the model's device).

    Returns:
        The :class:`RegionMap`, ``files`` filled with ``image`` and ``figure``.

    Raises:
        FileNotFoundError / ValueError: missing or unreadable image, label outside ``[0, C)``.
    """
    from PIL import Image

    from locoop.data.image_io import read_image

    check_image_file(image_path)
    num_classes = int(text_features.shape[0])
    if not 0 <= int(label) < num_classes:
        raise ValueError(f"--label {label} is outside [0, {num_classes}) for this dataset's {num_classes} classes")
    if device is None:
        device = next(clip_model.parameters()).device
    pil = read_image(str(image_path))
    x = transform(pil).to(device)
    regions = compute_ood_regions(clip_model, text_features, x, int(label), top_k)
    display = (_display_transform(transform)(pil).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    patch = getattr(clip_model.visual, "patch_size", None)
    cell_px = (float(patch), float(patch)) if patch else None
    shaded = shade_regions(display, regions.ood_mask, cell_px)

    image_out = visualization_path(image_path, output_dir, root)
    image_out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shaded).save(image_out, format="PNG")
    name = (lambda i: classnames[i] if classnames is not None and 0 <= i < len(classnames) else str(i))
    title = (f"{Path(str(image_path)).name}: label {regions.label} ({name(regions.label)}), "
             f"predicted {regions.global_pred} ({name(regions.global_pred)}), grid {regions.grid[0]}x{regions.grid[1]}")
    fig_out = image_out.with_name(image_out.stem + "_regions.png")
    _save_figure(display, shaded, regions, title, fig_out, cell_px)
    regions.files = {"image": image_out, "figure": fig_out}
    return regions
