"""One fastdpo run per output directory: ``.fastdpo.lock``, holding the owner's pid and host.

The lock is an ``flock`` on that file, so the kernel drops it when its process ends, however it
ends; the pid and host written in the file name the holder in the error a second run gets, at once.
A lock file whose process is gone (killed before it could remove the file) is taken over with a
notice. Where ``flock`` is not available (some network file systems) the pid decides instead: the
lock of a live process on this host, or of any process on another host, is held.

Within one process the lock is re-entrant (the command takes it, then the trainer's writes take it
again); it is released, and its file removed, when the outermost holder lets go, also on errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import socket
import time
from collections.abc import Iterator

from fastdpo.train.checkpoint import notice

try:
    import fcntl
except ImportError:  # not POSIX: the pid rule alone
    fcntl = None

LOCK_FILE = ".fastdpo.lock"


class OutputDirLocked(ValueError):
    """Another fastdpo run holds the output directory; the message names it (pid, host)."""


_held: dict[str, list] = {}  # real path of the directory -> [file descriptor, depth]


@contextlib.contextmanager
def hold(directory: str | os.PathLike) -> Iterator[bool]:
    """Hold ``directory``'s lock for the ``with`` block; yields True when this call took it
    (the outermost holder in this process), False when the process already held it."""
    key = os.path.realpath(directory)
    if key in _held:
        _held[key][1] += 1
        try:
            yield False
        finally:
            _held[key][1] -= 1
        return
    path = pathlib.Path(directory) / LOCK_FILE
    _held[key] = [_acquire(path), 1]
    try:
        yield True
    finally:
        fd, _ = _held.pop(key)
        _release(path, fd)


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since', '?')})"


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        holder = json.loads(raw)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise


def _alive(holder: dict) -> bool:
    """Whether the process that wrote ``holder`` may still run (any process on another host may)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(path: pathlib.Path) -> int:
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = _flock(fd)
        holder = _read(fd)
        if locked is None and holder and holder.get("pid") != os.getpid() and _alive(holder):
            locked = False
        if locked is False:
            if not holder:  # the holder has just created the file and not yet written itself into it
                time.sleep(0.1)
                holder = _read(fd)
            os.close(fd)
            raise OutputDirLocked(
                f"{path.parent} is in use by another fastdpo run: {describe(holder)} holds {path}"
            )
        try:  # the holder we waited on may have removed the file in between: lock the one in place
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        if holder:
            notice(f"{path}: took over the stale lock of {describe(holder)}, which no longer runs")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        return fd
    raise OutputDirLocked(f"{path}: could not take the lock (other processes keep replacing it)")


def _release(path: pathlib.Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):  # removed while still locked, then unlocked
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    os.close(fd)
