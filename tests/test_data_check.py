"""`python -m locoop check-data`: report contents and exit codes on good and broken trees."""
import os
import shutil
import subprocess
import sys

import pytest

from locoop.cli import main
from locoop.data.check import check_data
from locoop.data.classnames import sha256_file
from locoop.data.synthetic import corrupt_image, make_imagenet_like, make_ood_sets, make_val_split, make_voc_like

SIZE = (16, 16)


@pytest.fixture()
def good_root(tmp_path):
    make_imagenet_like(tmp_path, num_classes=3, train_per_class=[4, 4, 2], val_per_class=2, image_size=SIZE)
    make_ood_sets(tmp_path, per_set=2, image_size=SIZE)
    return tmp_path


def test_good_tree_exit_0_and_report(good_root, capsys):
    rc = main(["check-data", "--root", str(good_root), "--ood", "--num-shots", "2", "--verify-images"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "images/train: 3 class folders, 10 images (per class: min 2, max 4)" in out
    assert "images/val: 3 class folders, 6 images (per class: min 2, max 2)" in out
    assert f"sha256 {sha256_file(good_root / 'imagenet/classnames.txt')}" in out
    assert "2-shot sampling possible for every class" in out
    assert "Texture: " + str(good_root / "Texture/images") + " (2 images)" in out
    assert "all 16 images decode" in out
    assert "RESULT: OK" in out


def test_short_classes_warn_and_strict_errors(good_root, capsys):
    assert main(["check-data", "--root", str(good_root), "--num-shots", "4"]) == 0
    out = capsys.readouterr().out
    assert "[WARN]  1 classes have fewer than 4 training images" in out and "n01440002" in out
    assert main(["check-data", "--root", str(good_root), "--num-shots", "4", "--strict"]) == 1
    assert main(["check-data", "--root", str(good_root), "--num-shots", "5"]) == 1
    assert "NUM_SHOTS=5 is larger than every class (largest: 4 images)" in capsys.readouterr().out


def test_broken_tree_exit_1_with_fixes(good_root, capsys):
    ds = good_root / "imagenet"
    # Folder without a class name, class name without a folder, missing OOD set, corrupt image.
    shutil.copytree(ds / "images/train/n01440000", ds / "images/train/n01449999")
    shutil.copytree(ds / "images/val/n01440000", ds / "images/val/n01449999")
    with open(ds / "classnames.txt", "a") as f:
        f.write("n09999999 ghost class\n")
    shutil.rmtree(good_root / "SUN")
    bad = ds / "images/val/n01440001/ILSVRC2012_val_00010001.JPEG"
    corrupt_image(str(bad))
    rc = main(["check-data", "--root", str(good_root), "--ood", "SUN", "Places", "--verify-images"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "1 classes in" in out and "n09999999" in out and "have no folder" in out
    assert "1 class folders are not in" in out and "n01449999" in out
    assert "fix: add a '<wnid> <class name>' line for each to" in out
    assert "SUN: folder not found" in out and f"fix: put the SUN images under {good_root / 'SUN'}" in out
    assert "Places: " in out
    assert f"cannot be read: {bad}" in out
    assert "RESULT: 3 problem(s) block training/evaluation, 1 warning(s)" in out


def test_missing_val_folder_and_eval_only(tmp_path, capsys):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=0, val_per_class=1, image_size=SIZE)
    assert main(["check-data", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"[ERROR] {tmp_path / 'imagenet/images/train'} not found" in out and "--eval-only" in out
    assert main(["check-data", "--root", str(tmp_path), "--eval-only"]) == 0
    shutil.rmtree(tmp_path / "imagenet/images/val")
    assert main(["check-data", "--root", str(tmp_path), "--eval-only"]) == 1
    assert "put the 50,000 validation images into" in capsys.readouterr().out


def test_no_classnames_file_and_not_1000_classes(tmp_path):
    make_imagenet_like(tmp_path, num_classes=2, train_per_class=1, val_per_class=1, image_size=SIZE,
                       write_classnames=False)
    report = check_data(str(tmp_path))
    assert not report.ok
    (err,) = report.errors
    assert "there are 2 class folders, not 1000" in err.message
    assert "create" in err.fix and "classnames.txt" in err.fix


def test_stale_fewshot_cache_and_val_split(good_root):
    make_val_split(str(good_root / "v.json"), str(good_root / "imagenet/images/train"))
    report = check_data(str(good_root), num_shots=2, seed=1, val_split_file="v.json")
    assert report.ok
    assert any("no few-shot split cache yet" in f.message for f in report.findings)
    assert any("validation split" in f.message and "3 images found" in f.message for f in report.findings)
    cache = good_root / "imagenet/split_fewshot/shot_2-seed_1.pkl"
    cache.parent.mkdir()
    cache.write_bytes(b"\x80\x04garbage")
    report = check_data(str(good_root), num_shots=2, seed=1)
    (err,) = report.errors
    assert "is unusable" in err.message and f"delete {cache}" in err.fix


def test_voc_and_missing_root(tmp_path, capsys):
    make_voc_like(tmp_path, test_per_class=1, val_per_class=1, image_size=SIZE)
    assert main(["check-data", "--root", str(tmp_path), "--dataset", "voc"]) == 0
    out = capsys.readouterr().out
    assert "14 class folders, 14 images" in out and "builtin:setar_voc14" in out
    assert main(["check-data", "--root", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_cli_subprocess_exit_code(good_root):
    # The real entry point, as users run it (exit code 1 on a broken tree; 0 is covered in-process).
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.rmtree(good_root / "imagenet/images/val")
    bad = subprocess.run([sys.executable, "-m", "locoop", "check-data", "--root", str(good_root)],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "images/val not found" in bad.stdout


def test_check_data_lists_every_shipped_method_config(tmp_path):
    import glob
    import os

    from locoop.data.check import check_data, shipped_configs

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    listed = {f for d in ("imagenet", "voc", "openood") for _, files in shipped_configs(d) for f in files}
    shipped = {os.path.relpath(f, repo) for f in glob.glob(os.path.join(repo, "configs", "**", "*.yaml"), recursive=True)
               if os.sep + "datasets" + os.sep not in f}
    assert shipped and shipped == listed
    assert "configs/setar/imagenet/swin_base/SeTAR.yaml" in listed
    assert "configs/setar/finetune/imagenet/clip_large/SeTAR+FT.yaml" in listed
    (tmp_path / "imagenet").mkdir()
    text = check_data(str(tmp_path), dataset="imagenet", need_train=False).render()
    assert "Shipped configs for this layout" in text and "SeTAR search, Swin-V2-B: configs/setar/imagenet/swin_base/" in text
