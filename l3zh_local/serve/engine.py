"""The generation side of the server: model slots, the prompt path, stops, and text safe to stream.

llama-cpp-python's `Llama` is not thread-safe, so each slot owns one (`--parallel N` loads N contexts over the same
memory-mapped weights) and a request holds a slot for the whole of its generation. Requests wait for a free slot in
arrival order. Generation runs in a worker thread; the event loop only moves text. Between two tokens the worker
looks at the request's cancel flag, so a client that goes away stops its generation within one token.

Prompts are made by `prompt.ChatPrompt` (the GGUF's own template, or the one given with --template-file), exactly
as `l3zh-local chat` makes them: control tokens only from the template, BOS only where the template prints it.
"""

from __future__ import annotations

import asyncio
import codecs
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat import gguf_family, load_model, sampling_for
from ..errors import InputError
from ..prompt import ChatPrompt, Message
from ..templates import ChatFamily, Sampling, detect_family


class RequestError(Exception):
    """A request the server refuses: answered with `status` and an OpenAI-style JSON error."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code


class StreamText:
    """Token bytes in, text out that is safe to show: whole UTF-8 characters only, and never a stop string.

    Bytes of a character split across tokens are held until its last byte arrives. Text that could be the start
    of a stop string is held until it is known not to be one; a stop string ends the reply and is not shown.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[:min(hits)], ""
            return out
        hold = self._held_tail()
        out, self._pending = self._pending[:len(self._pending) - hold], self._pending[len(self._pending) - hold:]
        return out

    def _held_tail(self) -> int:
        """Length of the longest end of the pending text that begins a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """What is left at the end of generation. The bytes of a character the generation stopped in the middle of
        (max_tokens reached) are dropped: half a character is not text, and U+FFFD would show as a broken one."""
        if self.stopped:
            return ""
        out, self._pending = self._pending, ""
        self._decoder.reset()
        return out


@dataclass
class Job:
    """One generation: prompt ids, sampling, budget, stops; filled in with the outcome."""

    ids: list[int]
    sampling: Sampling
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)
    # outcome
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", or "cancelled"
    stop_token: int | None = None
    time_to_first_token_s: float | None = None


@dataclass
class Slot:
    index: int
    llm: Any


@dataclass
class EngineStats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0


class Engine:
    """The loaded model: a vocabulary for prompts, N slots for generation, and the queue in front of them."""

    def __init__(self, slots: list[Any], vocab: Any, *, model_name: str, template: str | None = None,
                 family: ChatFamily | None = None):
        import llama_cpp

        if not slots:
            raise InputError("the server needs at least one model slot")
        self.slots = [Slot(i, llm) for i, llm in enumerate(slots)]
        self.vocab = vocab
        self.model_name = model_name
        self.prompt = ChatPrompt.from_llama(vocab, template)
        if template is not None:
            try:
                family = family or detect_family(template)
            except InputError:
                family = None
        self.family = family if family is not None else (gguf_family(vocab) if template is None else None)
        self.defaults = sampling_for(self.family)
        # llama.cpp may round the context up; llama-cpp-python's bookkeeping keeps the size asked for.
        first = self.slots[0].llm
        self.n_ctx = min(first.n_ctx(), len(first.input_ids))
        self.n_ctx_train = int(first._model.n_ctx_train())
        v = vocab._model.vocab
        self._is_eog = lambda t: bool(llama_cpp.llama_vocab_is_eog(v, t))
        family_stops = {self.prompt.control_tokens[t] for t in (self.family.stop_tokens if self.family else ())
                        if t in self.prompt.control_tokens}
        # Any control token ends a reply, as in `l3zh-local chat`: a header or end-of-turn token is template text.
        self.stop_ids = set(self.prompt.control_tokens.values()) | family_stops
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(v))
        self._free: asyncio.Queue[Slot] | None = None
        self.waiting = 0
        self.stats = EngineStats()

    # -- prompts ---------------------------------------------------------------------------------------------------

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.prompt.ids(messages)

    def text_ids(self, text: str) -> list[int]:
        """A plain completion prompt: BOS as the model's vocabulary asks, user text never parsed as control tokens."""
        return self.vocab.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=False)

    def check_ids(self, ids: Sequence[int]) -> None:
        n_vocab = self.vocab.n_vocab()
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is not in the vocabulary (0..{n_vocab - 1})", param="prompt")

    def budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """New-token budget: as asked, else the family's default; refuse what does not fit in the context."""
        if n_prompt == 0:
            raise RequestError("the prompt is empty", param="messages")
        room = self.n_ctx - n_prompt
        if room < 1:
            raise RequestError(
                f"the prompt is {n_prompt} tokens but the context is {self.n_ctx} tokens per slot: shorten the "
                f"conversation, or restart the server with a larger --ctx (the model was trained on "
                f"{self.n_ctx_train})", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            return min(self.defaults.max_tokens, room)
        if max_tokens > room:
            raise RequestError(
                f"the prompt is {n_prompt} tokens and max_tokens is {max_tokens}: {n_prompt + max_tokens} is more "
                f"than the context of {self.n_ctx} tokens per slot; ask for at most {room} new tokens or restart "
                "the server with a larger --ctx", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    # -- slots -----------------------------------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        return len(self.slots) - (self._free.qsize() if self._free is not None else len(self.slots))

    async def acquire(self) -> Slot:
        if self._free is None:  # made on first use, inside the server's event loop
            self._free = asyncio.Queue()
            for slot in self.slots:
                self._free.put_nowait(slot)
        self.waiting += 1
        try:
            return await self._free.get()
        finally:
            self.waiting -= 1

    def release(self, slot: Slot) -> None:
        assert self._free is not None
        self._free.put_nowait(slot)

    # -- generation (worker thread) ----------------------------------------------------------------------------------

    def generate(self, slot: Slot, job: Job, emit: Callable[[str], None]) -> None:
        """Run `job` on `slot`, passing text to `emit` as it becomes safe to show; sets the job's outcome."""
        llm = slot.llm
        s = job.sampling
        text = StreamText(job.stop)
        started = time.perf_counter()
        if job.seed is not None:
            llm.set_seed(job.seed)
        processors = None
        if job.logit_bias:
            processors = [_bias_processor(job.logit_bias)]
        try:
            for token in llm.generate(
                job.ids, temp=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                repeat_penalty=s.repeat_penalty, presence_penalty=job.presence_penalty,
                frequency_penalty=job.frequency_penalty, logits_processor=processors, reset=True,
            ):
                if job.time_to_first_token_s is None:
                    job.time_to_first_token_s = time.perf_counter() - started
                if job.cancel.is_set():
                    job.finish_reason = "cancelled"
                    break
                if token in self.stop_ids or self._is_eog(token):
                    job.stop_token, job.finish_reason = token, "stop"
                    break
                job.completion_tokens += 1
                piece = text.feed(llm.detokenize([token]))
                if piece:
                    emit(piece)
                if text.stopped:
                    job.finish_reason = "stop"
                    break
                if job.completion_tokens >= job.max_tokens:
                    job.finish_reason = "length"
                    break
            else:
                job.finish_reason = job.finish_reason or "stop"
            tail = text.flush()
            if tail and job.finish_reason != "cancelled":
                emit(tail)
        finally:
            if job.seed is not None:
                import llama_cpp

                llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED)  # back to a fresh random seed per request
            self.stats.generated_tokens += job.completion_tokens


def _bias_processor(bias: dict[int, float]):
    import numpy as np

    ids = np.array(list(bias), dtype=np.intc)
    values = np.array(list(bias.values()), dtype=np.single)

    def apply(input_ids, scores):
        scores[ids] += values
        return scores

    return apply


@dataclass(frozen=True)
class LoadedModel:
    """What `load_engine` made, for the startup line."""

    gguf: Path
    parallel: int
    threads: int
    n_ctx: int
    load_s: float


def load_engine(gguf: Path, *, n_ctx: int | str, parallel: int = 1, threads: int | None = None, gpu_layers: int = 0,
                kv_type: str = "f16", model_name: str | None = None, template: str | None = None,
                family: ChatFamily | None = None) -> tuple[Engine, LoadedModel]:
    """Load `parallel` contexts of `gguf` (each `n_ctx` tokens, sharing the memory-mapped weights) and a vocabulary.

    n_ctx "auto": the largest context the free memory holds (chat.resolve_context), shared out among the slots.
    """
    from ..chat import resolve_context
    from ..hardware import physical_cores

    if parallel < 1:
        raise InputError("--parallel must be at least 1")
    tokens, auto = resolve_context(Path(gguf), n_ctx, kv_type)
    if auto is not None:  # each slot has a KV cache of its own: the memory that fits one context serves all
        tokens = max(256, tokens // parallel // 256 * 256)
    if tokens < 16:
        raise InputError("--ctx must be at least 16 tokens")
    threads = threads or max(1, physical_cores() // parallel)
    started = time.monotonic()
    llms = [load_model(Path(gguf), n_ctx=tokens, kv_type=kv_type, threads=threads, gpu_layers=gpu_layers)
            for _ in range(parallel)]
    name = model_name or Path(gguf).name.removesuffix(".gguf")
    # Tokenizing reads only the vocabulary, never the context, so the event loop may tokenize with slot 0's model
    # while that slot generates (llama-server tokenizes in its HTTP threads the same way).
    engine = Engine(llms, llms[0], model_name=name, template=template, family=family)
    return engine, LoadedModel(Path(gguf), parallel, threads, engine.n_ctx, time.monotonic() - started)
