"""A run folder is one run: the lock, the config recorded with the checkpoints, model-last, Ctrl-C.

Trains LoCoOp through ``python -m locoop train`` with the shipped method config (its checkpoint
schedule: ``TRAIN.CHECKPOINT_FREQ`` as shipped, i.e. only the final epoch) on a tiny CLIP and
generated images. The kill / Ctrl-C tests run real subprocesses through a wrapper that parks the run
after the first optimiser step of a chosen epoch (and writes a flag file), so the signal arrives at a
known point instead of a timed guess.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locoop.cli import main as cli_main
from locoop.commands._common import check_model_dir, final_checkpoint
from locoop.data.synthetic import make_imagenet_like
from locoop.engine import load_checkpoint
from locoop.engine.runlock import LOCK_FILE, acquire_run_lock, held_locks, release_run_lock

REPO = Path(__file__).resolve().parents[1]
DS_CFG = str(REPO / "configs/datasets/imagenet.yaml")
METHOD_CFG = str(REPO / "configs/trainers/LoCoOp/vit_b16_ep50.yaml")
EPOCHS = 4

# Parks the run after the first optimiser step of epoch LOCOOP_TEST_PAUSE_EPOCH (1-based), then runs the CLI.
_WRAPPER = r"""
import os, sys, time
from locoop.engine.trainer import TrainerBase
pause, flag = int(os.environ.get("LOCOOP_TEST_PAUSE_EPOCH", "0")), os.environ.get("LOCOOP_TEST_FLAG", "")
real = TrainerBase.model_update
def model_update(self, names=None):
    real(self, names)
    if self.epoch + 1 == pause:
        open(flag, "w").close()
        time.sleep(300)
TrainerBase.model_update = model_update
from locoop.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder_data")
    make_imagenet_like(str(root), num_classes=4, train_per_class=4, val_per_class=2, image_size=(36, 36), seed=0)
    return root


def train_args(data_root, backbone, out, *extra, lam="0.25", topk="2", epochs=EPOCHS):
    return ["train", "--root", str(data_root), "--trainer", "LoCoOp", "--dataset-config-file", DS_CFG,
            "--config-file", METHOD_CFG, "--backbone", str(backbone), "--output-dir", str(out), "--seed", "1",
            "--lambda_value", lam, "--topk", topk, *extra,
            "INPUT.SIZE", "(32,32)", "DATALOADER.NUM_WORKERS", "0", "TRAINER.LOCOOP.PREC", "fp32",
            "TRAINER.LOCOOP.N_CTX", "4", "DATASET.NUM_SHOTS", "4", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
            "OPTIM.MAX_EPOCH", str(epochs), "OPTIM.LR", "0.05", "TEST.NO_TEST", "True", "VERBOSE", "False"]


def cli(args, capsys):
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def spawn(args, pause_epoch=0, flag=""):
    env = dict(os.environ, OMP_NUM_THREADS="1", LOCOOP_TEST_PAUSE_EPOCH=str(pause_epoch), LOCOOP_TEST_FLAG=str(flag),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", _WRAPPER] + [str(a) for a in args], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended (rc {proc.returncode}) before {path.name}:\n{out[-2000:]}\n{err[-3000:]}")
        assert time.time() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def interrupt_in_process(monkeypatch, at_epoch: int) -> None:
    """Make the next in-process training raise KeyboardInterrupt after the first step of ``at_epoch`` (1-based)."""
    from locoop.engine.trainer import TrainerBase

    real = TrainerBase.model_update

    def model_update(self, names=None):
        real(self, names)
        if self.epoch + 1 == at_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainerBase, "model_update", model_update)


# ---------------------------------------------------------------------------- recorded config
def test_resume_with_a_changed_lambda_is_refused_and_config_yaml_untouched(tmp_path, data_root, tiny_vit_path,
                                                                           capsys, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_in_process(m, at_epoch=2)
        rc, _, err = cli(train_args(data_root, tiny_vit_path, out), capsys)
    assert rc == 130 and err.strip() == "python -m locoop train: stopped at epoch 2; the same command resumes from epoch 2"
    assert not held_locks()  # the lock ended with the command
    last = out / "prompt_learner" / "model-last.pth.tar"
    assert torch.load(last, weights_only=True)["epoch"] == 1  # recorded config is plain text: weights_only loads
    before = {n: (out / n).read_bytes() for n in ("config.yaml", "run_info.json", "log.txt")}

    rc, _, err = cli(train_args(data_root, tiny_vit_path, out, lam="0.5"), capsys)
    assert rc == 2
    assert "TRAINER.LOCOOP.LAMBDA: 0.25 -> 0.5" in err and "another --output-dir" in err
    assert "OPTIM" not in err.split("Differing keys")[1].split("Start a new run")[0]  # only what differs
    assert {n: (out / n).read_bytes() for n in before} == before  # nothing rewritten, nothing logged

    # A key that does not change the trained result (print frequency) resumes, and config.yaml says so.
    rc, _, err = cli(train_args(data_root, tiny_vit_path, out, "TRAIN.PRINT_FREQ", "3"), capsys)
    assert rc == 0, err
    log = (out / "log.txt").read_text()
    assert "Previous epoch: 1" in log and "model-last.pth.tar" in log
    assert "PRINT_FREQ: 3" in (out / "config.yaml").read_text()
    final = load_checkpoint(str(out / "prompt_learner" / f"model.pth.tar-{EPOCHS}"))
    assert "LAMBDA: 0.25" in final["config"]


def test_skip_finished_with_a_changed_topk_is_refused(tmp_path, data_root, tiny_vit_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(train_args(data_root, tiny_vit_path, out, epochs=1), capsys)
    assert rc == 0, err
    rc, out_text, err = cli(train_args(data_root, tiny_vit_path, out, "--skip-finished", topk="3", epochs=1), capsys)
    assert rc == 2 and "TRAINER.LOCOOP.TOPK: 2 -> 3" in err and "another --output-dir" in err
    assert "skipping it." not in out_text
    # Same training keys (another worker count): still finished, skipped.
    args = train_args(data_root, tiny_vit_path, out, "--skip-finished", epochs=1)
    args[args.index("DATALOADER.NUM_WORKERS") + 1] = "1"
    rc, out_text, _ = cli(args, capsys)
    assert rc == 0 and "skipping it" in out_text


def test_checkpoint_without_a_recorded_config_is_accepted_with_a_note(tmp_path, capsys):
    from locoop.engine.checkpoint import check_recorded_config

    from locoop.config import get_cfg_default

    check_recorded_config({"state_dict": {}, "epoch": 1}, get_cfg_default(), "old.pth.tar")
    assert "records no config" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the lock
def test_a_second_process_on_a_locked_folder_is_refused(tmp_path, data_root, tiny_vit_path, lock_holder):
    out = tmp_path / "run"
    holder = lock_holder(out, "holder-command --output-dir x")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "locoop"] + train_args(data_root, tiny_vit_path, out),
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    line = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(line) == 1 and f"pid {holder.pid}" in line[0] and "holder-command" in line[0]
    assert "--output-dir" in line[0] and "wait" in line[0]
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # no log.txt, config.yaml or checkpoint of the refused run
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # A SIGKILLed holder leaves the file but not the lock.
    assert acquire_run_lock(str(out)) is not None
    release_run_lock(str(out))


# ---------------------------------------------------------------------------- kill, Ctrl-C, resume
def _final(out: Path) -> dict:
    return load_checkpoint(str(out / "prompt_learner" / f"model.pth.tar-{EPOCHS}"))


def test_sigkill_after_epoch_2_resumes_at_epoch_3_bit_identical(tmp_path, data_root, tiny_vit_path):
    killed_dir, full_dir, flag = tmp_path / "killed", tmp_path / "full", tmp_path / "paused"
    killed = spawn(train_args(data_root, tiny_vit_path, killed_dir), pause_epoch=3, flag=flag)
    full = spawn(train_args(data_root, tiny_vit_path, full_dir))  # the uninterrupted reference, meanwhile
    try:
        wait_for(flag, killed)  # epoch 3 has taken an optimiser step
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate()
    ckdir = killed_dir / "prompt_learner"
    assert sorted(os.listdir(ckdir)) == ["model-last.pth.tar"]  # the shipped schedule saves only the final epoch
    assert load_checkpoint(str(ckdir / "model-last.pth.tar"))["epoch"] == 2
    assert final_checkpoint(str(killed_dir), EPOCHS) is None  # not mistaken for a finished run

    resumed = spawn(train_args(data_root, tiny_vit_path, killed_dir))  # the same command again
    r_out, r_err = resumed.communicate(timeout=300)
    f_out, f_err = full.communicate(timeout=300)
    assert resumed.returncode == 0 and full.returncode == 0, r_err[-3000:] + f_err[-3000:]
    log = (killed_dir / "log.txt").read_text()
    assert "Previous epoch: 2" in log and "epoch [3/4]" in log.split("Previous epoch: 2")[1]
    assert "epoch [1/4]" not in log.split("Previous epoch: 2")[1]
    a, b = _final(killed_dir), _final(full_dir)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    # Finished: model-last is gone, evaluation finds the final epoch as before.
    assert check_model_dir(str(killed_dir)) == {"prompt_learner": [f"model.pth.tar-{EPOCHS}"]}
    assert not (ckdir / "model-last.pth.tar").exists()


def test_ctrl_c_says_where_the_same_command_resumes(tmp_path, data_root, tiny_vit_path):
    out, flag = tmp_path / "run", tmp_path / "paused"
    proc = spawn(train_args(data_root, tiny_vit_path, out), pause_epoch=3, flag=flag)
    try:
        wait_for(flag, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "python -m locoop train: stopped at epoch 3; the same command resumes from epoch 3"
    # The lock went with the process: a new run in the folder may start.
    assert acquire_run_lock(str(out)) is not None
    release_run_lock(str(out))


def test_resume_takes_the_newer_of_model_last_and_the_latest_epoch_file(tmp_path):
    from locoop.engine.checkpoint import LAST_FILE, resume_checkpoint, save_checkpoint

    def state(epoch):
        return {"state_dict": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}

    assert resume_checkpoint(str(tmp_path)) is None
    save_checkpoint(state(1), str(tmp_path), model_name=LAST_FILE)
    assert resume_checkpoint(str(tmp_path)).endswith(LAST_FILE)  # killed before any epoch file
    save_checkpoint(state(2), str(tmp_path))  # killed between the epoch file and removing the older model-last
    assert resume_checkpoint(str(tmp_path)).endswith("model.pth.tar-2")
    save_checkpoint(state(3), str(tmp_path), model_name=LAST_FILE)
    assert resume_checkpoint(str(tmp_path)).endswith(LAST_FILE)


def test_training_keys_are_what_changes_the_trained_result():
    from locoop.config import get_cfg_default
    from locoop.config.training_keys import config_text, differing_training_keys

    old = get_cfg_default()
    new = get_cfg_default()
    new.OUTPUT_DIR, new.RESUME, new.DATALOADER.NUM_WORKERS, new.TRAIN.PRINT_FREQ = "elsewhere", "x", 1, 3
    new.MODEL.DEVICE, new.DATASET.ROOT, new.VERBOSE, new.OOD.T, new.TRAIN.CHECKPOINT_FREQ = "cpu", "/d", False, 2.0, 5
    new.INPUT.SIZE = list(old.INPUT.SIZE)  # a tuple read back from YAML as a list is the same value
    assert differing_training_keys(config_text(old), new) == []
    new.OPTIM.LR, new.SEED, new.DATALOADER.TRAIN_X.BATCH_SIZE, new.TEST.FINAL_MODEL = 0.5, 7, 8, "best_val"
    assert [k for k, _, _ in differing_training_keys(config_text(old), new)] == [
        "DATALOADER.TRAIN_X.BATCH_SIZE", "OPTIM.LR", "SEED", "TEST.FINAL_MODEL"]
