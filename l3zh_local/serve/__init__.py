"""Serving what was exported: an OpenAI-compatible server with a chat page, and the files to serve elsewhere.

- `serve(gguf, ...)`: run the server until SIGTERM/Ctrl-C (`l3zh-local serve`).
- `load_engine(gguf, ...)` and `create_app(engine, ...)`: the loaded model and the ASGI app, for embedding.
- `write_bundles(gguf, family, ...)`: the llama-server command, LM Studio's model.yaml and the vLLM files.

Imports are lazy, so `export` (which writes the bundles) does not load the web stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"create_app": "app", "Engine": "engine", "StreamText": "engine", "load_engine": "engine",
          "bind_warning": "server", "serve": "server", "VllmSource": "bundles", "write_bundles": "bundles"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
