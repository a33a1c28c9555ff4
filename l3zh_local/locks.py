"""Locks on things two l3zh-local processes may share: an output folder, a cache entry (converter, demo, fixtures).

A lock is an OS file lock (flock through the filelock package) on a hidden file beside what it protects. The kernel
drops it when its holder dies, even by kill -9, so a stale lock never blocks anyone. The holder's pid goes in a
side file, not the lock file itself: filelock truncates the lock file each time someone opens it to wait.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import Busy


def lock_path_for(entry: Path) -> Path:
    """The lock file of a folder or file: hidden, beside it."""
    entry = Path(entry)
    return entry.with_name(f".{entry.name}.lock")


def _pid_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".pid")


def holder_pid(lock_path: Path) -> int | None:
    """The pid recorded by the current (or last) holder of `lock_path`, if it is still alive."""
    try:
        pid = int(_pid_path(lock_path).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def hold(lock_path: Path, what: str, *, wait: bool = True,
         log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock at `lock_path` for the block; `what` names the shared thing in messages.

    If another process holds it: say so (with its pid) and wait, or raise Busy at once when `wait` is False.
    Waiting polls, so Ctrl-C still works while waiting.
    """
    from filelock import FileLock, Timeout

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = holder_pid(lock_path)
        who = f"another l3zh-local (pid {pid})" if pid else "another l3zh-local"
        if not wait:
            raise Busy(f"{what} is in use by {who}; wait for it to finish, or run again without --no-wait "
                       "to wait for it") from None
        (log or _to_stderr)(f"Waiting for {who}, which is using {what}...")
        lock.acquire()
    try:
        from .files import write_text_atomic

        write_text_atomic(_pid_path(lock_path), f"{os.getpid()}\n")
        yield
    finally:
        _pid_path(lock_path).unlink(missing_ok=True)
        lock.release()
