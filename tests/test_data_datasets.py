"""Datasets on generated folders in the real layouts: ImageNet, Pascal-VOC, OOD sets, val-split JSON."""
import json
import os
import shutil

import pytest

from locoop.config import get_cfg_default
from locoop.data import ImageNet, PascalVOC, build_dataset, build_ood_datasets
from locoop.data.classnames import SHIPPED_IMAGENET_CLASSNAMES, SETAR_VOC_CLASSNAMES, sha256_file
from locoop.data.synthetic import make_imagenet_like, make_ood_sets, make_val_split, make_voc_like

SIZE = (16, 16)


def _cfg(root, name="ImageNet", shots=-1, seed=1, val_split=""):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NAME = name
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.VAL_SPLIT_FILE = val_split
    cfg.SEED = seed
    cfg.VERBOSE = False
    return cfg


# ---------------------------------------------------------------- ImageNet


def test_imagenet_layout_labels_and_provenance(tmp_path):
    info = make_imagenet_like(tmp_path, num_classes=3, train_per_class=[3, 2, 4], val_per_class=2, image_size=SIZE)
    # A non-image file and a hidden macOS file are ignored; upper/lower-case extensions are images.
    (tmp_path / "imagenet/images/val" / info["wnids"][0] / "notes.txt").write_text("x")
    (tmp_path / "imagenet/images/val" / info["wnids"][0] / "._junk.JPEG").write_bytes(b"x")
    shutil.copy(tmp_path / "imagenet/images/val" / info["wnids"][1] / "ILSVRC2012_val_00010000.JPEG",
                tmp_path / "imagenet/images/val" / info["wnids"][1] / "extra.png")
    ds = build_dataset(_cfg(tmp_path))
    assert isinstance(ds, ImageNet)
    assert ds.num_classes == 3
    assert ds.classnames == info["classnames"]
    assert ds.lab2cname == {0: info["classnames"][0], 1: info["classnames"][1], 2: info["classnames"][2]}
    assert [sum(d.label == k for d in ds.train_x) for k in range(3)] == [3, 2, 4]  # NUM_SHOTS -1: all
    assert [sum(d.label == k for d in ds.test) for k in range(3)] == [2, 3, 2]
    assert ds.val == ds.test  # no VAL_SPLIT_FILE: val is the test set, as CoOp
    d = ds.test[0]
    assert d.impath == str(tmp_path / "imagenet/images/val" / info["wnids"][0] / "ILSVRC2012_val_00000000.JPEG")
    assert (d.label, d.classname, d.domain) == (0, info["classnames"][0], 0)
    assert ds.classnames_file == str(tmp_path / "imagenet/classnames.txt")
    assert ds.classnames_hash == sha256_file(ds.classnames_file)
    assert ds.split_file is None and ds.split_hash is None


def test_imagenet_labels_follow_sorted_wnids_not_file_order(tmp_path):
    info = make_imagenet_like(tmp_path, num_classes=3, train_per_class=1, val_per_class=1, image_size=SIZE)
    lines = (tmp_path / "imagenet/classnames.txt").read_text().splitlines()
    (tmp_path / "imagenet/classnames.txt").write_text("\n".join(reversed(lines)) + "\n")
    ds = ImageNet(_cfg(tmp_path))
    assert ds.classnames == info["classnames"]


def test_imagenet_shipped_classnames_for_1000_folders(tmp_path):
    make_imagenet_like(tmp_path, num_classes=1000, train_per_class=0, val_per_class=1, image_size=(4, 4),
                       write_classnames=False, ext=".png")
    ds = ImageNet(_cfg(tmp_path), need_train=False)
    assert ds.classnames_file == SHIPPED_IMAGENET_CLASSNAMES
    assert ds.classnames[:3] == ["tench", "goldfish", "great white shark"] and ds.classnames[-1] == "toilet paper"
    assert ds.num_classes == 1000 and len(ds.test) == 1000 and ds.train_x == []
    assert ds.test[999].classname == "toilet paper"


def test_imagenet_without_classnames_file_and_not_1000_classes(tmp_path):
    make_imagenet_like(tmp_path, num_classes=3, train_per_class=1, val_per_class=1, image_size=SIZE,
                       write_classnames=False)
    with pytest.raises(ValueError, match=r"classnames.txt not found and there are 3 class folders, not 1000"):
        ImageNet(_cfg(tmp_path))


def test_imagenet_missing_folders_named_with_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ImageNet(_cfg(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "imagenet/images/val") in msg and str(tmp_path / "imagenet/images/train") in msg
    assert "Expected layout" in msg and "images/train/<wnid>/*.JPEG" in msg
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=0, val_per_class=1, image_size=SIZE)
    with pytest.raises(FileNotFoundError, match="images/train"):
        ImageNet(_cfg(tmp_path))
    assert len(ImageNet(_cfg(tmp_path), need_train=False).test) == 2  # evaluation only


def test_imagenet_empty_root_setting():
    with pytest.raises(ValueError, match="DATASET.ROOT is empty"):
        ImageNet(_cfg(""))


def test_imagenet_classnames_file_vs_folders_both_directions(tmp_path):
    info = make_imagenet_like(tmp_path, num_classes=3, train_per_class=1, val_per_class=1, image_size=SIZE)
    path = tmp_path / "imagenet/classnames.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["n09999999 ghost"]) + "\n")
    with pytest.raises(ValueError) as err:
        ImageNet(_cfg(tmp_path))
    msg = str(err.value)
    assert "1 classes in" in msg and "n09999999" in msg and "have no folder" in msg
    assert "1 folders under" in msg and info["wnids"][2] in msg and "are not in" in msg


def test_imagenet_malformed_classnames_line(tmp_path):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=1, val_per_class=1, image_size=SIZE)
    (tmp_path / "imagenet/classnames.txt").write_text("n01440000 a\nn01440001\n")
    with pytest.raises(ValueError, match=r"line 2: expected '<folder name> <class name>'"):
        ImageNet(_cfg(tmp_path))


def test_imagenet_train_and_val_folders_differ(tmp_path):
    info = make_imagenet_like(tmp_path, num_classes=3, train_per_class=1, val_per_class=1, image_size=SIZE)
    shutil.rmtree(tmp_path / "imagenet/images/train" / info["wnids"][1])
    with pytest.raises(ValueError, match=rf"in val but not in train: {info['wnids'][1]}"):
        ImageNet(_cfg(tmp_path))


def test_imagenet_bad_subsample_value(tmp_path):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=1, val_per_class=1, image_size=SIZE)
    cfg = _cfg(tmp_path)
    cfg.DATASET.SUBSAMPLE_CLASSES = "Base"
    with pytest.raises(ValueError, match="SUBSAMPLE_CLASSES"):
        ImageNet(cfg)


def test_unknown_dataset_name_lists_registered(tmp_path):
    with pytest.raises(KeyError, match="did you mean 'ImageNet'"):
        build_dataset(_cfg(tmp_path, name="imagenet1k"))


# ---------------------------------------------------------------- validation split JSON


def test_imagenet_val_split_from_training_images(tmp_path):
    info = make_imagenet_like(tmp_path, num_classes=3, train_per_class=3, val_per_class=2, image_size=SIZE)
    mapping = make_val_split(str(tmp_path / "val.json"), str(tmp_path / "imagenet/images/train"), per_class=1)
    ds = ImageNet(_cfg(tmp_path, val_split="val.json"))  # relative to DATASET.ROOT
    assert [os.path.basename(d.impath) for d in ds.val] == [mapping[w][0] for w in info["wnids"]]
    assert [d.label for d in ds.val] == [0, 1, 2]
    assert all("/images/train/" in d.impath for d in ds.val)
    assert len(ds.test) == 6  # training images never overlap the test set
    assert ds.val_split_file == str(tmp_path / "val.json") and ds.val_split_hash == sha256_file(tmp_path / "val.json")


def test_val_split_images_are_removed_from_test(tmp_path):
    info = make_imagenet_like(tmp_path, num_classes=2, train_per_class=1, val_per_class=3, image_size=SIZE)
    (tmp_path / "v.json").write_text(json.dumps({info["wnids"][0]: ["ILSVRC2012_val_00000001.JPEG"]}))
    ds = ImageNet(_cfg(tmp_path, val_split=str(tmp_path / "v.json")))
    assert [os.path.basename(d.impath) for d in ds.val] == ["ILSVRC2012_val_00000001.JPEG"]
    assert len(ds.test) == 5 and ds.val[0] not in ds.test


@pytest.mark.parametrize("content, pattern, exc", [
    ({"n09999999": ["a.JPEG"]}, r"names classes the dataset does not have: n09999999", ValueError),
    ({"n01440000": ["missing.JPEG"]}, r"not found in .*n01440000/missing.JPEG", FileNotFoundError),
    ({"n01440000": "a.JPEG"}, r"must be a list of file names", ValueError),
    ({"n01440000": ["../../escape.JPEG"]}, r"must be file names inside the class folder", ValueError),
    ([1, 2], r"must hold a JSON object", ValueError),
])
def test_val_split_errors(tmp_path, content, pattern, exc):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=1, val_per_class=1, image_size=SIZE)
    (tmp_path / "v.json").write_text(json.dumps(content))
    with pytest.raises(exc, match=pattern):
        ImageNet(_cfg(tmp_path, val_split=str(tmp_path / "v.json")))


def test_val_split_file_missing_or_not_json(tmp_path):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=1, val_per_class=1, image_size=SIZE)
    with pytest.raises(FileNotFoundError, match="VAL_SPLIT_FILE 'nope.json' not found"):
        ImageNet(_cfg(tmp_path, val_split="nope.json"))
    (tmp_path / "v.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ImageNet(_cfg(tmp_path, val_split=str(tmp_path / "v.json")))


# ---------------------------------------------------------------- Pascal-VOC


def test_voc_setar_layout(tmp_path):
    make_voc_like(tmp_path, test_per_class=2, val_per_class=1, image_size=SIZE)
    ds = build_dataset(_cfg(tmp_path, name="PascalVOC"))
    assert isinstance(ds, PascalVOC)
    assert ds.classnames == list(SETAR_VOC_CLASSNAMES) and ds.num_classes == 14
    assert ds.classnames_file == "builtin:setar_voc14"
    assert len(ds.test) == 28 and len(ds.val) == 14 and ds.train_x == []
    assert ds.test[-1].classname == "tvmonitor" and ds.test[-1].label == 13
    assert os.path.dirname(ds.val[0].impath) == str(tmp_path / "ID_VOC/val/aeroplane")


def test_voc_glmcm_folder_with_setar_json_gives_disjoint_split(tmp_path):
    info = make_voc_like(tmp_path, test_per_class=3, val_per_class=1, image_size=SIZE, layout="glmcm")
    (tmp_path / "voc_val_data.json").write_text(json.dumps(info["val_files"]))
    ds = PascalVOC(_cfg(tmp_path, name="PascalVOC", val_split=str(tmp_path / "voc_val_data.json")))
    assert len(ds.val) == 14 and len(ds.test) == 42
    assert not {d.impath for d in ds.val} & {d.impath for d in ds.test}
    assert all("ID_VOC_single" in d.impath for d in ds.val)


def test_voc_classnames_file_and_unknown_folder(tmp_path):
    make_voc_like(tmp_path, classes=["cat", "dog", "zebra"], test_per_class=1, val_per_class=0, image_size=SIZE)
    with pytest.raises(ValueError, match=r"folders that are not VOC classes: zebra"):
        PascalVOC(_cfg(tmp_path, name="PascalVOC"))
    (tmp_path / "ID_VOC/classnames.txt").write_text("cat cat\ndog dog\nzebra zebra\n")
    ds = PascalVOC(_cfg(tmp_path, name="PascalVOC"))
    assert ds.classnames == ["cat", "dog", "zebra"]
    assert ds.classnames_hash == sha256_file(tmp_path / "ID_VOC/classnames.txt")


def test_voc_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ID_VOC/test \(or .*ID_VOC_single\)"):
        PascalVOC(_cfg(tmp_path, name="PascalVOC"))


def test_voc_fewshot_train_folder(tmp_path):
    make_voc_like(tmp_path, test_per_class=1, val_per_class=0, train_per_class=3, image_size=SIZE)
    ds = PascalVOC(_cfg(tmp_path, name="PascalVOC", shots=2, seed=0))
    assert len(ds.train_x) == 28 and ds.split_file.endswith(os.path.join("ID_VOC", "split_fewshot", "shot_2-seed_0.pkl"))


# ---------------------------------------------------------------- OOD sets


def test_ood_sets_read_recursively_with_label_minus_one(tmp_path):
    make_ood_sets(tmp_path, ["iNaturalist", "SUN", "Places", "Texture", "ImageNet-22K", "COCO"], per_set=4,
                  image_size=SIZE)
    sets = build_ood_datasets(str(tmp_path), ["iNaturalist", "places365", "Texture", "IN22k", "COCO", "SUN"])
    assert list(sets) == ["iNaturalist", "Places", "Texture", "ImageNet-22K", "COCO", "SUN"]
    assert {k: len(v) for k, v in sets.items()} == {k: 4 for k in sets}
    assert all(d.label == -1 for v in sets.values() for d in v)
    assert sets["Texture"][0].impath == str(tmp_path / "Texture/images/banded/banded_0000.jpg")
    assert sets["COCO"][0].impath.startswith(str(tmp_path / "OOD_COCO/images"))


def test_ood_setar_layout_accepted(tmp_path):
    make_ood_sets(tmp_path, ["SUN", "Texture"], per_set=2, image_size=SIZE, layout="setar")
    sets = build_ood_datasets(str(tmp_path), ["SUN", "Texture"])
    assert sets["SUN"][0].impath.startswith(str(tmp_path / "OOD_Sun/test/images"))
    assert len(sets["Texture"]) == 2


def test_ood_missing_folders_all_named_at_once(tmp_path):
    make_ood_sets(tmp_path, ["SUN"], per_set=1, image_size=SIZE)
    with pytest.raises(FileNotFoundError) as err:
        build_ood_datasets(str(tmp_path), ["iNaturalist", "SUN", "Texture"])
    msg = str(err.value)
    assert str(tmp_path / "iNaturalist") in msg and str(tmp_path / "Texture/images") in msg and "SUN:" not in msg


def test_ood_unknown_name_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match=r"unknown OOD dataset 'MNIST'; choose from iNaturalist, SUN"):
        build_ood_datasets(str(tmp_path), ["MNIST"])
    (tmp_path / "Places" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found under"):
        build_ood_datasets(str(tmp_path), ["Places"])
