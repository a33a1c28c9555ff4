"""Run the server: bind first (a port in use is one line), load the model, serve until SIGTERM/SIGINT, drain, exit.

On SIGTERM or Ctrl-C the listening socket closes, requests already in flight (streaming or queued for a slot)
finish, then `serve` returns normally. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..chat import DEFAULT_CTX
from ..errors import InputError
from ..templates import family_from_file


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server reachable from other machines without a key, or None."""
    if is_loopback(host) or api_key:
        return None
    return (f"Warning: serving on {host} without --api-key: anyone who can reach this machine can use the model. "
            "Bind 127.0.0.1 or pass --api-key KEY.")


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound socket (not yet listening); InputError in one line when the address cannot be had."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise InputError(f"cannot resolve --host {host}: {err.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop (TIME_WAIT)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is already in use: stop what is using it or pass "
                             "--port N") from None
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def serve(gguf: str | Path, *, host: str = "127.0.0.1", port: int = 8000, ctx: int | str = DEFAULT_CTX,
          kv_type: str = "f16", parallel: int = 1, threads: int | None = None, gpu_layers: int = 0,
          api_key: str | None = None,
          template_file: str | Path | None = None, model_name: str | None = None, page: bool = True,
          log: Callable[[str], None] = print, access_log: bool = True,
          ready: Callable[[str], None] | None = None) -> None:
    """Serve `gguf` over HTTP (OpenAI-compatible API and chat page) until SIGTERM/SIGINT; return after draining.

    ctx: context tokens per slot, or "auto" (what the free memory holds, shared out among the slots). kv_type:
    the KV cache's type (f16, q8_0, q4_0). parallel: slots, each a llama.cpp context of its own (memory: one KV cache of
    `ctx` tokens each; the weights are shared). template_file: a Jinja chat template to use instead of the GGUF's
    own. ready: called with the base URL once the server accepts connections.
    """
    import uvicorn

    from .app import create_app
    from .engine import load_engine

    template = family = None
    if template_file is not None:
        family = family_from_file(Path(template_file))
        template = family.jinja
    sock = bind_socket(host, port)
    try:
        warning = bind_warning(host, api_key)
        if warning:
            log(warning)
        engine, loaded = load_engine(Path(gguf), n_ctx=ctx, parallel=parallel, threads=threads,
                                     gpu_layers=gpu_layers, kv_type=kv_type, template=template, family=family)
        if model_name:
            engine.model_name = model_name
        bound = sock.getsockname()
        shown_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        url = f"http://{shown_host}:{bound[1]}"
        family_name = engine.family.name if engine.family else "custom template"
        log(f"Serving {loaded.gguf.name} as '{engine.model_name}' ({family_name}) on {url}  "
            f"[{loaded.parallel} slot(s) x {loaded.n_ctx} tokens, {loaded.threads} thread(s) each, "
            f"loaded in {loaded.load_s:.1f} s]")
        log(f"  chat page {url}/   API {url}/v1   (Ctrl-C or SIGTERM: finish the requests in flight, then stop)")
        app = create_app(engine, api_key=api_key, page=page)
        config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                                timeout_graceful_shutdown=None, lifespan="off")
        server = _Server(config)
        if ready is not None:
            server.on_started = lambda: ready(url)
        sock.listen(128)
        server.run(sockets=[sock])
        if server.force_exit:
            raise KeyboardInterrupt
    finally:
        sock.close()


class _Server:
    """uvicorn's Server, but a signal only starts the graceful stop: it is not raised again afterwards (uvicorn
    re-raises it, so the process would die of SIGTERM instead of exiting 0 after draining)."""

    def __init__(self, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(inner) -> Iterator[None]:
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return

                def handle(sig, frame):
                    if inner.should_exit:  # a second signal: stop now
                        inner.force_exit = True
                    inner.should_exit = True

                previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            async def startup(inner, sockets=None) -> None:
                await super().startup(sockets=sockets)
                if self.on_started is not None and inner.started:
                    self.on_started()

        self.server = Server(config)
        self.on_started: Callable[[], None] | None = None

    @property
    def force_exit(self) -> bool:
        return self.server.force_exit

    def run(self, sockets) -> None:
        self.server.run(sockets=sockets)
        sys.stdout.flush()
