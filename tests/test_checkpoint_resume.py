"""Checkpoints: atomic writes, weights_only loading, foreign/other-trainer refusal, exact resume.

The kill-and-resume test runs the toy trainer in a real subprocess, SIGKILLs it mid-epoch after a
checkpoint exists, resumes it with a new trainer, and requires bitwise-equal final weights with an
uninterrupted run.
"""
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from locoop.engine import close_logger, latest_checkpoint, load_checkpoint, save_checkpoint, set_random_seed
from locoop.engine import checkpoint as ckpt_mod

import toy_trainer  # noqa: F401  (registers the toy trainers)
from toy_trainer import GenToyTrainer, OtherToyTrainer, ToyTrainer, WorkerToyTrainer, toy_cfg

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SCRIPT = os.path.join(TESTS, "toy_trainer.py")


@pytest.fixture(autouse=True)
def _restore_stdout():
    torch.set_num_threads(1)
    yield
    close_logger()


def _state(epoch=1, value=1.0):
    return {"state_dict": {"w": torch.full((3,), value)}, "epoch": epoch, "optimizer": None, "scheduler": None}


# ---------------------------------------------------------------------------- writing
def test_save_layout_pointer_and_best_copy(tmp_path):
    save_checkpoint(_state(1), str(tmp_path))
    save_checkpoint(_state(2, 2.0), str(tmp_path), is_best=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "model-best.pth.tar", "model.pth.tar-1", "model.pth.tar-2"]
    assert (tmp_path / "checkpoint").read_text() == "model.pth.tar-2\n"
    best = torch.load(tmp_path / "model-best.pth.tar", weights_only=True)
    assert torch.equal(best["state_dict"]["w"], torch.full((3,), 2.0)) and best["format_version"] == 1
    save_checkpoint(_state(3), str(tmp_path), model_name="model-best.pth.tar")  # best_val style
    assert (tmp_path / "checkpoint").read_text() == "model.pth.tar-2\n"  # pointer stays on the latest epoch
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.pth.tar-2")


def test_module_prefix_is_stripped(tmp_path):
    save_checkpoint({"state_dict": {"module.w": torch.ones(1)}, "epoch": 1}, str(tmp_path))
    assert list(load_checkpoint(str(tmp_path / "model.pth.tar-1"))["state_dict"]) == ["w"]


def test_crash_during_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    save_checkpoint(_state(1, 1.0), str(tmp_path), model_name="model.pth.tar-1")
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PARTIAL" * 100)  # half a checkpoint reaches the temp file ...
        raise OSError("disk full")  # ... then the write dies

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(OSError):
        save_checkpoint(_state(1, 5.0), str(tmp_path), model_name="model.pth.tar-1")  # overwrite attempt
    with pytest.raises(OSError):
        save_checkpoint(_state(2, 5.0), str(tmp_path))  # new file attempt
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "model.pth.tar-1"]  # no temp, no partial -2
    old = load_checkpoint(str(tmp_path / "model.pth.tar-1"))
    assert torch.equal(old["state_dict"]["w"], torch.ones(3))
    assert (tmp_path / "checkpoint").read_text() == "model.pth.tar-1\n"


def test_stale_temp_from_killed_writer_is_ignored_then_removed(tmp_path):
    save_checkpoint(_state(1), str(tmp_path))
    stale = tmp_path / ".model.pth.tar-2.abc123.tmp"
    stale.write_bytes(b"\x80\x02truncated")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.pth.tar-1")
    save_checkpoint(_state(2), str(tmp_path))
    assert not stale.exists()


_WRITER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from locoop.engine.checkpoint import save_checkpoint
big = torch.arange(2_000_000, dtype=torch.float32)
i = 0
while True:
    i += 1
    save_checkpoint({"state_dict": {"w": big + i}, "epoch": 1, "i": i}, sys.argv[1], model_name="model.pth.tar-1")
    if i == 2:
        open(sys.argv[1] + "/ready", "w").close()
"""


def test_sigkill_while_writing_never_leaves_a_truncated_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), ROOT])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.time() < deadline, "writer did not start"
            time.sleep(0.02)
        time.sleep(0.37)  # somewhere inside a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    names = [n for n in os.listdir(tmp_path) if n != "ready"]
    assert "model.pth.tar-1" in names
    ck = load_checkpoint(str(tmp_path / "model.pth.tar-1"))
    assert torch.equal(ck["state_dict"]["w"], torch.arange(2_000_000, dtype=torch.float32) + ck["i"])
    # the only other possible leftover is an ignored temp file, which the next save removes
    assert all(n in ("model.pth.tar-1", "checkpoint") or n.endswith(".tmp") for n in names)
    save_checkpoint(_state(2), str(tmp_path))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# ---------------------------------------------------------------------------- reading
def test_weights_only_loading_and_unsafe_values_refused_at_save(tmp_path):
    path = save_checkpoint(_state(1), str(tmp_path))
    assert torch.load(path, weights_only=True)["epoch"] == 1
    with pytest.raises(TypeError) as e:
        save_checkpoint({"state_dict": {}, "epoch": 1, "val_result": np.float64(1.0)}, str(tmp_path))
    assert "state['val_result']" in str(e.value) and "numpy" in str(e.value)
    with pytest.raises(TypeError) as e:
        save_checkpoint({"state_dict": {}, "epoch": 1, "scheduler": {"successor": object()}}, str(tmp_path))
    assert "state['scheduler']['successor']" in str(e.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


def test_foreign_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {}, "epoch": 1, "payload": _Evil(str(marker))}, path)
    with pytest.raises(ValueError) as e:
        load_checkpoint(str(path))
    assert "not a checkpoint written by this framework" in str(e.value)
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:  # a plain pickle (not torch.save)
        pickle.dump({"a": 1}, f, protocol=2)
    with pytest.raises(ValueError) as e:
        load_checkpoint(str(tmp_path / "plain.pkl"))
    assert "not a checkpoint written by this framework" in str(e.value)


def test_damaged_or_wrong_content(tmp_path):
    path = save_checkpoint(_state(1), str(tmp_path))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated file, as a non-atomic writer would leave
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    assert "damaged" in str(e.value)
    torch.save({"weights": torch.ones(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError) as e:
        load_checkpoint(str(tmp_path / "x.pt"))
    assert "'state_dict'" in str(e.value) and "weights" in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pth.tar"))


# ---------------------------------------------------------------------------- trainers
def _toy(out, cls=ToyTrainer, epochs=4, **overrides):
    cfg = toy_cfg(str(out), epochs=epochs, name=cls.__name__)
    cfg.TEST.NO_TEST = True
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = v
    set_random_seed(cfg.SEED)
    return cls(cfg)


def test_checkpoint_of_another_trainer_is_refused(tmp_path):
    _toy(tmp_path, cls=OtherToyTrainer, epochs=1).train()
    other = _toy(tmp_path, epochs=2)
    with pytest.raises(ValueError) as e:
        other.train()  # resume from OtherToyTrainer's checkpoint
    msg = str(e.value)
    assert "saved by trainer 'OtherToyTrainer'" in msg and "this is trainer 'ToyTrainer'" in msg
    with pytest.raises(ValueError) as e:
        _toy(tmp_path / "x", epochs=1).load_model(str(tmp_path), epoch=1)
    assert "OtherToyTrainer" in str(e.value)


def test_persistent_workers_are_warned_about(tmp_path):
    class Persistent(WorkerToyTrainer):
        persistent_workers = True

    with pytest.warns(UserWarning, match="persistent_workers"):
        _toy(tmp_path, cls=Persistent, epochs=1).train()


def test_load_model_and_missing_paths(tmp_path):
    a = _toy(tmp_path, epochs=2)
    a.train()
    b = _toy(tmp_path / "b", epochs=2)
    b.load_model(str(tmp_path))  # no model-best: the latest epoch
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
    with pytest.raises(FileNotFoundError) as e:
        b.load_model(str(tmp_path), epoch=7)
    assert "model.pth.tar-7" in str(e.value) and "model.pth.tar-2" in str(e.value)
    c = _toy(tmp_path / "c", epochs=1, RESUME=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        c.train()
    assert "RESUME" in str(e.value)


def _final_state(out):
    ck = load_checkpoint(str(out / "model" / "model.pth.tar-4"))
    return ck["state_dict"], ck["optimizer"]


def _assert_same(run_a, run_b):
    (wa, oa), (wb, ob) = _final_state(run_a), _final_state(run_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for pid, st in oa["state"].items():
        assert torch.equal(st["momentum_buffer"], ob["state"][pid]["momentum_buffer"])


@pytest.mark.parametrize("cls", [GenToyTrainer, WorkerToyTrainer])
def test_crash_and_resume_in_process_with_loader_generator(tmp_path, cls):
    """A loader with its own torch.Generator (re-seeded per epoch), without and with workers."""
    _toy(tmp_path / "full", cls=cls).train()
    crashed = _toy(tmp_path / "resumed", cls=cls)
    crashed.crash_at = (2, 3)  # third epoch, fourth batch: after model.pth.tar-2 was written
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert latest_checkpoint(str(tmp_path / "resumed" / "model")).endswith("model.pth.tar-2")
    set_random_seed(5)  # whatever state the new process is in, the checkpoint's RNG states win
    resumed = _toy(tmp_path / "resumed", cls=cls)
    resumed.train()
    assert resumed.start_epoch == 2
    _assert_same(tmp_path / "full", tmp_path / "resumed")


def _run(out, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, SCRIPT, str(out), "--epochs", "4", "--seed", "1", "--no-test"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    killed = _run(tmp_path / "resumed", {"LOCOOP_TOY_SLEEP": "0.1"})
    # The uninterrupted reference runs here meanwhile (same code, one thread: same floats as a subprocess).
    _toy(tmp_path / "full").train()
    close_logger()
    log = tmp_path / "resumed" / "log.txt"
    try:
        deadline = time.time() + 120
        # model.pth.tar-1 exists once epoch 1 ended; wait until epoch 2 is half done, then kill
        while not (log.exists() and "epoch [2/4] batch [4/8]" in log.read_text()):
            assert killed.poll() is None, killed.stderr.read().decode()
            assert time.time() < deadline, "toy run made no progress"
            time.sleep(0.01)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    ckdir = tmp_path / "resumed" / "model"
    assert latest_checkpoint(str(ckdir)).endswith("model.pth.tar-1")  # killed mid-epoch 2
    assert not (ckdir / "model.pth.tar-2").exists()

    set_random_seed(123)  # a fresh process's RNG state is arbitrary; the checkpoint's states must win
    resumed = _toy(tmp_path / "resumed")  # resume here: a new trainer on the killed run's folder
    resumed.train()
    close_logger()
    assert resumed.start_epoch == 1
    text = log.read_text()
    assert "Found checkpoint" in text and "Previous epoch: 1" in text
    _assert_same(tmp_path / "full", tmp_path / "resumed")
