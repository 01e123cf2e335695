"""Atomic file and folder writes: a killed writer leaves the old version or none, never half a file.

Every file is written to a temporary sibling in the same folder (same file system, so the final
``os.replace`` is atomic), flushed and fsynced, then renamed over the target; the folder itself is
fsynced after the rename so the new name survives a power cut. A folder is built under a temporary
sibling name and renamed into place once complete. Files and folders get the permissions a plain
``open()`` / ``mkdir()`` would give them under the user's umask (``tempfile`` alone gives 0600 /
0700, which colleagues on a shared server cannot read).

Temporary names are hidden and carry their writer: ``.<name>.<host>-<pid>-<random><suffix>``
(suffix ``.tmp``, or e.g. ``.part`` for downloads). A writer removes its temporary file on any
exception; one killed outright leaves it behind, and :func:`remove_stale_temps` deletes those whose
process is gone (same host) -- readers never see them, since no final name is ever a temporary one.

The framework re-exports these helpers as :mod:`locoop.engine.fileio`; they live in the CLIP
package so that its downloads and checkpoint writers use them without depending on the framework.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Union

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save", "atomic_copy",
           "atomic_folder", "make_temp_folder", "publish_folder", "temp_name", "is_temp_name", "temp_owner",
           "remove_stale_temps", "current_umask", "TMP_SUFFIX"]

PathLike = Union[str, os.PathLike]
TMP_SUFFIX = ".tmp"

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}(?P<suffix>\.[A-Za-z0-9]+)$")
# Written by earlier versions: checkpoint temps ".<name>.<random>.tmp" (no owner recorded) and
# feature-cache folders ".tmp-<host>-<pid>-<8 hex>-<name>".
_LEGACY_FILE_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
_LEGACY_FOLDER_RE = re.compile(r"^\.tmp-(?P<host>.+?)-(?P<pid>\d+)-[0-9a-f]{8}-.+$")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "host"


def _host() -> str:
    return _slug(socket.gethostname())


def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_name(name: str, suffix: str = TMP_SUFFIX) -> str:
    """A fresh hidden temporary name for ``name`` that records this host and process."""
    return f".{name}.{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def is_temp_name(name: str) -> bool:
    """True for temporary names written by :func:`temp_name` (and by earlier versions' writers)."""
    return bool(_TEMP_RE.match(name) or _LEGACY_FOLDER_RE.match(name)
                or (name.startswith(".") and _LEGACY_FILE_RE.match(name)))


def temp_owner(name: str) -> Optional[tuple]:
    """``(host, pid)`` of the process that wrote temporary ``name``, or None when not recorded."""
    m = _TEMP_RE.match(name) or _LEGACY_FOLDER_RE.match(name)
    if m is None:
        return None
    return _slug(m.group("host")), int(m.group("pid"))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_dir(path: PathLike) -> None:
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # not permitted on some platforms; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def atomic_write(path: PathLike, write_fn: Callable[[IO], Any], mode: str = "wb", suffix: str = TMP_SUFFIX,
                 encoding: Optional[str] = None) -> Path:
    """Write ``path`` atomically: ``write_fn(f)`` fills a temporary sibling, which then replaces ``path``.

    Args:
        path: the target (its folder is created when missing).
        write_fn: writes the content to the open file ``f``; raising aborts the write (the temporary
            file is removed and ``path`` keeps its old content, if any).
        mode: ``"wb"`` or ``"w"`` (text; ``encoding`` default UTF-8, newlines untranslated).
        suffix: suffix of the temporary name (``.part`` for downloads).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / temp_name(path.name, suffix)
    # O_EXCL: the name is fresh; 0o666 & ~umask: the permissions a plain open() gives.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        e.filename = str(path)  # name the file asked for (in its folder), not the temporary sibling
        raise
    try:
        kwargs = {"encoding": encoding or "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):
            # A full disk fails in write() / fsync() with no path (or the temporary name): name the file asked for.
            e.filename = str(path)
        raise
    _fsync_dir(folder)
    return path


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text), mode="w", encoding=encoding)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: PathLike, dst: PathLike) -> Path:
    """Copy the bytes of ``src`` to ``dst`` atomically."""
    def _copy(f: IO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)

    return atomic_write(dst, _copy)


def make_temp_folder(final: PathLike) -> Path:
    """Create (with the umask's permissions) the temporary sibling folder in which ``final`` is built."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / temp_name(final.name)
    tmp.mkdir(mode=0o777)
    return tmp


def publish_folder(tmp: PathLike, final: PathLike, replace: bool = True) -> Path:
    """Rename the complete folder ``tmp`` to ``final``.

    An existing ``final`` is moved aside under a temporary name first and deleted after the rename
    (``replace=True``), so at every moment ``final`` is either the old complete folder or the new one.

    Raises:
        FileExistsError: ``final`` exists and ``replace`` is False.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        if not replace:
            raise FileExistsError(f"{final} exists; pass replace=True to replace it")
        old = final.parent / temp_name(final.name + ".old")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_folder(final: PathLike, replace: bool = True) -> Iterator[Path]:
    """Build a folder atomically: write into the yielded temporary folder; it becomes ``final`` on success.

    On an exception the temporary folder is deleted and ``final`` is left as it was::

        with atomic_folder(out / "entry") as tmp:
            atomic_write_text(tmp / "manifest.json", text)
    """
    tmp = make_temp_folder(final)
    try:
        yield tmp
        publish_folder(tmp, final, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: PathLike, legacy: bool = False, max_age_s: Optional[float] = None) -> int:
    """Delete temporary files and folders in ``folder`` left by writers that were killed.

    A temporary name records its writer's host and process id: it is stale when that process no
    longer runs on this host. Temporaries of other hosts (a shared file system) are kept unless
    older than ``max_age_s``.

    Args:
        folder: the folder to clean (missing: nothing to do).
        legacy: also delete hidden ``*.tmp`` names that record no writer (left by earlier versions;
            only safe where one process writes the folder, e.g. a run's checkpoint folder).
        max_age_s: also delete any temporary older than this many seconds.

    Returns:
        The number of entries deleted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    host, now, n = _host(), time.time(), 0
    for p in folder.iterdir():
        if not is_temp_name(p.name):
            continue
        owner = temp_owner(p.name)
        if owner is None:
            stale = legacy
        else:
            stale = owner[0] == host and not _alive(owner[1])
        if not stale and max_age_s is not None:
            with contextlib.suppress(OSError):
                stale = now - p.lstat().st_mtime > max_age_s
        if stale:
            _remove(p)
            n += 1
    return n

