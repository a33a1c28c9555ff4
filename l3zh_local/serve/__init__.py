"""Serving what was exported: an OpenAI-compatible server with a chat page, and the files to serve elsewhere.

- `serve(gguf, ...)`: run the server until SIGTERM/Ctrl-C (`l3zh-local serve`).
- `create_app(engine, ...)` and `load_engine(gguf, ...)`: the ASGI app and the loaded model, for embedding.
- `write_bundles(gguf, family, ...)`: the llama-server command, the vLLM files and LM Studio's model.yaml.
"""

from .app import create_app
from .engine import Engine, StreamText, load_engine
from .server import bind_warning, serve

__all__ = ["Engine", "StreamText", "bind_warning", "create_app", "load_engine", "serve"]
