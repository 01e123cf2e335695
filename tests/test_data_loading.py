"""Image reading, corrupt-image handling, transforms by Dassl name, loaders and DataManager batches."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from locoop.config import get_cfg_default
from locoop.data import (CorruptImageWarning, DataManager, Datum, UnreadableImageError, build_data_loader,
                         build_transform, read_image)
from locoop.data.image_io import DatasetWrapper
from locoop.data.synthetic import corrupt_image, make_imagenet_like
from locoop.data.transforms import RandomTranslation, build_test_transform

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def _cfg(root="", transforms=("random_resized_crop", "random_flip", "normalize"), size=(16, 16)):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NAME = "ImageNet"
    cfg.DATASET.NUM_SHOTS = 2
    cfg.SEED = 1
    cfg.VERBOSE = False
    cfg.INPUT.SIZE = size
    cfg.INPUT.INTERPOLATION = "bicubic"
    cfg.INPUT.TRANSFORMS = list(transforms)
    cfg.INPUT.PIXEL_MEAN = MEAN
    cfg.INPUT.PIXEL_STD = STD
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 4
    cfg.DATALOADER.TEST.BATCH_SIZE = 3
    return cfg


# ---------------------------------------------------------------- read_image


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 100, (100, 100, 100)),
    ("LA", (100, 7), (100, 100, 100)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, as CLIP's preprocessing
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("RGB", (1, 2, 3), (1, 2, 3)),
])
def test_read_image_converts_modes_to_rgb(tmp_path, mode, value, expected):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (3, 2), value).save(path)
    img = read_image(str(path))
    assert img.mode == "RGB" and img.size == (3, 2)
    assert img.getpixel((1, 1)) == pytest.approx(expected, abs=1)


def test_read_image_palette_and_16bit(tmp_path):
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png")
    assert read_image(str(tmp_path / "p.png")).getpixel((0, 0)) == (200, 100, 50)
    Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert read_image(str(tmp_path / "i16.png")).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["truncate", "garbage", "empty"])
def test_read_image_fails_on_damaged_files(tmp_path, mode):
    path = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    corrupt_image(str(path), mode=mode)
    with pytest.raises((OSError, ValueError, SyntaxError)):
        read_image(str(path))


# ---------------------------------------------------------------- corrupt images in loaders


def _items_with_corrupt(tmp_path, n=5, bad=(1, 3)):
    items = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(path)
        if i in bad:
            corrupt_image(str(path), mode="truncate" if i % 2 else "garbage")
        items.append(Datum(str(path), i, f"c{i}"))
    return items


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_images_skipped_warned_and_counted(tmp_path, workers):
    items = _items_with_corrupt(tmp_path)
    loader = build_data_loader(items, 2, T.ToTensor(), is_train=False, num_workers=workers, seed=0)
    with pytest.warns(CorruptImageWarning, match=r"skipped unreadable image .*1\.jpg"):
        batches = list(loader)
    labels = [lab for b in batches for lab in b["label"].tolist()]
    assert labels == [0, 2, 4]
    assert sorted(p for b in batches for p in b["skipped"]) == [str(tmp_path / "1.jpg"), str(tmp_path / "3.jpg")]
    assert loader.num_skipped == 2 and set(loader.skipped) == {str(tmp_path / "1.jpg"), str(tmp_path / "3.jpg")}


def test_batch_of_only_corrupt_images_is_not_yielded(tmp_path):
    items = _items_with_corrupt(tmp_path, n=3, bad=(0,))
    loader = build_data_loader(items, 1, T.ToTensor(), is_train=False, seed=0)
    with pytest.warns(CorruptImageWarning):
        batches = list(loader)
    assert [b["label"].tolist() for b in batches] == [[1], [2]]
    assert loader.num_skipped == 1


def test_strict_mode_raises_naming_the_file(tmp_path):
    items = _items_with_corrupt(tmp_path, n=3, bad=(2,))
    loader = build_data_loader(items, 3, T.ToTensor(), is_train=False, strict=True, seed=0)
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*2\.jpg.*DATASET.STRICT False"):
        list(loader)


def test_dataset_wrapper_sample_dict(tmp_path):
    items = _items_with_corrupt(tmp_path, n=2, bad=())
    sample = DatasetWrapper(items, T.ToTensor())[1]
    assert set(sample) == {"img", "label", "domain", "impath", "index"}
    assert sample["label"] == 1 and sample["index"] == 1 and sample["impath"] == items[1].impath
    assert sample["img"].shape == (3, 8, 8)
    assert sample["img"][0, 0, 0].item() == pytest.approx(40 / 255, abs=2 / 255)


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError, match="empty list of images"):
        build_data_loader([], 2, None, is_train=True)


# ---------------------------------------------------------------- transforms


def test_test_transform_is_resize_centercrop_tensor_normalize():
    cfg = _cfg(size=(16, 16))
    tfm = build_transform(cfg, is_train=False)
    kinds = [type(t).__name__ for t in tfm.transforms]
    assert kinds == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert tfm.transforms[0].size == 16 and tfm.transforms[0].interpolation.value == "bicubic"
    img = Image.new("RGB", (40, 20), (51, 102, 204))  # constant colour survives resize and crop
    out = tfm(img)
    assert out.shape == (3, 16, 16)
    expected = torch.tensor([(51 / 255 - MEAN[0]) / STD[0], (102 / 255 - MEAN[1]) / STD[1],
                             (204 / 255 - MEAN[2]) / STD[2]])
    assert torch.allclose(out[:, 5, 5], expected, atol=1e-5)


def test_test_transform_crops_the_centre():
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, 8:24] = 255  # the central 16 columns are white
    cfg = _cfg(size=(16, 16))
    cfg.INPUT.INTERPOLATION = "nearest"
    out = build_test_transform(cfg)(Image.fromarray(arr))
    raw = out * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert torch.allclose(raw, torch.ones_like(raw), atol=1e-5)


def test_train_transform_names_and_order():
    cfg = _cfg(transforms=["random_flip", "random_resized_crop", "colorjitter", "randomgrayscale",
                           "gaussian_blur", "normalize"], size=(12, 12))
    cfg.INPUT.RRCROP_SCALE = (0.5, 1.0)
    tfm = build_transform(cfg, is_train=True)
    kinds = [type(t).__name__ for t in tfm.transforms]
    assert kinds == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomGrayscale",
                     "RandomApply", "ToTensor", "Normalize"]
    assert tfm.transforms[0].scale == (0.5, 1.0)
    assert tfm(Image.new("RGB", (30, 20))).shape == (3, 12, 12)


@pytest.mark.parametrize("names, first", [
    (["normalize"], "Resize"),
    (["random_crop"], "RandomCrop"),
    (["center_crop"], "Resize"),
    (["random_translation"], "Resize"),
])
def test_every_train_pipeline_ends_at_input_size(names, first):
    cfg = _cfg(transforms=names, size=(10, 14))
    cfg.INPUT.CROP_PADDING = 2
    tfm = build_transform(cfg, is_train=True)
    assert type(tfm.transforms[0]).__name__ == first
    assert tfm(Image.new("RGB", (25, 17))).shape == (3, 10, 14)


def test_random_translation_crops_from_enlarged_image():
    torch.manual_seed(0)
    tr = RandomTranslation(8, 8, p=1.0)
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8)
    outs = {tuple(np.asarray(tr(Image.fromarray(arr))).ravel()[:3]) for _ in range(20)}
    assert len(outs) > 1 and all(np.asarray(tr(Image.fromarray(arr))).shape == (8, 8) for _ in range(3))
    tr0 = RandomTranslation(8, 8, p=0.0)
    assert np.array_equal(np.asarray(tr0(Image.fromarray(arr))), arr)  # plain resize to the same size


def test_unknown_transform_names_listed():
    with pytest.raises(ValueError, match=r"unknown transform 'random_flipp'.*available: resize, .*random_flip"):
        build_transform(_cfg(transforms=["random_flipp"]), is_train=True)
    with pytest.raises(ValueError, match=r"'cutout' \(a Dassl name\) is not supported"):
        build_transform(_cfg(transforms=["cutout"]), is_train=False)
    cfg = _cfg()
    cfg.INPUT.INTERPOLATION = "lanczos"
    with pytest.raises(ValueError, match=r"INTERPOLATION='lanczos'.*bicubic"):
        build_transform(cfg, is_train=True)


def test_no_transform_only_resizes():
    cfg = _cfg(size=(6, 6))
    cfg.INPUT.NO_TRANSFORM = True
    out = build_transform(cfg, is_train=True)(Image.new("RGB", (12, 9), (255, 0, 0)))
    assert out.shape == (3, 6, 6) and out[0].min().item() == pytest.approx(1.0)


# ---------------------------------------------------------------- DataManager


def test_data_manager_batches_have_dassl_keys(tmp_path, capsys):
    make_imagenet_like(tmp_path, num_classes=3, train_per_class=4, val_per_class=2, image_size=(20, 20))
    dm = DataManager(_cfg(tmp_path))
    assert "# train_x" in capsys.readouterr().out
    assert dm.num_classes == 3 and dm.classnames == dm.dataset.classnames and dm.lab2cname[0] == dm.classnames[0]
    batch = next(iter(dm.train_loader_x))
    assert {"img", "label", "impath", "index", "domain"} <= set(batch)
    assert batch["img"].shape == (4, 3, 16, 16) and batch["label"].dtype == torch.int64
    assert len(dm.train_loader_x) == 1  # 6 few-shot items, batch 4, last incomplete batch dropped
    test_batches = list(dm.test_loader)
    assert [b["index"].tolist() for b in test_batches] == [[0, 1, 2], [3, 4, 5]]  # ordered, nothing dropped
    assert dm.val_loader is not None and dm.skipped == {}


def test_data_manager_seeded_order_is_reproducible(tmp_path):
    make_imagenet_like(tmp_path, num_classes=3, train_per_class=4, val_per_class=1, image_size=(20, 20))
    cfg = _cfg(tmp_path)
    cfg.DATASET.NUM_SHOTS = 4
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 3

    def epoch(c):
        dm = DataManager(c, verbose=False)
        return [(b["index"].tolist(), b["img"].sum().item()) for b in dm.train_loader_x]

    a, b = epoch(cfg), epoch(cfg)
    assert a == b
    cfg2 = cfg.clone()
    cfg2.SEED = 2
    assert [x[0] for x in epoch(cfg2)] != [x[0] for x in a]


def test_data_manager_counts_corrupt_test_images(tmp_path):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=2, val_per_class=2, image_size=(20, 20))
    dm = DataManager(_cfg(tmp_path), verbose=False)
    corrupt_image(dm.dataset.test[1].impath)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        n = sum(len(b["label"]) for b in dm.test_loader)
    assert n == 3 and list(dm.skipped) == [dm.dataset.test[1].impath]
    assert any(issubclass(w.category, CorruptImageWarning) for w in rec)


def test_data_manager_bad_sampler_name(tmp_path):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=2, val_per_class=1, image_size=(20, 20))
    cfg = _cfg(tmp_path)
    cfg.DATALOADER.TRAIN_X.SAMPLER = "RandomDomainSampler"
    with pytest.raises(ValueError, match=r"TRAIN_X.SAMPLER='RandomDomainSampler'.*RandomSampler"):
        DataManager(cfg, verbose=False)


def test_data_manager_eval_only_without_train_folder(tmp_path):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=0, val_per_class=2, image_size=(20, 20))
    dm = DataManager(_cfg(tmp_path), need_train=False, verbose=False)
    assert dm.train_loader_x is None and len(dm.dataset.test) == 4


# ---------------------------------------------------------------- determinism of the loaders


def _aug_items(tmp_path, n=6):
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        items.append(Datum(str(path), i % 2, f"c{i % 2}"))
    return items


def _epochs(loader, n):
    return [[(b["index"].tolist(), b["img"].clone()) for b in loader] for _ in range(n)]


def _same(a, b):
    return all(len(x) == len(y) and all(i == j and torch.equal(u, v) for (i, u), (j, v) in zip(x, y))
               for x, y in zip(a, b))


def test_loader_epochs_do_not_depend_on_workers_or_resume(tmp_path):
    items = _aug_items(tmp_path)
    tfm = T.Compose([T.RandomResizedCrop(8), T.RandomHorizontalFlip(), T.ToTensor()])

    def make(workers):
        return build_data_loader(items, 4, tfm, is_train=True, num_workers=workers, seed=7, drop_last=False)

    ref = _epochs(make(0), 2)
    assert _same(ref, _epochs(make(2), 2))  # same batches and augmentations with worker processes
    assert not _same(ref[:1], ref[1:])  # epochs differ from each other
    resumed = make(0)
    resumed.set_epoch(1)
    assert _same(ref[1:], _epochs(resumed, 1))  # a resumed run gets epoch 1 exactly
    other = build_data_loader(items, 4, tfm, is_train=True, seed=8, drop_last=False)
    assert not _same(ref[:1], _epochs(other, 1))
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        resumed.set_epoch(-1)


def test_loader_leaves_global_generator_alone(tmp_path):
    items = _aug_items(tmp_path, n=4)
    loader = build_data_loader(items, 2, T.Compose([T.RandomResizedCrop(8), T.ToTensor()]), is_train=True, seed=3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(loader)
    assert torch.equal(torch.rand(3), expected)


def test_num_workers_capped_to_available_cpus_with_one_note(tmp_path, monkeypatch, capsys):
    from locoop.data import data_manager as dm

    items = _aug_items(tmp_path)
    monkeypatch.setattr(dm, "available_cpus", lambda: 1)
    monkeypatch.setattr(dm, "_WORKER_NOTE_SHOWN", False)
    loaders = [build_data_loader(items, 2, T.ToTensor(), is_train=False, num_workers=8, seed=0) for _ in range(3)]
    assert [ld.num_workers for ld in loaders] == [1, 1, 1]
    out = capsys.readouterr().out
    assert out.count("DATALOADER.NUM_WORKERS 8 > the 1 CPU(s) available; using 1") == 1
    assert build_data_loader(items, 2, T.ToTensor(), is_train=False, num_workers=0, seed=0).num_workers == 0
