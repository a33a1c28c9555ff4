"""Ctrl-C and SIGTERM: stop whatever runs, in every phase, and let the clean-up code run on the way out.

Python turns SIGINT into KeyboardInterrupt only if SIGINT was not ignored when it started. A process started in
the background by a script or a CI runner (`cmd &` without job control) inherits SIGINT ignored, and Ctrl-C (or
`kill -INT`) then did nothing at all: the export ran to its end and exited 0. The CLI therefore installs its own
handlers. SIGTERM, by default, kills Python without running any `finally`, which leaves `*.partial` files and
child processes behind; here it raises Terminated instead, so it unwinds like Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM. A BaseException, like KeyboardInterrupt: `except Exception` code
    does not swallow it, and `except KeyboardInterrupt` code (chat's "stop this reply") does not mistake it."""


EXIT_CODES = {KeyboardInterrupt: 128 + signal.SIGINT, Terminated: 128 + signal.SIGTERM}


def _raise_terminated(_signum, _frame) -> None:
    raise Terminated


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For the block: SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated, whatever was inherited."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def wait_or_kill(proc: subprocess.Popen) -> int:
    """Wait for a child; if we are interrupted meanwhile, kill it (it may ignore or catch SIGINT) and re-raise."""
    try:
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
