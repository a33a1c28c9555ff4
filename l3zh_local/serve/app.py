"""The OpenAI-compatible HTTP API and the chat page, as an ASGI app (Starlette) over an `Engine`.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events or not),
``GET /v1/models``, ``GET /health`` and the chat page at ``/``. Requests are validated strictly: malformed JSON,
unknown fields and wrong types are answered 400 with an OpenAI-style ``{"error": {...}}`` body.

Why not llama-cpp-python's own server (its ``[server]`` extra): it renders the chat with its own formatter and
tokenizes the rendered text with special tokens parsed (so a user's ``<|eot_id|>`` becomes a control token), stops
only on the EOS id and the stop strings it is given, and has one model behind one lock. This app uses the
project's one prompt path, the family's stop ids, holds split UTF-8 characters, and stops a generation whose client
went away. It runs on the same libraries (Starlette, uvicorn, pydantic).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .._version import __version__
from ..chat import sampling_for
from ..errors import InputError
from .engine import Engine, Job, RequestError

# -- request bodies ------------------------------------------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", strict=True)
MAX_BODY_BYTES = 16 * 2**20  # far more than any context holds; a larger body is refused before it fills memory


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # OpenAI's newer name for the system role.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text"]


class _Common(BaseModel):
    """Fields both completion endpoints take. top_k, min_p and repeat_penalty are llama.cpp's extensions."""

    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: Literal[1] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError("stop takes at most 4 strings", param="stop")
        return [s for s in stops if s]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]
    echo: Literal[False] | None = None
    logprobs: None = None
    suffix: None = None
    best_of: Literal[1] | None = None


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "list[", "str")))
    if first["type"] == "extra_forbidden":
        return f"unknown field '{where}' (this server does not support it)", where or None
    if first["type"] == "missing":
        return f"missing field '{where}'", where or None
    return f"invalid '{where}': {first['msg']}", where or None


# -- responses -----------------------------------------------------------------------------------------------------

def error_response(message: str, status: int = 400, *, param: str | None = None,
                   kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


class EventStream(Response):
    """A server-sent-event response that also watches for the client going away (and then calls `on_disconnect`).

    Starlette's StreamingResponse notices a disconnect only when it next sends; a request still waiting for a slot,
    or evaluating a long prompt, sends nothing for a while, so this one listens for ``http.disconnect`` itself.
    """

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None]):
        self.status_code = 200
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]  # no content-length: the body is sent in chunks
        self.events, self.on_disconnect = events, on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(lambda task: None if task.cancelled() else self.on_disconnect())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.events:
                if watcher.done():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not watcher.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were sending
            self.on_disconnect()
        finally:
            watcher.cancel()
            await self.events.aclose()  # type: ignore[attr-defined]


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# -- the app -------------------------------------------------------------------------------------------------------

class Api:
    def __init__(self, engine: Engine, *, api_key: str | None = None):
        self.engine = engine
        self.api_key = api_key
        self.created = int(time.time())
        # One worker thread per slot: a generation holds its thread for as long as it runs.
        self.workers = ThreadPoolExecutor(max_workers=len(engine.slots), thread_name_prefix="l3zh-slot")

    # auth and errors

    def _authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant-time compare, so the key cannot be guessed a character at a time from response times.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def guarded(self, handler):
        async def endpoint(request: Request) -> Response:
            if not self._authorized(request):
                return error_response("a valid API key is required: send the header 'Authorization: Bearer KEY'",
                                      401, kind="authentication_error", code="invalid_api_key")
            try:
                return await handler(request)
            except RequestError as err:
                return error_response(str(err), err.status, param=err.param, kind=err.kind, code=err.code)
            except InputError as err:
                return error_response(str(err), 400)
        return endpoint

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        # The body is read as JSON whatever its Content-Type says (`curl -d` sends a form type), as llama-server does.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB", status=413)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"the request body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            message, param = _validation_message(err)
            raise RequestError(message, param=param) from None

    # endpoints

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse({"status": "ok", "model": e.model_name, "slots": len(e.slots), "slots_busy": e.busy,
                             "queued": e.waiting, "requests": e.stats.requests, "completed": e.stats.completed,
                             "cancelled": e.stats.cancelled, "generated_tokens": e.stats.generated_tokens})

    async def models(self, request: Request) -> Response:
        e = self.engine
        family = e.family
        s = e.defaults
        meta = {
            "n_ctx": e.n_ctx, "n_ctx_train": e.n_ctx_train, "slots": len(e.slots),
            "family": family.name if family else None,
            "default_system": family.default_system if family else None,
            "stop_tokens": list(family.stop_tokens) if family else sorted(e.prompt.control_tokens),
            "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": s.min_p,
                         "repeat_penalty": s.repeat_penalty, "max_tokens": s.max_tokens},
        }
        # max_model_len as vLLM names it, so clients that read vLLM's field find the context here too.
        card = {"id": e.model_name, "object": "model", "created": self.created, "owned_by": "l3zh-local",
                "max_model_len": e.n_ctx, "meta": meta}
        return JSONResponse({"object": "list", "data": [card]})

    async def index(self, request: Request) -> Response:
        from .page import page_html

        return HTMLResponse(page_html(), headers={
            # The page runs only its own inline script; model output is never parsed as HTML (see page.py).
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
            "X-Content-Type-Options": "nosniff",
        })

    async def chat_completions(self, request: Request) -> Response:
        body: ChatRequest = await self._body(request, ChatRequest)
        messages = [m.plain() for m in body.messages]
        ids = await asyncio.to_thread(self.engine.chat_ids, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = self._job(body, ids, max_tokens)
        return await self._run(request, body, job, chat=True)

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await self._body(request, CompletionRequest)
        if isinstance(body.prompt, str):
            ids = await asyncio.to_thread(self.engine.text_ids, body.prompt)
        else:
            ids = list(body.prompt)
            self.engine.check_ids(ids)
        job = self._job(body, ids, body.max_tokens)
        return await self._run(request, body, job, chat=False)

    def _job(self, body: _Common, ids: list[int], max_tokens: int | None) -> Job:
        e = self.engine
        budget = e.budget(len(ids), max_tokens)
        bias: dict[int, float] = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= e.vocab.n_vocab():
                raise RequestError(f"logit_bias key {key!r} is not a token id of this model", param="logit_bias")
            bias[int(key)] = max(-100.0, min(100.0, value))
        sampling = sampling_for(e.family, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                min_p=body.min_p, repeat_penalty=body.repeat_penalty)
        return Job(ids=ids, sampling=sampling, max_tokens=budget, stop=body.stops(), seed=body.seed,
                   logit_bias=bias or None, presence_penalty=body.presence_penalty or 0.0,
                   frequency_penalty=body.frequency_penalty or 0.0)

    async def _run(self, request: Request, body: _Common, job: Job, *, chat: bool) -> Response:
        e = self.engine
        e.stats.requests += 1
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(self._events(job, rid, created, chat=chat, include_usage=usage), job.cancel.set)
        # Not streamed: still stop generating if the client goes away while waiting.
        watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
        watcher.add_done_callback(lambda task: None if task.cancelled() else job.cancel.set())
        pieces: list[str] = []
        generation = self._generate(job)
        try:
            async for piece in generation:
                pieces.append(piece)
        finally:
            watcher.cancel()
            await generation.aclose()
        text = "".join(pieces)
        usage_data = _usage(job)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": job.finish_reason}
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": e.model_name,
                                 "choices": [choice], "usage": usage_data})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason}
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": e.model_name,
                             "choices": [choice], "usage": usage_data})

    async def _generate(self, job: Job) -> AsyncGenerator[str, None]:
        """Hold a slot, run the job in a worker thread, yield its text as it comes."""
        e = self.engine
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        slot = await e.acquire()
        if job.cancel.is_set():  # the client left while the request was queued
            e.release(slot)
            e.stats.cancelled += 1
            job.finish_reason = "cancelled"
            return

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        def work() -> None:
            try:
                e.generate(slot, job, emit)
            except BaseException as err:  # noqa: BLE001 - handed to the event loop, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, err)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        future = loop.run_in_executor(self.workers, work)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    e.stats.failed += 1
                    raise item
                yield item
        finally:
            if not future.done():  # the consumer stopped early (client gone): the worker sees it within a token
                job.cancel.set()
            await asyncio.shield(future)
            e.release(slot)
            if job.finish_reason == "cancelled":
                e.stats.cancelled += 1
            elif job.finish_reason is not None:
                e.stats.completed += 1

    async def _events(self, job: Job, rid: str, created: int, *, chat: bool, include_usage: bool
                      ) -> AsyncGenerator[bytes, None]:
        model = self.engine.model_name
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta: dict = {"role": "assistant", "content": ""} if role else (
                    {"content": content} if content is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}

        if chat:
            yield _sse(chunk(role=True))
        generation = self._generate(job)
        try:
            async for piece in generation:
                yield _sse(chunk(piece))
        except Exception as err:  # noqa: BLE001 - the headers are sent: report it in the stream
            yield _sse({"error": {"message": f"generation failed: {err}", "type": "server_error", "param": None,
                                  "code": None}})
            return
        finally:
            # Closed here, not left to the garbage collector: its cleanup stops the worker and frees the slot.
            await generation.aclose()
        if job.finish_reason == "cancelled":
            return
        yield _sse(chunk(finish=job.finish_reason))
        if include_usage:
            yield _sse({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                        "usage": _usage(job)})
        yield b"data: [DONE]\n\n"


def _usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.ids) + job.completion_tokens}


def create_app(engine: Engine, *, api_key: str | None = None, page: bool = True) -> Starlette:
    """The ASGI app serving `engine`: the OpenAI-compatible API, /health, and (with page=True) the chat page."""
    api = Api(engine, api_key=api_key)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(f"no such endpoint: {request.method} {request.url.path}", 404, code="not_found")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(f"{request.method} is not allowed on {request.url.path}", 405)

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(f"internal error: {type(exc).__name__}: {exc}", 500, kind="server_error")

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.guarded(api.models), methods=["GET"]),
        Route("/v1/chat/completions", api.guarded(api.chat_completions), methods=["POST"]),
        Route("/v1/completions", api.guarded(api.completions), methods=["POST"]),
    ]
    if page:
        # The page is static (no model data in it): it is served without the key and asks for it.
        routes.append(Route("/", api.index, methods=["GET"]))
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed, 500: server_error})
    app.state.api = api
    app.state.version = __version__
    return app
