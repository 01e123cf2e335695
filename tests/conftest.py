"""Shared fixtures: tiny random-weight CLIP checkpoints in OpenAI's format (both file kinds).

Tests force the CPU (as open_clip's do) so results do not depend on the machine.
"""
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("CLIP_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".clip_cache_unused"))

import pytest  # noqa: E402

from clip.tiny import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


def _checkpoint(checkpoint_dir, like: str, fmt: str) -> str:
    path = checkpoint_dir / f"{like}.{'jit.pt' if fmt == 'torchscript' else 'pt'}"
    if not path.exists():
        make_tiny_checkpoint(path, like=like, fmt=fmt, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_vit_path(checkpoint_dir) -> str:
    """State-dict file of the ``tiny-vit`` architecture."""
    return _checkpoint(checkpoint_dir, "tiny-vit", "state_dict")


@pytest.fixture(scope="session")
def tiny_vit_jit_path(checkpoint_dir) -> str:
    """TorchScript archive (OpenAI's shipping format) of the same ``tiny-vit`` weights."""
    return _checkpoint(checkpoint_dir, "tiny-vit", "torchscript")


@pytest.fixture(scope="session")
def tiny_rn_path(checkpoint_dir) -> str:
    return _checkpoint(checkpoint_dir, "tiny-rn", "state_dict")


@pytest.fixture(scope="session")
def tiny_rn_jit_path(checkpoint_dir) -> str:
    return _checkpoint(checkpoint_dir, "tiny-rn", "torchscript")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny tensors gain nothing from more, and a busy CPU makes them wait."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _close_trainer_logger():
    """Trainers tee stdout into OUTPUT_DIR/log.txt; undo that after every test."""
    yield
    from locoop.engine.logger import close_logger

    close_logger()


_LOCK_HOLDER = r"""
import sys, time
from locoop.engine.runlock import acquire_run_lock
acquire_run_lock(sys.argv[1], command=sys.argv[2])
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def lock_holder():
    """``hold(folder, command)``: another process holding ``folder``'s run lock as ``command`` would;
    returns its ``Popen`` once the lock is held. Every holder is SIGKILLed at the end of the test."""
    import signal
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holders = []

    def hold(folder, command):
        proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(folder), command], cwd=repo, env=env,
                                stdout=subprocess.PIPE, text=True)
        holders.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield hold
    for proc in holders:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

