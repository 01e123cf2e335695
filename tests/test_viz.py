"""OOD-region visualisation: region rule, grids of ViT/ResNet at any resolution, files and errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip
from clip.tiny import make_tiny_checkpoint
from locoop.config import get_cfg_default, merge_cfg
from locoop.data import build_test_transform
from locoop.viz.regions import (SHADE_ALPHA, SHADE_RGB, check_image_file, compute_ood_regions, shade_regions,
                                visualization_path, visualize_ood_regions)

C = 6


@pytest.fixture(scope="module")
def vit(tiny_vit_path):
    return clip.load(tiny_vit_path, device="cpu")[0]


@pytest.fixture(scope="module")
def text():
    return torch.randn(C, 32, generator=torch.Generator().manual_seed(3))


def transform(size):
    cfg = get_cfg_default()
    merge_cfg(cfg, None, "configs/trainers/LoCoOp/vit_b16_ep50.yaml", None, ["INPUT.SIZE", f"({size}, {size})"])
    return build_test_transform(cfg)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    path = root / "imagenet" / "images" / "train" / "n0" / "img_0.JPEG"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(path, format="JPEG")
    return root, path


def test_regions_follow_the_top_k_rule(vit, text):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for label, k in [(0, 1), (2, 3), (5, 6)]:
        r = compute_ood_regions(vit, text, x, label, k)
        with torch.no_grad():
            _, loc = vit.encode_image(x, return_local=True)
            logits = vit.logit_scale.exp() * F.normalize(loc[0], dim=-1) @ F.normalize(text, dim=-1).t()  # [16, C]
            probs = logits.softmax(-1)
        in_topk = (probs.topk(k, dim=-1).indices == label).any(-1)
        assert r.grid == (4, 4)
        np.testing.assert_array_equal(r.ood_mask, (~in_topk).numpy().reshape(4, 4))
        np.testing.assert_allclose(r.max_softmax, probs.max(-1).values.numpy().reshape(4, 4), rtol=1e-5)
        np.testing.assert_array_equal(r.local_pred, probs.argmax(-1).numpy().reshape(4, 4))
    assert r.ood_mask.sum() == 0  # K = C: the label is always in the top-K
    assert compute_ood_regions(vit, text, x, 0, 1000).top_k == C  # clamped like the loss


@pytest.mark.parametrize("like,size,grid", [("tiny-vit", 32, (4, 4)), ("tiny-vit", 40, (5, 5)),
                                            ("tiny-vit", 36, (4, 4)), ("tiny-rn", 64, (2, 2)),
                                            ("tiny-rn", 96, (3, 3)), ("tiny-vit-p16", 224, (14, 14))])
def test_grid_of_every_architecture_and_resolution(tmp_path_factory, like, size, grid):
    path = tmp_path_factory.getbasetemp() / f"viz-{like}.pt"
    if not path.exists():
        make_tiny_checkpoint(path, like=like, fmt="state_dict", seed=0)
    model = clip.load(str(path), device="cpu")[0]
    txt = torch.randn(C, model.embed_dim, generator=torch.Generator().manual_seed(0))
    r = compute_ood_regions(model, txt, torch.randn(3, size, size), 1, 2)
    assert r.grid == grid and r.ood_mask.shape == grid and r.max_softmax.shape == grid
    assert ((r.max_softmax >= 1.0 / C - 1e-6) & (r.max_softmax <= 1.0)).all()


def test_shade_regions_cells_and_uncovered_border():
    img = np.full((10, 12, 3), 100, dtype=np.uint8)
    mask = np.array([[True, False], [False, True]])
    out = shade_regions(img, mask)  # cells spread over the image: 5 x 6 px
    grey = np.round((1 - SHADE_ALPHA) * 100 + SHADE_ALPHA * np.array(SHADE_RGB)).astype(np.uint8)
    assert (out[:5, :6] == grey).all() and (out[5:, 6:] == grey).all()
    assert (out[:5, 6:] == 100).all() and (out[5:, :6] == 100).all()
    # ViT patches of 4 px on a 10 x 12 image: a 2 x 2 grid covers 8 x 8; the rest stays as it was.
    out = shade_regions(img, np.ones((2, 2), bool), cell_px=(4, 4))
    assert (out[:8, :8] == grey).all() and (out[8:] == 100).all() and (out[:, 8:] == 100).all()
    assert (img == 100).all()  # input untouched


def test_visualization_path_mirrors_the_image_path(tmp_path):
    assert visualization_path("/data/imagenet/images/train/n01/x.JPEG", tmp_path, "/data") == \
        tmp_path / "visualization/imagenet/images/train/n01/x.png"
    assert visualization_path("/elsewhere/pics/y.jpg", tmp_path, "/data") == \
        tmp_path / "visualization/elsewhere/pics/y.png"
    assert visualization_path("/elsewhere/z.png", tmp_path, None) == tmp_path / "visualization/elsewhere/z.png"


def test_visualize_writes_pngs_of_the_input_size(tmp_path, vit, text, image_file):
    root, path = image_file
    r = visualize_ood_regions(vit, text, path, 3, transform(40), tmp_path, top_k=2, root=root,
                              classnames=[f"c{i}" for i in range(C)])
    assert r.files["image"] == tmp_path / "visualization/imagenet/images/train/n0/img_0.png"
    with Image.open(r.files["image"]) as im:
        assert im.size == (40, 40) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert r.files["figure"].name == "img_0_regions.png" and r.files["figure"].stat().st_size > 1000
    # Shaded cells (8 px patches) are pulled towards grey; the picture is otherwise the resized crop.
    ys, xs = np.nonzero(r.ood_mask)
    if len(ys):
        cell = pixels[ys[0] * 8:(ys[0] + 1) * 8, xs[0] * 8:(xs[0] + 1) * 8].astype(float)
        assert np.abs(cell - np.array(SHADE_RGB)).max() <= (1 - SHADE_ALPHA) * 255 + 1


def test_bad_inputs(tmp_path, vit, text, image_file):
    root, path = image_file
    with pytest.raises(FileNotFoundError, match="image not found"):
        check_image_file(tmp_path / "nope.jpg")
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        check_image_file(fake)
    with pytest.raises(FileNotFoundError, match="is a folder"):
        check_image_file(tmp_path)
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        visualize_ood_regions(vit, text, path, 6, transform(32), tmp_path, top_k=2)
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        compute_ood_regions(vit, text, torch.zeros(3, 32, 32), -1, 2)
    assert not Path(tmp_path / "visualization").exists()
