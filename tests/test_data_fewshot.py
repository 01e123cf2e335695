"""Few-shot sampling, the split cache (safe format, written once, portable) and class subsampling."""
import os
import pickle
import random
import shutil
import sys
import types
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


def _dassl_draw(items, k, seed):
    """Dassl's generate_fewshot_dataset, written out: global random seeded, labels in first-seen order."""
    random.seed(seed)
    tracker = {}
    for it in items:
        tracker.setdefault(it.label, []).append(it)
    out = []
    for its in tracker.values():
        out.extend(random.sample(its, k) if len(its) >= k else its)
    return out


def test_k_per_class_is_dassls_draw_and_depends_on_listing_order():
    items = _items([10, 10, 10])
    a = generate_fewshot_dataset(items, 3, seed=1)
    assert a == generate_fewshot_dataset(items, 3, seed=1)  # deterministic
    assert a == _dassl_draw(items, 3, 1)
    assert [sum(d.label == k for d in a) for k in range(3)] == [3, 3, 3]
    assert len({d.impath for d in a}) == 9  # no duplicates
    # As in Dassl, classes are visited in the order they first appear and the draw follows the listing.
    rev = list(reversed(items))
    assert generate_fewshot_dataset(rev, 3, seed=1) == _dassl_draw(rev, 3, 1) != a
    assert {d.impath for d in generate_fewshot_dataset(items, 3, seed=2)} != {d.impath for d in a}
    # A class of exactly K images is still drawn (permuted), one with fewer keeps its order and draws nothing.
    exact = _items([3, 2, 5])
    with pytest.warns(FewShotWarning):
        assert generate_fewshot_dataset(exact, 3, seed=4) == _dassl_draw(exact, 3, 4)


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
    with pytest.raises(ValueError, match="not a few-shot split written by this framework") as e:
        load_fewshot_split(str(path), str(tmp_path))
    assert "'io.open'" in str(e.value) and "damaged" not in str(e.value)
    assert not marker.exists()
    path.write_bytes(path.read_bytes()[:20])  # a truncated pickle is called damaged
    with pytest.raises(ValueError, match="damaged"):
        load_fewshot_split(str(path), str(tmp_path))


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


# ---------------------------------------------------------------------------- the papers' split, image for image
def _shuffle_creation_order(folder, seed):
    """Re-create the files of ``folder`` in a random order, so the directory order is not the sorted one."""
    names = sorted(os.listdir(folder))
    random.Random(seed).shuffle(names)
    tmp = folder + ".tmp"
    os.rename(folder, tmp)
    os.makedirs(folder)
    for n in names:
        shutil.copyfile(os.path.join(tmp, n), os.path.join(folder, n))
    shutil.rmtree(tmp)


def _coop_listing(train_dir):
    """CoOp/LoCoOp's ImageNet.read_data, written out: sorted class folders, files by Dassl's listdir_nohidden."""
    folders = sorted(f.name for f in os.scandir(train_dir) if f.is_dir())
    items = []
    for label, folder in enumerate(folders):
        for name in [f for f in os.listdir(os.path.join(train_dir, folder)) if not f.startswith(".")]:
            items.append(Datum(os.path.join(train_dir, folder, name), label, folder))
    return items


@pytest.fixture(scope="module")
def papers_layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("papers")
    info = make_imagenet_like(root, num_classes=4, train_per_class=[18, 16, 20, 9], val_per_class=1,
                              image_size=(8, 8))
    train_dir = os.path.join(info["dataset_dir"], "images", "train")
    for i, wnid in enumerate(info["wnids"]):
        _shuffle_creation_order(os.path.join(train_dir, wnid), i)
    (root / "imagenet" / "images" / "train" / info["wnids"][0] / ".hidden.JPEG").write_bytes(b"x")
    return root, train_dir


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 4, 16])
def test_imagenet_split_is_the_papers_for_the_same_seed(papers_layout, seed, shots):
    root, train_dir = papers_layout
    expected = [(d.impath, d.label) for d in _dassl_draw(_coop_listing(train_dir), shots, seed)]
    cache = fewshot_split_path(str(root / "imagenet"), shots, seed)
    if os.path.exists(cache):
        os.remove(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewShotWarning)  # the 9-image class at 16 shots
        first = ImageNet(_cfg(root, shots=shots, seed=seed))
        again = ImageNet(_cfg(root, shots=shots, seed=seed))  # from the cache file
    assert [(d.impath, d.label) for d in first.train_x] == expected
    assert [(d.impath, d.label) for d in again.train_x] == expected


def test_sorted_file_order_is_opt_in(papers_layout):
    root, train_dir = papers_layout
    listing = _coop_listing(train_dir)
    by_name = sorted(listing, key=lambda d: (d.label, d.impath))
    cfg = _cfg(root, shots=4, seed=7)
    cfg.DATASET.FEWSHOT_FILE_ORDER = "sorted"
    ds = ImageNet(cfg)
    assert [d.impath for d in ds.train_x] == [d.impath for d in _dassl_draw(by_name, 4, 7)]
    if [d.impath for d in listing] != [d.impath for d in by_name]:  # the file system does not sort
        os.remove(ds.split_file)
        papers = ImageNet(_cfg(root, shots=4, seed=7))
        assert [d.impath for d in papers.train_x] != [d.impath for d in ds.train_x]
    cfg.DATASET.FEWSHOT_FILE_ORDER = "random"
    with pytest.raises(ValueError, match="FEWSHOT_FILE_ORDER must be one of"):
        ImageNet(cfg)


def _standin_dassl_datum(monkeypatch):
    """A module ``dassl.data.datasets.base_dataset`` with Dassl's Datum (attributes as Dassl sets them)."""
    mod = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:  # noqa: D401 - a stand-in for Dassl's class
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = mod.__name__, "Datum"
    mod.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return Datum


def test_split_pickle_of_the_papers_code_is_used_rerooted(tmp_path, monkeypatch, capsys):
    info = make_imagenet_like(tmp_path, num_classes=3, train_per_class=5, val_per_class=1, image_size=(8, 8))
    DasslDatum = _standin_dassl_datum(monkeypatch)
    old = "/home/author/DATA/imagenet"
    chosen = [(0, 3), (1, 0), (2, 4), (0, 1)]
    records = [DasslDatum(f"{old}/images/train/{info['wnids'][c]}/{info['wnids'][c]}_{j}.JPEG", c, 0,
                          info["classnames"][c]) for c, j in chosen]
    path = fewshot_split_path(info["dataset_dir"], 2, 1)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:  # as CoOp/LoCoOp write it
        pickle.dump({"train": records, "val": records[:1]}, f, protocol=pickle.HIGHEST_PROTOCOL)
    monkeypatch.delitem(sys.modules, "dassl.data.datasets.base_dataset")  # loading must not need Dassl
    split = load_fewshot_split(path, info["dataset_dir"])
    assert split["format"] == "dassl" and split["old_root"] == old
    assert len(split["val"]) == 1
    capsys.readouterr()
    ds = ImageNet(_cfg(tmp_path, shots=2, seed=1))
    out = capsys.readouterr().out
    assert "written by CoOp/LoCoOp" in out and old in out
    train_dir = os.path.join(info["dataset_dir"], "images", "train")
    assert [(d.impath, d.label, d.classname) for d in ds.train_x] == [
        (os.path.join(train_dir, info["wnids"][c], f"{info['wnids'][c]}_{j}.JPEG"), c, info["classnames"][c])
        for c, j in chosen]
    assert ds.split_file == path and len(ds.split_hash) == 64
    os.remove(ds.train_x[0].impath)
    with pytest.raises(ValueError, match="written by CoOp/LoCoOp.*not under"):
        ImageNet(_cfg(tmp_path, shots=2, seed=1))
