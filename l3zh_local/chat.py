"""Terminal chat with a GGUF on a laptop CPU (llama-cpp-python), and a one-shot mode for scripts.

The conversation is rendered with the GGUF's own chat template every turn and tokenized injection-safe (template
text with special tokens parsed, message text as plain text: see prompt.py). llama-cpp-python's ``generate``
keeps the evaluated tokens and their KV cache and, given the whole conversation again, evaluates only the part
after the longest common prefix, so the wait before the first token does not grow with the conversation.

    python -m l3zh_local.chat model.gguf [--system TEXT] [-p QUESTION]
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import prompt
from .errors import InputError, L3zhError
from .hardware import physical_cores
from .templates import Sampling as FamilySampling

COMMANDS_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"
USER_PROMPT = ">>> "


_SEED = FamilySampling()  # the seed project's defaults, defined once with the chat families


@dataclass
class Sampling:
    """Sampling settings for a chat; defaults from the chat families' (the seed's 0.6 / 0.9 / 1.1 / 500)."""

    temperature: float = _SEED.temperature
    top_p: float = _SEED.top_p
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = _SEED.repeat_penalty
    max_new_tokens: int = _SEED.num_predict


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


def load_model(gguf: Path, *, n_ctx: int = 4096, threads: int | None = None, gpu_layers: int = 0,
               seed: int | None = None, verbose: bool = False):
    """Load `gguf` with llama-cpp-python for chatting; InputError when it cannot be loaded."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"no GGUF file at {gguf}")
    import llama_cpp

    if not verbose:
        _silence_llama_log()
    threads = threads or physical_cores()
    kwargs = {"seed": seed} if seed is not None else {}
    try:
        return llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=gpu_layers, verbose=verbose, **kwargs,
        )
    except (ValueError, RuntimeError) as err:
        raise InputError(f"cannot load {gguf}: {err}; is it a complete GGUF file?") from None


_LOG_CALLBACK = None


def _silence_llama_log() -> None:
    """Drop llama.cpp's log lines (they would interleave with the chat)."""
    global _LOG_CALLBACK
    import llama_cpp

    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


@dataclass
class ChatSession:
    """A conversation with a loaded model: history, system prompt, and the token-level bookkeeping.

    template / stop_ids default to the GGUF's own: ``tokenizer.chat_template`` and the runtime's
    end-of-generation tokens. A family from the template registry can pass its own.
    """

    llm: object
    system: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    template: str | None = None
    stop_ids: set[int] | None = None
    messages: list[dict] = field(default_factory=list)
    last: TurnStats = field(default_factory=TurnStats)

    def __post_init__(self) -> None:
        import llama_cpp

        self.template = self.template or self.llm.metadata.get("tokenizer.chat_template")
        if not self.template:
            raise InputError("the GGUF has no chat template (tokenizer.chat_template); re-export it with --template")
        self._vocab = self.llm._model.vocab
        self._is_eog = lambda t: bool(llama_cpp.llama_vocab_is_eog(self._vocab, t))
        self._is_control = lambda t: bool(
            llama_cpp.llama_vocab_get_attr(self._vocab, t) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        )
        self._bos_text = self._token_text(self.llm.token_bos())
        self._eos_text = self._token_text(self.llm.token_eos())

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    # -- conversation state ------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays). The KV cache is kept: the prefix still matches."""
        self.messages.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def conversation(self, user_text: str | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user_text}] if user_text is not None else []
        return head + self.messages + tail

    def tokens(self, messages: list[dict]) -> list[int]:
        """The prompt for `messages`, ending with the assistant header."""
        return prompt.tokenize_chat(
            lambda text, special: self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special),
            self.template, messages, bos_token=self._bos_text, eos_token=self._eos_text,
        )

    def _fit(self, user_text: str) -> tuple[list[int], int, int]:
        """Prompt tokens, new-token budget and dropped messages, trimming the oldest turns to fit n_ctx."""
        # llama.cpp may round the context up; llama-cpp-python's token bookkeeping keeps the size asked for.
        n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        dropped = 0
        while True:
            history = self.messages[dropped:]
            head = [{"role": "system", "content": self.system}] if self.system else []
            tokens = self.tokens(head + history + [{"role": "user", "content": user_text}])
            room = n_ctx - len(tokens)
            if room >= min(self.sampling.max_new_tokens, n_ctx // 4) or not history:
                break
            # Drop the oldest user turn together with the replies that follow it.
            dropped += 1
            while dropped < len(self.messages) and self.messages[dropped]["role"] != "user":
                dropped += 1
        if room < 16:
            raise InputError(f"the message is too long: {len(tokens)} tokens in a context of {n_ctx}; "
                             "shorten it or raise --ctx")
        return tokens, min(self.sampling.max_new_tokens, room), dropped

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
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
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
                text = decoder.decode(self.llm.detokenize([token]))
                if text:
                    pieces.append(text)
                    if on_text:
                        on_text(text)
                if stats.generated_tokens >= budget:
                    break
        finally:
            tail = decoder.decode(b"", final=True)
            if tail:
                pieces.append(tail)
                if on_text:
                    on_text(tail)
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
        return self._is_eog(token) or self._is_control(token)


# ---------------------------------------------------------------------------------------------------------------
# Front ends
# ---------------------------------------------------------------------------------------------------------------


def family_default_system(llm) -> str | None:
    """The default system prompt of the chat family the GGUF's template belongs to (None if unknown or none)."""
    from .templates import detect_family

    try:
        return detect_family(llm.metadata.get("tokenizer.chat_template")).default_system
    except InputError:
        return None


def one_shot(gguf: Path, question: str, *, system: str | None = None, sampling: Sampling | None = None,
             n_ctx: int = 4096, threads: int | None = None, gpu_layers: int = 0, seed: int | None = None,
             stream=None) -> str:
    """Answer one question and return the answer; with `stream`, also write it there as it is generated.

    system None means the family's default system prompt (the seed's shareAI models have one); "" means none.
    """
    llm = load_model(gguf, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, seed=seed)
    system = family_default_system(llm) if system is None else system
    session = ChatSession(llm, system=system, sampling=sampling or Sampling())
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return session.reply(question, write if stream is not None else None)


def run_chat(gguf: Path, *, system: str | None = None, sampling: Sampling | None = None, n_ctx: int = 4096,
             threads: int | None = None, gpu_layers: int = 0, seed: int | None = None,
             input_fn: Callable[[str], str] = input, out=None, stats: bool = False) -> None:
    """Interactive chat on the terminal until /exit or end of input (system: as in `one_shot`)."""
    out = out or sys.stdout
    llm = load_model(gguf, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, seed=seed)
    system = family_default_system(llm) if system is None else system
    session = ChatSession(llm, system=system, sampling=sampling or Sampling())
    out.write(f"Chatting with {Path(gguf).name} ({COMMANDS_HELP})\n")
    out.flush()

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = input_fn(USER_PROMPT)
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
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
            show(f"[{err}]")
        show("\n")
        if stats:
            show(session.last.line() + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m l3zh_local.chat", description="Chat with a GGUF in the terminal.")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Sampling()
    parser.add_argument("gguf", type=Path)
    parser.add_argument("-p", "--prompt", help="answer this one question and exit")
    parser.add_argument("--system", help="system prompt (default: the chat family's, if it has one; '' for none)")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty)
    parser.add_argument("--max-tokens", type=int, default=d.max_new_tokens, help="most new tokens per reply")
    parser.add_argument("--ctx", type=int, default=4096, help="context size in tokens")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers to offload (GPU builds only)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stats", action="store_true", help="print token counts and speed after each reply")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        repeat_penalty=args.repeat_penalty, max_new_tokens=args.max_tokens)
    common = dict(system=args.system, sampling=sampling, n_ctx=args.ctx, threads=args.threads,
                  gpu_layers=args.gpu_layers, seed=args.seed)
    try:
        if args.prompt is not None:
            one_shot(args.gguf, args.prompt, stream=sys.stdout, **common)
            sys.stdout.write("\n")
        else:
            run_chat(args.gguf, stats=args.stats, **common)
    except L3zhError as err:
        print(f"Error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
