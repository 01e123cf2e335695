"""One run per output folder: an exclusive lock on ``OUTPUT_DIR/.lock``.

``train``, ``setar-finetune`` and ``setar-search`` take it (through
:func:`locoop.commands._common.prepare_run`) before they write anything into the folder, and hold it
for the run's life. The lock is an ``fcntl.flock`` on the open file, so the kernel drops it when the
process ends in any way (exit, exception, Ctrl-C, SIGKILL); a leftover ``.lock`` file of a dead run
never blocks anybody. The file holds the holder's pid, host, start time and command line, which a
refused second process prints.

The holder's description is written into the locked file itself (not by an atomic rename, which
would swap the inode and so lose the lock). Under torchrun only rank 0 locks: the other ranks are
part of the same run.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Dict, Optional

__all__ = ["LOCK_FILE", "RunLockedError", "acquire_run_lock", "release_run_lock", "release_all", "held_locks"]

LOCK_FILE = ".lock"

# realpath of the folder -> open file holding the lock (one per folder in this process).
_HELD: Dict[str, int] = {}


class RunLockedError(ValueError):
    """Another process holds the folder's lock (a ValueError: ``run_command`` prints it as one line)."""


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not written its details yet)"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('start', '?')}: "
            f"{info.get('command', '?')}")


def acquire_run_lock(output_dir: str, command: Optional[str] = None) -> Optional[str]:
    """Lock ``output_dir`` for this process (re-entrant within one process).

    Args:
        output_dir: The run folder (created if missing).
        command: Command line recorded in the lock file (default: ``sys.argv``).

    Returns:
        The lock file's path; None on a torchrun rank other than 0 (which does not lock).

    Raises:
        RunLockedError: another live process holds the lock; the message names it and the fix.
    """
    from . import dist

    if not dist.is_main_process():
        return None
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    path = os.path.join(key, LOCK_FILE)
    if key in _HELD:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        os.close(fd)
        raise RunLockedError(
            f"{output_dir} is in use by {_holder(path)}. One folder holds one run: wait until it ends, or "
            f"pass another --output-dir (OUTPUT_DIR) for a new run.") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "start": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command if command is not None else " ".join([os.path.basename(sys.executable)] + sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    _HELD[key] = fd
    return path


def release_run_lock(output_dir: str) -> None:
    """Release this process's lock on ``output_dir`` (no-op when it holds none). The file stays."""
    fd = _HELD.pop(os.path.realpath(output_dir), None)
    if fd is not None:
        try:
            os.ftruncate(fd, 0)  # a stale file then names nobody
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def release_all() -> None:
    """Release every lock this process holds (called when a command ends, however it ends)."""
    for key in list(_HELD):
        release_run_lock(key)


def held_locks() -> list:
    """Folders (real paths) this process holds locked."""
    return sorted(_HELD)
