"""User-facing errors: each prints as one line and exits with code 2, never as a traceback.

Each also subclasses the builtin exception it is a kind of (as huggingface_hub's errors do), so library users can
catch either: ``except FileExistsError`` catches `OutputExists`.
"""

from __future__ import annotations


class L3zhError(Exception):
    """A problem the user can fix. `str(err)` is the whole message: what is wrong and what to do."""

    exit_code = 2


class InputError(L3zhError, ValueError):
    """A model, adapter, path or option that cannot be used as given."""


class UnsupportedArchitecture(InputError):
    """The model is not a Llama-family decoder."""


class OfflineError(L3zhError, ConnectionError):
    """Something had to be downloaded and the network (or the hub) could not be reached."""


class ToolchainError(L3zhError, RuntimeError):
    """The pinned llama.cpp tooling is missing, damaged or failed."""


class DiskSpaceError(L3zhError, OSError):
    """Not enough free disk for what is about to be written."""


class OutputExists(L3zhError, FileExistsError):
    """An output file is already there and --force was not given."""


class Busy(L3zhError, BlockingIOError):
    """Another l3zh-local process holds the output folder or cache entry, and --no-wait was given."""
