"""Atomic file output: every artifact is written to a temporary name and renamed into place.

A crash (or ``kill -9``) therefore never leaves a half-written file under the final name;
at worst a temporary file ``.{name}.tmp-{host}-{pid}-*`` is left behind, which no stage ever
reads and :func:`remove_stale_temps` deletes on the stage's next run once its writer (that
process on this host) is gone. A full disk while writing becomes :class:`OutOfSpaceError`
("no space left on <folder> (needed about N MB, M MB free)"), with the temporary file removed
and the previous file under the final name untouched.

Runs that must not overlap (two trainings of one run, two copies of one prediction shard)
hold a lock file with :func:`hold_lock`: the second start fails at once naming the holder.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.lib.errors import PipelineError

MB = 1 << 20


class OutOfSpaceError(PipelineError, OSError):
    """A write failed because the file system is full; the message says where and how much."""

    def __init__(self, folder: str | os.PathLike, needed: int | None = None,
                 written: int | None = None):
        free = free_bytes(folder)
        if needed is not None:
            amount = f"needed about {_mb(needed)}, {_mb(free)} free"
        elif written:
            amount = f"needed more than the {_mb(written)} written, {_mb(free)} free"
        else:
            amount = f"{_mb(free)} free"
        super().__init__(errno.ENOSPC, f"no space left on {folder} ({amount}): free some "
                         "space or point the output elsewhere, then rerun")
        self.folder = Path(folder)

    def __str__(self) -> str:
        return self.strerror


def _mb(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB"


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for this user on the file system of ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_out_of_space(exc: BaseException, folder: str | os.PathLike) -> bool:
    """Whether ``exc`` is a write that failed for lack of space in ``folder``.

    ``OSError(ENOSPC)`` says so. Some writers only report a short write: numpy's ``tofile``
    ("N requested and M written", no errno) and MXNet's streams (``MXNetError``
    "FileStream.Write incomplete"); those count as a full disk when it is indeed (nearly) full.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    short_write = (isinstance(exc, OSError) and exc.errno is None) or \
        type(exc).__name__ == "MXNetError"
    return short_write and "writ" in str(exc).lower() and free_bytes(folder) < 4 * MB


@contextlib.contextmanager
def out_of_space(folder: str | os.PathLike, needed: int | None = None,
                 written: Any = None) -> Iterator[None]:
    """Turn a write failure for lack of space inside the block into :class:`OutOfSpaceError`.

    ``written``: a callable returning the bytes written so far (for the message).
    """
    try:
        yield
    except OutOfSpaceError:
        raise
    except Exception as exc:
        if not is_out_of_space(exc, folder):
            raise
        raise OutOfSpaceError(folder, needed, written() if written else None) from None


def temp_prefix(path: str | os.PathLike) -> str:
    """``.{name}.tmp-{host}-{pid}-``: whose temporary file this is, for stale-file cleanup."""
    return f".{Path(path).name}.tmp-{_host()}-{os.getpid()}-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


_TEMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-")


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporary files in ``folder`` whose writer has died; return them.

    Only files named by :func:`temp_prefix` on this host count: another host's files (a
    shared file system) and a live process's are never touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, removed = _host(), []
    for path in (folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*")):
        match = _TEMP.match(path.name)
        if not match or match["host"] != host or _alive(int(match["pid"])):
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:  # another cleaner got there first
            pass
    return removed


def sweep_stale(stage: str, *folders: str | os.PathLike | None, recursive: bool = False
                ) -> list[Path]:
    """:func:`remove_stale_temps` in each folder a stage writes to, saying what went."""
    removed = [p for f in folders if f is not None
               for p in remove_stale_temps(f, recursive=recursive)]
    for path in removed:
        print(f"{stage}: removed {path}, left by an earlier run that did not finish")
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", needed: int | None = None
                ) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` is kept at the end of the temporary name for writers that choose a format from
    the extension (e.g. ``np.save`` appends ``.npy`` when it is missing). ``needed``: the
    bytes the file will take, if known, for the out-of-space message.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with out_of_space(path.parent, needed,
                          lambda: tmp_path.stat().st_size if tmp_path.exists() else 0):
            yield tmp_path
            tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600; final files: the usual
            _fsync(tmp_path)
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy", needed=int(np.asarray(array).nbytes)) as tmp:
        np.save(tmp, array)


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LockHeld(PipelineError, RuntimeError):
    """Another live process holds the lock: the same work is already running."""


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, what: str, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` while the block runs.

    A second process asking for it raises :class:`LockHeld` at once: ``{what} is already
    running (pid P on HOST); ...``. The lock is the kernel's ``flock``, so it goes with its
    holder: a ``kill -9`` never leaves a lock behind, and the next start takes the file over.
    The file says who holds it (for that message). ``remove``: delete the file at the end
    (while still holding it), for a lock file that must not stay among a run's outputs.
    Child processes forked inside the block share the lock until they exit.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LockHeld(f"{what} is already running ({holder}); wait for it or stop it "
                           f"before starting it again (lock {path})") from None
        # A holder that removed the file as we opened it: ours is no longer the lock file.
        try:
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        fh.close()


def lock_held(path: str | os.PathLike) -> bool:
    """Whether a live process holds the lock file ``path`` (see :func:`hold_lock`)."""
    try:
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except OSError:
        return True
