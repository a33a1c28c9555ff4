"""Chat with a GGUF on a laptop CPU (llama-cpp-python): a `ChatSession`, a one-shot `chat()`, the terminal loop.

The conversation is rendered with the GGUF's own chat template every turn and tokenized injection-safe by
`prompt.ChatPrompt` (control tokens only from the template). llama-cpp-python's ``generate`` keeps the evaluated
tokens and their KV cache and, given the whole conversation again, evaluates only the part after the longest
common prefix, so the wait before the first token does not grow with the conversation.

Defaults (system prompt, sampling) come from the chat family the GGUF's template belongs to. The context defaults
to "auto": the largest the free memory holds with the model, up to the model's own (memory.choose_context).
"""

from __future__ import annotations

import codecs
import ctypes
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import memory
from .errors import InputError
from .hardware import physical_cores
from .prompt import ChatPrompt
from .templates import ChatFamily, Sampling, detect_family

COMMANDS_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"
USER_PROMPT = ">>> "
DEFAULT_CTX: int | str = "auto"  # or a number of tokens
# llama.cpp's cache types, by the names users give.
_GGML_KV_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}


@dataclass
class TurnStats:
    """What one turn cost: tokens in the prompt, how many of them came from the cache, timings."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    generation_s: float = 0.0
    stop_token: int | None = None
    trimmed_messages: int = 0

    @property
    def evaluated_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    def line(self) -> str:
        speed = self.generated_tokens / self.generation_s if self.generation_s > 0 else 0.0
        trimmed = f", {self.trimmed_messages} old messages dropped" if self.trimmed_messages else ""
        return (f"[prompt {self.prompt_tokens} tokens ({self.evaluated_tokens} new, {self.reused_tokens} from cache)"
                f"{trimmed}, {self.generated_tokens} generated, first token {self.time_to_first_token_s:.2f} s, "
                f"{speed:.1f} tokens/s]")


def resolve_context(gguf: Path, n_ctx: int | str = DEFAULT_CTX, kv_type: str = "f16"
                    ) -> tuple[int, memory.ContextChoice | None]:
    """A number of tokens for `n_ctx`: itself, or for "auto" the largest that fits the free memory (and the choice).
    """
    if isinstance(n_ctx, str):
        if n_ctx.strip().lower() != "auto":
            try:
                n_ctx = int(n_ctx)
            except ValueError:
                raise InputError(f"--ctx must be a number of tokens or auto, not {n_ctx!r}") from None
        else:
            choice = memory.choose_context(Path(gguf), kv_type=kv_type)
            return choice.n_ctx, choice
    if n_ctx < 16:
        raise InputError(f"a context of {n_ctx} tokens is too small to chat in")
    return n_ctx, None


def load_model(gguf: Path, *, n_ctx: int | str = DEFAULT_CTX, kv_type: str = "f16", threads: int | None = None,
               gpu_layers: int = 0, seed: int | None = None, verbose: bool = False):
    """Load `gguf` with llama-cpp-python for chatting; InputError when it cannot be loaded.

    n_ctx: tokens, or "auto" (memory.choose_context). kv_type: the KV cache's type, f16, q8_0 or q4_0; a quantized
    cache turns flash attention on (llama.cpp reads a quantized V cache only through it).
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"no GGUF file at {gguf}")
    kv_type = memory.check_kv_type(kv_type)
    n_ctx, _ = resolve_context(gguf, n_ctx, kv_type)
    import llama_cpp

    if not verbose:
        _silence_llama_log()
    threads = threads or physical_cores()
    kwargs: dict[str, Any] = {"seed": seed} if seed is not None else {}
    if kv_type != "f16":
        ggml_type = getattr(llama_cpp, _GGML_KV_TYPES[kv_type])
        kwargs.update(type_k=ggml_type, type_v=ggml_type, flash_attn=memory.needs_flash_attention(kv_type))
    _LAST_ERRORS.clear()
    try:
        return llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=gpu_layers, verbose=verbose, **kwargs,
        )
    except (ValueError, RuntimeError) as err:
        reason = _LAST_ERRORS[-1] if _LAST_ERRORS else str(err)
        if kv_type != "f16" and "context" in str(err):
            raise InputError(f"this llama.cpp build cannot run a {kv_type} KV cache for {gguf.name} ({reason}; it "
                             "needs flash attention): use --kv-type f16") from None
        raise InputError(f"cannot load {gguf}: {reason}; is it a complete GGUF file?") from None


_LOG_CALLBACK = None
_LAST_ERRORS: list[str] = []  # llama.cpp's error lines while loading: the reason a load failed
_GGML_LOG_LEVEL_ERROR = 4


def _silence_llama_log() -> None:
    """Drop llama.cpp's log lines (they would interleave with the chat), keeping errors for the message."""
    global _LOG_CALLBACK
    import llama_cpp

    def keep_errors(level, text, user_data) -> None:
        if level == _GGML_LOG_LEVEL_ERROR:
            line = text.decode("utf-8", errors="replace").strip()
            if line:
                _LAST_ERRORS[:] = [*_LAST_ERRORS[-4:], line.split(": ", 1)[-1]]

    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(keep_errors)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def gguf_family(llm) -> ChatFamily | None:
    """The chat family the GGUF's own template belongs to, or None for a template l3zh-local does not know."""
    try:
        return detect_family(llm.metadata.get("tokenizer.chat_template"))
    except InputError:
        return None


def sampling_for(family: ChatFamily | None, **overrides: Any) -> Sampling:
    """The family's sampling defaults (the seed's when unknown) with the given non-None values instead."""
    base = family.sampling if family is not None else Sampling()
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class ChatSession:
    """A conversation with a loaded model: history, system prompt, and the token-level bookkeeping.

    The prompt is the GGUF's own chat template (`prompt.ChatPrompt.from_llama`). Generation stops at any
    end-of-generation or control token of the vocabulary, and at `stop_ids` when given.
    """

    llm: Any
    system: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: set[int] | None = None
    messages: list[dict] = field(default_factory=list)
    last: TurnStats = field(default_factory=TurnStats)
    context_choice: memory.ContextChoice | None = None  # how "auto" chose the context, when it did

    def __post_init__(self) -> None:
        import llama_cpp

        self.prompt = ChatPrompt.from_llama(self.llm)
        vocab = self.llm._model.vocab
        self._is_eog = lambda t: bool(llama_cpp.llama_vocab_is_eog(vocab, t))
        self._control_ids = set(self.prompt.control_tokens.values())

    @classmethod
    def open(cls, gguf: Path, *, system: str | None = None, sampling: Sampling | None = None,
             n_ctx: int | str = DEFAULT_CTX, kv_type: str = "f16", threads: int | None = None, gpu_layers: int = 0,
             seed: int | None = None) -> ChatSession:
        """Load `gguf` and start a conversation with its chat family's defaults.

        system None means the family's default system prompt (the seed's shareAI models have one); "" means none.
        sampling None means the family's sampling defaults. n_ctx: tokens or "auto" (the choice is kept in
        `context_choice`); kv_type: f16, q8_0 or q4_0 (see `load_model`).
        """
        n, choice = resolve_context(Path(gguf), n_ctx, memory.check_kv_type(kv_type))
        llm = load_model(gguf, n_ctx=n, kv_type=kv_type, threads=threads, gpu_layers=gpu_layers, seed=seed)
        family = gguf_family(llm)
        if system is None:
            system = family.default_system if family else None
        session = cls(llm, system=system or None, sampling=sampling or sampling_for(family))
        session.context_choice = choice
        return session

    # -- conversation state ------------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        # llama.cpp may round the context up; llama-cpp-python's token bookkeeping keeps the size asked for.
        return min(self.llm.n_ctx(), len(self.llm.input_ids))

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays). The KV cache is kept: the prefix still matches."""
        self.messages.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def conversation(self, user_text: str | None = None, history: list[dict] | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user_text}] if user_text is not None else []
        return head + (self.messages if history is None else history) + tail

    def tokens(self, messages: list[dict]) -> list[int]:
        """The prompt for `messages`, ending with the assistant header."""
        return self.prompt.ids(messages)

    def _fit(self, user_text: str) -> tuple[list[int], int, int]:
        """Prompt tokens, new-token budget and dropped messages, trimming the oldest turns to fit n_ctx."""
        n_ctx = self.n_ctx
        max_tokens = self.sampling.max_tokens
        dropped = 0
        while True:
            history = self.messages[dropped:]
            tokens = self.tokens(self.conversation(user_text, history))
            room = n_ctx - len(tokens)
            if room >= min(max_tokens, n_ctx // 4) or not history:
                break
            # Drop the oldest user turn together with the replies that follow it.
            dropped += 1
            while dropped < len(self.messages) and self.messages[dropped]["role"] != "user":
                dropped += 1
        if room < 16:
            raise InputError(f"the message is too long: {len(tokens)} tokens with the system prompt, in a context of "
                             f"{n_ctx}; shorten it or raise --ctx (the conversation so far is kept)")
        return tokens, min(max_tokens, room), dropped

    # -- one turn ----------------------------------------------------------------------------------------------

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer `user_text`, streaming the reply's text to `on_text`; the turn is added to the history."""
        tokens, budget, dropped = self._fit(user_text)
        if dropped:
            del self.messages[:dropped]
        cached = list(self.llm._input_ids)
        reused = next((i for i, (a, b) in enumerate(zip(cached, tokens)) if a != b), min(len(cached), len(tokens)))
        stats = TurnStats(prompt_tokens=len(tokens), reused_tokens=min(reused, len(tokens) - 1),
                          trimmed_messages=dropped)
        # A character split across tokens is held until its last byte arrives: no broken UTF-8 is shown.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_text:
                    on_text(text)

        s = self.sampling
        start = time.perf_counter()
        first = None
        try:
            for token in self.llm.generate(
                tokens, temp=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                repeat_penalty=s.repeat_penalty, reset=True,
            ):
                if first is None:
                    first = time.perf_counter()
                if self._is_stop(token):
                    stats.stop_token = token
                    break
                stats.generated_tokens += 1
                emit(decoder.decode(self.llm.detokenize([token])))
                if stats.generated_tokens >= budget:
                    break
        finally:
            emit(decoder.decode(b"", final=True))
            end = time.perf_counter()
            stats.time_to_first_token_s = (first or end) - start
            stats.generation_s = end - (first or end)
            self.last = stats
        answer = "".join(pieces)
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer

    def _is_stop(self, token: int) -> bool:
        if self.stop_ids is not None and token in self.stop_ids:
            return True
        # Any control token ends the turn: a header or end-of-turn token in a reply is template text, not answer.
        return self._is_eog(token) or token in self._control_ids


def chat(gguf: Path, question: str, *, system: str | None = None, sampling: Sampling | None = None,
         n_ctx: int | str = DEFAULT_CTX, kv_type: str = "f16", threads: int | None = None, gpu_layers: int = 0,
         seed: int | None = None, stream: TextIO | None = None) -> str:
    """Answer one question with `gguf` and return the answer; with `stream`, also write it there as it comes.

    system and sampling: as in `ChatSession.open` (None: the chat family's defaults).
    """
    session = ChatSession.open(gguf, system=system, sampling=sampling, n_ctx=n_ctx, kv_type=kv_type,
                               threads=threads, gpu_layers=gpu_layers, seed=seed)

    def write(text: str) -> None:
        assert stream is not None
        stream.write(text)
        stream.flush()

    return session.reply(question, write if stream is not None else None)


def run_terminal_chat(session: ChatSession, *, title: str, input_fn: Callable[[str], str] = input,
                      out: TextIO | None = None, stats: bool = False) -> None:
    """Interactive chat on the terminal until /exit or end of input."""
    out = out or sys.stdout

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    show(f"Chatting with {title} ({COMMANDS_HELP})\n")
    while True:
        try:
            line = input_fn(USER_PROMPT)
        except EOFError:
            show("\n")
            return
        except KeyboardInterrupt:
            show("\n")
            continue
        command, _, argument = line.strip().partition(" ")
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            show("[conversation cleared]\n")
            continue
        if command == "/system":
            session.set_system(argument.strip())
            session.reset()
            show(f"[system prompt {'set' if argument.strip() else 'cleared'}; conversation cleared]\n")
            continue
        if command.startswith("/") and command[1:].isalpha():
            show(f"[unknown command {command}; {COMMANDS_HELP}]\n")
            continue
        if not line.strip():
            continue
        try:
            session.reply(line, show)
        except KeyboardInterrupt:
            show("\n[stopped]")
        except InputError as err:
            show(f"[{err}]\n")
            continue
        show("\n")
        if session.last.trimmed_messages:
            show(f"[{session.last.trimmed_messages} oldest messages dropped to fit the context of "
                 f"{session.n_ctx} tokens{'; the system prompt is kept' if session.system else ''}]\n")
        if stats:
            show(session.last.line() + "\n")
