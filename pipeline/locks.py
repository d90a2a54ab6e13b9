"""File locks that end with the process that took them, forked children included.

``flock`` belongs to an open file, and a forked child shares its parent's open files. vLLM starts
its engine processes by forking on GPU hosts, so a run killed with ``kill -9`` would leave its run
folder and its result cache locked for as long as those children live (until the watchdog in
``pipeline.reaper`` ends them). Every lock taken here is closed in each forked child, so the
kernel drops it the moment the process that took it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

_held: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def close_in_children(fd: int) -> None:
    """Have forked children close ``fd`` (a file this process holds a lock through)."""
    _held.add(fd)


def closing(fd: int) -> None:
    """``fd`` is about to be closed by its owner: children forked later need not close it."""
    _held.discard(fd)


class Lock:
    """An ``flock`` on a file (created if missing), held until ``release`` or process end."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        _held.add(fd)

    def write(self, text: str) -> None:
        """Say who holds the lock, for the message another process shows when it is refused."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def release(self) -> None:
        if self.fd in _held:
            _held.discard(self.fd)
            os.close(self.fd)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take(path: Path, *, shared: bool = False, wait: bool = False) -> Lock | None:
    """Lock ``path``; None when another process holds it (and ``wait`` is off).

    The lock file stays in place; if someone removed and recreated it while this process waited,
    the lock taken was on a file nobody else will ever open, so it is taken again on the new one.
    """
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return Lock(path, fd)
        os.close(fd)


def held_by_other(path: Path) -> bool:
    """Whether another process holds a lock on ``path`` (shared or exclusive). Only reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def holder(path: Path) -> str:
    """What the lock file says about its holder, or a neutral phrase."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
    except OSError:
        return "another process"
