"""User-facing errors: each prints as one line and exits with code 2, never as a traceback."""

from __future__ import annotations


class L3zhError(Exception):
    """A problem the user can fix. `str(err)` is the whole message: what is wrong and what to do."""

    exit_code = 2


class InputError(L3zhError):
    """A model, adapter, path or option that cannot be used as given."""


class UnsupportedArchitecture(InputError):
    """The model is not a Llama-family decoder."""


class OfflineError(L3zhError):
    """Something had to be downloaded and the network (or the hub) could not be reached."""


class ToolchainError(L3zhError):
    """The pinned llama.cpp tooling is missing or failed."""


class DiskSpaceError(L3zhError):
    """Not enough free disk for what is about to be written."""


class OutputExists(L3zhError):
    """An output file is already there and --force was not given."""


class Busy(L3zhError):
    """Another l3zh-local process holds the output folder or cache entry, and --no-wait was given."""
