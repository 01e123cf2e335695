"""Atomic writes (locoop.engine.fileio = clip.fileio): all-or-nothing, the user's umask, stale temporaries.

Every writer of the code base goes through these helpers; the tests at the end check the files of
each writer for the umask's permissions (a shared server's colleagues can read the results).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from locoop.engine import fileio
from locoop.engine.fileio import (atomic_copy, atomic_folder, atomic_torch_save, atomic_write, atomic_write_bytes,
                                  atomic_write_text, is_temp_name, publish_folder, remove_stale_temps, temp_name,
                                  temp_owner)


@pytest.fixture
def umask():
    """Run the test under a given umask (restored afterwards)."""
    old = os.umask(0o022)

    def set_(mask):
        os.umask(mask)
        return mask

    yield set_
    os.umask(old)


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_text_bytes_torch_and_copy_round_trip(tmp_path):
    assert atomic_write_text(tmp_path / "a" / "t.txt", "héllo\r\n") == tmp_path / "a" / "t.txt"
    assert (tmp_path / "a" / "t.txt").read_bytes() == "héllo\r\n".encode()  # no newline translation
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    atomic_copy(tmp_path / "c.pt", tmp_path / "d.pt")
    assert (tmp_path / "d.pt").read_bytes() == (tmp_path / "c.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "c.pt", "d.pt"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def dies(f):
        f.write(b"half of the new content")
        raise KeyboardInterrupt  # any exception, Ctrl-C included

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with pytest.raises(ValueError, match="mode"):
        atomic_write(target, lambda f: None, mode="a")


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_and_folders_get_the_umask_permissions(tmp_path, umask, mask):
    umask(mask)
    assert fileio.current_umask() == mask
    atomic_write_text(tmp_path / "r.json", "{}")
    atomic_torch_save({}, tmp_path / "c.pt")
    with atomic_folder(tmp_path / "entry") as tmp:
        atomic_write_text(tmp / "manifest.json", "{}")
    assert _mode(tmp_path / "r.json") == _mode(tmp_path / "c.pt") == 0o666 & ~mask
    assert _mode(tmp_path / "entry") == 0o777 & ~mask and _mode(tmp_path / "entry" / "manifest.json") == 0o666 & ~mask


def test_folder_is_published_whole_or_not_at_all(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as tmp:
            (tmp / "part").write_text("1")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with atomic_folder(final) as tmp:
        (tmp / "part").write_text("1")
    with atomic_folder(final) as tmp:  # replaced: old or new, never a mix
        (tmp / "other").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["other"] and os.listdir(tmp_path) == ["entry"]
    tmp = fileio.make_temp_folder(final)
    with pytest.raises(FileExistsError):
        publish_folder(tmp, final, replace=False)


def test_temporary_names_record_their_writer(tmp_path):
    name = temp_name("model.pth.tar-1")
    assert name.startswith(".model.pth.tar-1.") and name.endswith(".tmp") and is_temp_name(name)
    assert temp_owner(name)[1] == os.getpid()
    assert temp_name("x.pt", ".part").endswith(".part")
    assert not is_temp_name("model.pth.tar-1") and not is_temp_name("ID-ImageNet-0123abcd")
    assert is_temp_name(".model.pth.tar-2.abc123.tmp") and temp_owner(".model.pth.tar-2.abc123.tmp") is None
    assert temp_owner(".tmp-myhost-123-0123abcd-ID-x") == ("myhost", 123)  # the cache's earlier naming


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = temp_owner(temp_name("probe"))[0]
    stale = tmp_path / f".a.pt.{host}-{dead}-0123abcd.tmp"
    stale.write_text("x")
    stale_dir = tmp_path / f".entry.{host}-{dead}-0123abcd.tmp"
    stale_dir.mkdir()
    alive = tmp_path / temp_name("b.pt")  # this process
    alive.write_text("x")
    remote = tmp_path / f".c.pt.otherhost-{dead}-0123abcd.tmp"  # another machine's writer on a shared disk
    remote.write_text("x")
    legacy = tmp_path / ".d.pt.abc123.tmp"
    legacy.write_text("x")
    (tmp_path / "kept.pt").write_text("x")
    assert remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, remote.name, legacy.name, "kept.pt"])
    assert remove_stale_temps(tmp_path, legacy=True) == 1 and not legacy.exists()
    assert remove_stale_temps(tmp_path, max_age_s=-1) == 2  # everything older than "now"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pt"]


def test_every_writer_gives_the_umask_permissions(tmp_path, umask):
    """Checkpoints, config dump, run info, few-shot split, results, scores, tiny checkpoints: 0664 under umask 002."""
    from clip.tiny import make_tiny_checkpoint
    from locoop.config import dump_cfg, get_cfg_default
    from locoop.data.datum import Datum
    from locoop.data.fewshot import save_fewshot_split
    from locoop.engine.checkpoint import save_checkpoint
    from locoop.ood.results import write_results

    umask(0o002)
    paths = [save_checkpoint({"state_dict": {"w": torch.ones(1)}, "epoch": 1}, str(tmp_path / "ckpt"), is_best=True)]
    paths += [tmp_path / "ckpt" / "checkpoint", tmp_path / "ckpt" / "model-best.pth.tar"]
    paths.append(dump_cfg(get_cfg_default(), str(tmp_path / "config.yaml")))
    (tmp_path / "ds" / "x").mkdir(parents=True)
    (tmp_path / "ds" / "x" / "a.jpg").write_bytes(b"")
    save_fewshot_split(str(tmp_path / "ds" / "split.pkl"), str(tmp_path / "ds"), [Datum(str(tmp_path / "ds/x/a.jpg"), 0, "a")])
    paths.append(tmp_path / "ds" / "split.pkl")
    files = write_results(tmp_path / "res", {"MCM": {"SUN": {"fpr95": 0.5, "auroc": 0.5, "aupr": 0.5}}},
                          meta={"env": {}})
    paths += list(files.values())
    paths.append(make_tiny_checkpoint(tmp_path / "tiny.pt"))
    paths.append(make_tiny_checkpoint(tmp_path / "tiny.jit.pt", fmt="torchscript"))
    for p in paths:
        assert _mode(p) == 0o664, p
    assert json.loads(files["json"].read_text())["scores"]["MCM"]["SUN"]["auroc"] == 50.0
