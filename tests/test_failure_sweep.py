"""Bad inputs and faults through ``python -m locoop``: each is exit 2 (130 for Ctrl-C) and one line on
stderr without a traceback; ``--debug`` (anywhere on the line) gives the traceback.

Most cases run in-process through :func:`locoop.cli.main` (seconds); two go through a real
``python -m locoop`` subprocess so the interpreter's own error printing is covered too.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from locoop.cli import main as cli_main
from locoop.data.synthetic import make_imagenet_like, make_ood_sets

REPO = Path(__file__).resolve().parents[1]
DS_CFG = str(REPO / "configs/datasets/imagenet.yaml")
METHOD_CFG = str(REPO / "configs/trainers/LoCoOp/vit_b16_ep50.yaml")
NUM_CLASSES = 4
SMALL = ["INPUT.SIZE", "(32,32)", "DATALOADER.NUM_WORKERS", "0", "TRAINER.LOCOOP.PREC", "fp32",
         "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DATASET.NUM_SHOTS", "2", "OOD.PLOT", "False",
         "TRAINER.LOCOOP.TOPK", "2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_data")
    make_imagenet_like(str(root), num_classes=NUM_CLASSES, train_per_class=2, val_per_class=2, image_size=(40, 40),
                       seed=0)
    make_ood_sets(str(root), per_set=2, image_size=(40, 40), seed=1)
    return root


def args_for(data_root, backbone, trainer="LoCoOp"):
    return ["--root", data_root, "--trainer", trainer, "--dataset-config-file", DS_CFG, "--config-file", METHOD_CFG,
            "--seed", "1"]


def one_line_error(rc, err, code=2):
    """The command failed with ``code`` and printed exactly one non-empty stderr line, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def cli(argv, capsys):
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, err


def train(data_root, backbone, out, *extra):
    return ["train"] + args_for(data_root, backbone) + ["--output-dir", out, "MODEL.BACKBONE.NAME", backbone] \
        + SMALL + list(extra)


# ------------------------------------------------------------------------ things that cannot be meant
def test_topk_at_least_the_classes_refused_in_train(tmp_path, data_root, tiny_vit_path, capsys, monkeypatch):
    import locoop.trainers.locoop as L

    def no_clip(*a, **k):
        raise AssertionError("CLIP was loaded before the top-K check")

    monkeypatch.setattr(L, "load_clip", no_clip)
    for k in (NUM_CLASSES, NUM_CLASSES + 1):
        rc, err = cli(train(data_root, tiny_vit_path, tmp_path / "t", "TRAINER.LOCOOP.TOPK", k), capsys)
        line = one_line_error(rc, err)
        assert f"TRAINER.LOCOOP.TOPK {k} must be below the {NUM_CLASSES} classes" in line
        assert f"--topk {NUM_CLASSES - 1}" in line
    # CoOp (LAMBDA 0) has no OOD term: its top-K is unused, so the default 200 on 4 classes is fine.
    monkeypatch.setattr(L, "load_clip", lambda *a, **k: (_ for _ in ()).throw(ValueError("reached CLIP")))
    rc, err = cli(["train"] + args_for(data_root, tiny_vit_path)[:-2] + ["--seed", "1", "--trainer", "CoOp",
                   "--output-dir", tmp_path / "coop", "MODEL.BACKBONE.NAME", tiny_vit_path] + SMALL
                  + ["TRAINER.LOCOOP.TOPK", "200"], capsys)
    assert rc == 2 and "reached CLIP" in err


def test_topk_at_least_the_classes_refused_in_visualize(tmp_path, data_root, tiny_vit_path, capsys):
    image = sorted((data_root / "imagenet/images/val").glob("*/*.JPEG"))[0]
    rc, err = cli(["visualize"] + args_for(data_root, tiny_vit_path, "ZeroshotCLIP") + [
        "--output-dir", tmp_path / "v", "--image_path", image, "--label", 0,
        "MODEL.BACKBONE.NAME", tiny_vit_path] + SMALL + ["TRAINER.LOCOOP.TOPK", NUM_CLASSES], capsys)
    assert f"TRAINER.LOCOOP.TOPK {NUM_CLASSES} must be below" in one_line_error(rc, err)
    assert not list((tmp_path / "v").glob("*.png"))


def test_max_epoch_zero_refused(tmp_path, data_root, tiny_vit_path, capsys):
    out = tmp_path / "e0"
    rc, err = cli(train(data_root, tiny_vit_path, out, "OPTIM.MAX_EPOCH", "0"), capsys)
    assert "OPTIM.MAX_EPOCH 0" in one_line_error(rc, err)
    assert not out.exists()


def test_class_without_training_images_refused(tmp_path, tiny_vit_path, capsys):
    root = tmp_path / "data"
    make_imagenet_like(str(root), num_classes=3, train_per_class=2, val_per_class=1, image_size=(40, 40), seed=0)
    folders = sorted((root / "imagenet/images/train").iterdir())
    for f in folders[1].iterdir():
        f.unlink()
    rc, err = cli(train(root, tiny_vit_path, tmp_path / "o"), capsys)
    line = one_line_error(rc, err)
    assert "1 of 3 classes have no training images" in line and str(folders[1]) in line


def test_a_fewshot_split_drawn_while_a_folder_was_empty_is_named(tmp_path, tiny_vit_path, capsys):
    root = tmp_path / "data"
    make_imagenet_like(str(root), num_classes=3, train_per_class=2, val_per_class=1, image_size=(40, 40), seed=0)
    folder = sorted((root / "imagenet/images/train").iterdir())[1]
    images = {f.name: f.read_bytes() for f in folder.iterdir()}
    for f in folder.iterdir():
        f.unlink()
    split = root / "imagenet/split_fewshot/shot_2-seed_1.pkl"
    rc, err = cli(train(root, tiny_vit_path, tmp_path / "o"), capsys)
    line = one_line_error(rc, err)
    assert str(folder) in line and f"delete the few-shot split {split}" in line
    # the folder holds images now; the cached split still has none of them: the split is what to delete
    for name, data in images.items():
        (folder / name).write_bytes(data)
    rc, err = cli(train(root, tiny_vit_path, tmp_path / "o"), capsys)
    line = one_line_error(rc, err)
    assert f"the few-shot split {split} has no image of 1 of 3 classes" in line and f"delete {split}" in line
    split.unlink()
    rc, err = cli(train(root, tiny_vit_path, tmp_path / "o"), capsys)
    assert rc == 0, err


# ------------------------------------------------------------------------ config and flags
def test_config_and_flag_mistakes(tmp_path, data_root, tiny_vit_path, capsys):
    out = tmp_path / "c"
    rc, err = cli(train(data_root, tiny_vit_path, out, "OPTIM.LRR", "0.1"), capsys)
    assert "OPTIM.LR" in one_line_error(rc, err)
    rc, err = cli(train(data_root, tiny_vit_path, out, "--lambda", "0.5"), capsys)
    assert rc == 2 and "unknown flag --lambda" in err and "--lambda_value" in err and "Traceback" not in err
    rc, err = cli(["train"] + args_for(tmp_path / "nowhere", tiny_vit_path) + ["--output-dir", out] + SMALL, capsys)
    # the one case with more lines: the expected folder layout follows the error line
    assert rc == 2 and "Traceback" not in err and "nowhere" in err.splitlines()[0]
    rc, err = cli(["eval"] + args_for(data_root, tiny_vit_path, "ZeroshotCLIP") + [
        "--output-dir", out, "MODEL.BACKBONE.NAME", tiny_vit_path, "OOD.SCORES", "['MCM', 'GLMCMX']"] + SMALL, capsys)
    assert "unknown OOD score 'GLMCMX'" in one_line_error(rc, err)


# ------------------------------------------------------------------------ faults
def test_unwritable_output_folder(tmp_path, data_root, tiny_vit_path, capsys):
    # Tests run as root here, and root ignores mode bits: a file where the folder should be makes the
    # output path unwritable for everyone.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc, err = cli(train(data_root, tiny_vit_path, blocker / "run"), capsys)
    line = one_line_error(rc, err)
    assert str(blocker) in line and "--output-dir" in line


def test_permission_denied_names_the_path(tmp_path, data_root, tiny_vit_path, capsys, monkeypatch):
    import clip.fileio as F

    out = tmp_path / "ro"

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(F, "atomic_write", denied)
    rc, err = cli(train(data_root, tiny_vit_path, out, "OPTIM.MAX_EPOCH", "1"), capsys)
    line = one_line_error(rc, err)
    assert "cannot write" in line and str(out) in line and "permission denied" in line


@pytest.mark.parametrize("command", ["train", "eval"])
def test_disk_full(tmp_path, data_root, tiny_vit_path, capsys, monkeypatch, command):
    # A stand-in for a full disk: every atomic write (checkpoints, config, results, plots) raises ENOSPC.
    import clip.fileio as F

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(F, "atomic_write", full)
    out = tmp_path / command
    if command == "train":
        argv = train(data_root, tiny_vit_path, out)
    else:
        argv = ["eval"] + args_for(data_root, tiny_vit_path, "ZeroshotCLIP") + [
            "--output-dir", out, "MODEL.BACKBONE.NAME", tiny_vit_path] + SMALL
    rc, err = cli(argv, capsys)
    line = one_line_error(rc, err)
    assert "no space left on the device" in line and str(out) in line
    free = shutil.disk_usage(tmp_path).free / 2 ** 20
    assert "MiB free there" in line and free > 0


def test_strict_bad_image(tmp_path, tiny_vit_path, capsys):
    root = tmp_path / "data"
    make_imagenet_like(str(root), num_classes=2, train_per_class=1, val_per_class=2, image_size=(40, 40), seed=0)
    make_ood_sets(str(root), per_set=1, image_size=(40, 40), seed=1)
    bad = sorted((root / "imagenet/images/val").glob("*/*.JPEG"))[0]
    bad.write_bytes(b"not a jpeg")
    rc, err = cli(["eval"] + args_for(root, tiny_vit_path, "ZeroshotCLIP") + [
        "--strict", "--output-dir", tmp_path / "o", "MODEL.BACKBONE.NAME", tiny_vit_path] + SMALL, capsys)
    assert f"cannot read image {bad}" in one_line_error(rc, err)


def test_download_without_network(tmp_path, data_root, capsys, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "cache"))
    rc, err = cli(["eval"] + args_for(data_root, "ViT-B/16", "ZeroshotCLIP") + [
        "--output-dir", tmp_path / "o", "MODEL.BACKBONE.NAME", "ViT-B/16"] + SMALL, capsys)
    line = one_line_error(rc, err)
    assert "could not download https://" in line and str(tmp_path / "cache" / "ViT-B-16.pt") in line
    assert "SHA256" in line


def test_ctrl_c_is_one_line_and_130(tmp_path, data_root, tiny_vit_path, capsys, monkeypatch):
    import locoop.engine.trainer as T

    def interrupted(self):
        raise KeyboardInterrupt("stopped at epoch 1; the same command resumes from epoch 1")

    monkeypatch.setattr(T.SimpleTrainer, "train", interrupted, raising=False)
    rc, err = cli(train(data_root, tiny_vit_path, tmp_path / "k"), capsys)
    line = one_line_error(rc, err, code=130)
    assert line == "python -m locoop train: stopped at epoch 1; the same command resumes from epoch 1"
    monkeypatch.setattr(T.SimpleTrainer, "train", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()),
                        raising=False)
    rc, err = cli(train(data_root, tiny_vit_path, tmp_path / "k2"), capsys)
    assert one_line_error(rc, err, code=130) == "python -m locoop train: stopped"


def test_debug_flag_anywhere_gives_the_traceback(tmp_path, data_root, tiny_vit_path, capsys):
    with pytest.raises(ValueError, match="OPTIM.MAX_EPOCH 0"):
        cli_main([str(a) for a in train(data_root, tiny_vit_path, tmp_path / "d", "OPTIM.MAX_EPOCH", "0", "--debug")])


# ------------------------------------------------------------------------ real write failures
# Stand-ins below the atomic writer (os.open / os.fsync), so the path in the message is the one the
# failing write really had, not one a patched writer was handed.
def _failing_open(prefix: Path, code: int, only: str = ""):
    real = os.open

    def fake(path, *args, **kwargs):
        if str(path).startswith(str(prefix)) and only in os.path.basename(str(path)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    return fake


def test_read_only_names_the_file_not_its_temporary(tmp_path, data_root, tiny_vit_path, capsys, monkeypatch):
    from clip.fileio import TMP_SUFFIX

    out = tmp_path / "ro"
    monkeypatch.setattr(os, "open", _failing_open(out, errno.EROFS))
    rc, err = cli(train(data_root, tiny_vit_path, out), capsys)
    line = one_line_error(rc, err)
    assert "read-only" in line and str(out) in line and TMP_SUFFIX not in line


def test_full_disk_during_a_write_names_the_file(tmp_path, data_root, tiny_vit_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write(): no file name

    monkeypatch.setattr(os, "fsync", full)  # every atomic write ends in fsync: the first one fails
    out = tmp_path / "full"
    rc, err = cli(train(data_root, tiny_vit_path, out), capsys)
    line = one_line_error(rc, err)
    assert f"no space left on the device writing {out}{os.sep}" in line and "MiB free" in line


def test_full_disk_on_a_plot_of_eval_names_the_png(tmp_path, data_root, tiny_vit_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    monkeypatch.setattr(os, "open", _failing_open(out, errno.ENOSPC, only=".png"))
    rc, err = cli(["eval"] + args_for(data_root, tiny_vit_path, "ZeroshotCLIP") + [
        "--output-dir", out, "MODEL.BACKBONE.NAME", tiny_vit_path, "OOD.SCORES", "['MCM']"] + SMALL
        + ["OOD.PLOT", "True"], capsys)
    line = one_line_error(rc, err)
    assert "no space left" in line and ".png" in line and str(out) in line
    assert not [p for p in out.rglob("*.png")]  # no half-written figure


# ------------------------------------------------------------------------ through the interpreter
def test_subprocess_one_line(tmp_path, data_root, tiny_vit_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCOOP_DEBUG", None)
    blocker = tmp_path / "f"
    blocker.write_text("")
    for argv, needle in [(train(data_root, tiny_vit_path, tmp_path / "a", "OPTIM.MAX_EPOCH", "0"), "MAX_EPOCH 0"),
                         (train(data_root, tiny_vit_path, blocker / "run"), str(blocker))]:
        p = subprocess.run([sys.executable, "-m", "locoop"] + [str(a) for a in argv], capture_output=True, text=True,
                           env=env, timeout=300, cwd=REPO)
        assert needle in one_line_error(p.returncode, p.stderr)


# ------------------------------------------------------------------------ first-hour friction
def test_console_config_dump_lists_only_the_changes(tmp_path, data_root, tiny_vit_path, capsys, monkeypatch):
    import locoop.engine.registry as R

    def stop(*a, **k):
        raise ValueError("stop after the dump")

    monkeypatch.setattr(R, "build_trainer", stop)
    rc = cli_main([str(a) for a in train(data_root, tiny_vit_path, tmp_path / "dump", "VERBOSE", "True")])
    out = capsys.readouterr().out
    assert rc == 2
    dump = out.split("** Config **")[1]
    assert "OPTIM.MAX_EPOCH: 1" in dump and "OPTIM.LR: 0.002" in dump  # the method YAML's and SMALL's values
    assert "OPTIM.WEIGHT_DECAY" not in dump  # a default, not printed
    assert len(dump.splitlines()) < 80


def test_num_workers_capped_with_one_note(capsys, monkeypatch):
    import locoop.data.data_manager as D

    monkeypatch.setattr(D, "_WORKER_NOTE_SHOWN", False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert D.cap_num_workers(8) == 2 and D.cap_num_workers(8) == 2 and D.cap_num_workers(1) == 1
    out = capsys.readouterr().out
    assert out.count("NUM_WORKERS 8 > the 2 CPU(s) available; using 2") == 1


# ------------------------------------------------------------------------ real mounts, where permitted
@pytest.fixture
def mounted(tmp_path):
    """``mount(options, read_only)``: a small tmpfs at a fresh folder (read-only by a bind remount);
    the test is skipped where mounting is not permitted (not root, a container without CAP_SYS_ADMIN)."""
    points = []

    def mount(size="64k", read_only=False):
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.decode().strip()}); the stand-in tests cover it")
        points.append(point)
        if read_only:
            p = subprocess.run(["mount", "-o", "remount,ro,bind", str(point)], capture_output=True)
            if p.returncode != 0:
                pytest.skip(f"cannot remount read-only here ({p.stderr.decode().strip()})")
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_real_read_only_output(tmp_path, data_root, tiny_vit_path, capsys, mounted):
    point = mounted(read_only=True)
    rc, err = cli(train(data_root, tiny_vit_path, point / "run"), capsys)
    line = one_line_error(rc, err)
    assert "read-only file system" in line and str(point / "run") in line


@pytest.mark.parametrize("command", ["train", "eval"])
def test_real_full_disk(tmp_path, data_root, tiny_vit_path, capsys, mounted, command):
    point = mounted(size="8k")
    if command == "train":
        argv = train(data_root, tiny_vit_path, point / "out")
    else:
        argv = ["eval"] + args_for(data_root, tiny_vit_path, "ZeroshotCLIP") + [
            "--output-dir", point / "out", "MODEL.BACKBONE.NAME", tiny_vit_path] + SMALL + ["OOD.PLOT", "True"]
    rc, err = cli(argv, capsys)
    line = one_line_error(rc, err)
    assert "no space left on the device" in line and str(point) in line and "MiB free there" in line
