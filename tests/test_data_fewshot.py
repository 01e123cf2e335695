"""Few-shot sampling, the split cache (safe format, written once, portable) and class subsampling."""
import os
import pickle
import shutil
import warnings

import pytest
import torch

from locoop.config import get_cfg_default
from locoop.data import Datum, ImageNet, build_dataset
from locoop.data.fewshot import (FewShotWarning, fewshot_split_path, generate_fewshot_dataset, load_fewshot_split,
                                 save_fewshot_split, subsample_classes)
from locoop.data.synthetic import make_imagenet_like


def _items(sizes):
    """Fake items: class c has sizes[c] images."""
    return [Datum(f"/d/c{c}/img{i:03d}.jpg", c, f"class{c}") for c, n in enumerate(sizes) for i in range(n)]


def _cfg(root, shots=2, seed=1):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NAME = "ImageNet"
    cfg.DATASET.NUM_SHOTS = shots
    cfg.SEED = seed
    cfg.VERBOSE = False
    return cfg


def test_k_per_class_deterministic_and_seed_dependent():
    items = _items([10, 10, 10])
    a = generate_fewshot_dataset(items, 3, seed=1)
    b = generate_fewshot_dataset(list(reversed(items)), 3, seed=1)  # listing order must not matter
    c = generate_fewshot_dataset(items, 3, seed=2)
    assert [sum(d.label == k for d in a) for k in range(3)] == [3, 3, 3]
    assert a == b
    assert {d.impath for d in a} != {d.impath for d in c}
    assert len({d.impath for d in a}) == 9  # no duplicates


def test_fewer_images_than_k_uses_all_and_warns_naming_class():
    items = _items([5, 2, 5])
    with pytest.warns(FewShotWarning, match=r"class1 \(2\)"):
        out = generate_fewshot_dataset(items, 4, seed=0)
    assert [sum(d.label == k for d in out) for k in range(3)] == [4, 2, 4]


def test_k_larger_than_every_class_is_an_error():
    with pytest.raises(ValueError, match=r"NUM_SHOTS=8 is larger than every class.*largest has 5"):
        generate_fewshot_dataset(_items([5, 3]), 8, seed=0)


def test_num_shots_below_one_returns_everything():
    items = _items([3, 2])
    assert generate_fewshot_dataset(items, -1, seed=0) == items


def test_split_file_round_trip_is_plain_data_with_relative_paths(tmp_path):
    ds = tmp_path / "ds"
    for i in range(2):
        (ds / "c").mkdir(parents=True, exist_ok=True)
        (ds / "c" / f"{i}.jpg").write_bytes(b"x")
    items = [Datum(str(ds / "c" / f"{i}.jpg"), i, f"n{i}") for i in range(2)]
    path = fewshot_split_path(str(ds), 1, 3)
    assert path == os.path.join(str(ds), "split_fewshot", "shot_1-seed_3.pkl")
    save_fewshot_split(path, str(ds), items)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert [r["impath"] for r in raw["train"]] == ["c/0.jpg", "c/1.jpg"]
    assert os.listdir(os.path.dirname(path)) == ["shot_1-seed_3.pkl"]  # no temporary file left
    assert load_fewshot_split(path, str(ds))["train"] == items


def test_foreign_pickle_is_rejected_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "split_fewshot" / "shot_1-seed_1.pkl"
    path.parent.mkdir()
    with open(path, "wb") as f:
        pickle.dump({"train": [Evil()]}, f)
    with pytest.raises(ValueError, match="not a few-shot split written by this framework"):
        load_fewshot_split(str(path), str(tmp_path))
    assert not marker.exists()


def test_imagenet_cache_written_once_and_reused(tmp_path):
    make_imagenet_like(tmp_path, num_classes=3, train_per_class=5, val_per_class=1, image_size=(16, 16))
    ds1 = build_dataset(_cfg(tmp_path, shots=2, seed=1))
    cache = fewshot_split_path(str(tmp_path / "imagenet"), 2, 1)
    assert ds1.split_file == cache and os.path.isfile(cache)
    mtime = os.stat(cache).st_mtime_ns
    ds2 = ImageNet(_cfg(tmp_path, shots=2, seed=1))
    assert os.stat(cache).st_mtime_ns == mtime
    assert ds2.train_x == ds1.train_x and ds2.split_hash == ds1.split_hash
    assert len(ds1.train_x) == 6
    ds3 = ImageNet(_cfg(tmp_path, shots=2, seed=2))
    assert {d.impath for d in ds3.train_x} != {d.impath for d in ds1.train_x}
    assert sorted(os.listdir(tmp_path / "imagenet" / "split_fewshot")) == ["shot_2-seed_1.pkl", "shot_2-seed_2.pkl"]


def test_cache_portable_after_moving_dataset_folder(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    make_imagenet_like(old, num_classes=2, train_per_class=4, val_per_class=1, image_size=(16, 16))
    first = ImageNet(_cfg(old, shots=2, seed=5))
    shutil.move(str(old), str(new))
    cache = fewshot_split_path(str(new / "imagenet"), 2, 5)
    mtime = os.stat(cache).st_mtime_ns
    moved = ImageNet(_cfg(new, shots=2, seed=5))
    assert os.stat(cache).st_mtime_ns == mtime  # read, not regenerated
    assert [os.path.relpath(d.impath, new) for d in moved.train_x] == \
        [os.path.relpath(d.impath, old) for d in first.train_x]
    assert all(os.path.isfile(d.impath) for d in moved.train_x)


def test_stale_cache_with_missing_image_is_reported(tmp_path):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=3, val_per_class=1, image_size=(16, 16))
    ds = ImageNet(_cfg(tmp_path, shots=1, seed=0))
    os.remove(ds.train_x[0].impath)
    with pytest.raises(ValueError, match="do not exist.*delete the file to regenerate"):
        ImageNet(_cfg(tmp_path, shots=1, seed=0))


def test_cache_for_other_class_list_is_reported(tmp_path):
    make_imagenet_like(tmp_path, num_classes=3, train_per_class=2, val_per_class=1, image_size=(16, 16))
    ImageNet(_cfg(tmp_path, shots=1, seed=0))
    # A new class whose wnid sorts first shifts every label by one.
    for split in ("train", "val"):
        folder = tmp_path / "imagenet" / "images" / split / "n01430000"
        folder.mkdir()
        shutil.copy(next((tmp_path / "imagenet" / "images" / split / "n01440000").iterdir()), folder / "a.JPEG")
    with open(tmp_path / "imagenet" / "classnames.txt", "a") as f:
        f.write("n01430000 newcomer\n")
    with pytest.raises(ValueError, match="was made for a different class list"):
        ImageNet(_cfg(tmp_path, shots=1, seed=0))


def test_imagenet_num_shots_too_large_fails_before_writing(tmp_path):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=3, val_per_class=1, image_size=(16, 16))
    with pytest.raises(ValueError, match="NUM_SHOTS=4 is larger than every class"):
        ImageNet(_cfg(tmp_path, shots=4, seed=0))
    assert not os.path.exists(fewshot_split_path(str(tmp_path / "imagenet"), 4, 0))


def test_imagenet_short_class_warns_and_keeps_all(tmp_path):
    make_imagenet_like(tmp_path, num_classes=3, train_per_class=[4, 1, 4], val_per_class=1, image_size=(16, 16))
    with pytest.warns(FewShotWarning, match=r"1 classes have fewer than NUM_SHOTS=2"):
        ds = ImageNet(_cfg(tmp_path, shots=2, seed=0))
    assert [sum(d.label == k for d in ds.train_x) for k in range(3)] == [2, 1, 2]


def test_subsample_base_new_relabels():
    items = _items([1, 1, 1, 1, 1])
    base, = subsample_classes(items, subsample="base")
    new, = subsample_classes(items, subsample="new")
    assert [(d.label, d.classname) for d in base] == [(0, "class0"), (1, "class1"), (2, "class2")]
    assert [(d.label, d.classname) for d in new] == [(0, "class3"), (1, "class4")]
    with pytest.raises(ValueError, match="all', 'base', 'new'"):
        subsample_classes(items, subsample="half")


def test_imagenet_subsample_new(tmp_path):
    make_imagenet_like(tmp_path, num_classes=4, train_per_class=2, val_per_class=1, image_size=(16, 16))
    cfg = _cfg(tmp_path, shots=1, seed=0)
    cfg.DATASET.SUBSAMPLE_CLASSES = "new"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageNet(cfg)
    assert ds.num_classes == 2
    assert ds.classnames == ["cyan striped thing 2", "violet striped thing 3"]
    assert sorted({d.label for d in ds.test}) == [0, 1] and len(ds.test) == 2
