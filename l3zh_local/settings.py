"""Where l3zh-local keeps things, configured by documented environment variables.

- ``L3ZH_CACHE``: cache root (default ``$XDG_CACHE_HOME/l3zh-local`` or ``~/.cache/l3zh-local``).
- ``L3ZH_LLAMA_CPP``: a llama.cpp checkout to take the converter from instead of the pinned sdist.
- ``L3ZH_LLAMA_CPP_SDIST``: a local ``llama_cpp_python-*.tar.gz`` to unpack instead of downloading it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("L3ZH_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "l3zh-local"


def llama_cpp_override() -> Path | None:
    value = os.environ.get("L3ZH_LLAMA_CPP")
    return Path(value).expanduser() if value else None


def sdist_override() -> Path | None:
    value = os.environ.get("L3ZH_LLAMA_CPP_SDIST")
    return Path(value).expanduser() if value else None
