"""The one way from chat messages to token ids, used by chat, verify, the server and the parity tests.

A chat template (a family's, or a GGUF's own ``tokenizer.chat_template``) is rendered the way HF transformers
renders it: jinja2's immutable sandbox with trim_blocks and lstrip_blocks. The rendered prompt is then cut into
pieces, and control tokens are taken **only from the template's own text**: a user who types ``<|eot_id|>`` gets
those characters as text, never the control token. (llama-cpp-python's and Ollama's chat paths tokenize the whole
rendered prompt with special tokens parsed, so they cannot make that distinction.)

To know which parts of the prompt come from the messages, the chat is rendered once with placeholders in place of
the message texts. Text around control tokens, template text and message text alike, is tokenized as one piece,
so the ids equal HF's ``apply_chat_template`` whenever the messages hold no control-token text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InputError

Message = Mapping[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}

# Private-use code points delimit the placeholders; message texts containing them are refused.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False):
    # transformers' tojson keeps non-ASCII text as it is (jinja2's own escapes it and sorts keys).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=1)
def jinja_environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja environment chat templates render in, with the globals HF templates expect."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


@lru_cache(maxsize=64)
def _compiled(template: str) -> jinja2.Template:
    return jinja_environment().from_string(template)


def render(template: str, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` under the Jinja chat `template`; InputError when the template fails."""
    try:
        return _compiled(template).render(
            messages=[dict(m) for m in messages], bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as err:
        raise InputError(f"the chat template does not render: {err}") from None


@dataclass(frozen=True)
class Piece:
    text: str
    control: bool  # a control token written by the template (never by a message)


def split_pieces(render_fn: Callable[[list[dict]], str], messages: Sequence[Message],
                 control_tokens: Iterable[str]) -> list[Piece]:
    """Split what `render_fn` makes of `messages` into text and control-token pieces, taking control tokens only
    from the template's own text. Adjacent text is joined into one piece.

    A template may trim message text (Meta's Llama-3 template does): the placeholder rendering is checked against
    the real one, with message texts as they are or stripped; a template that changes message text in any other
    way is refused (InputError), since its message text could not be kept apart from its control tokens.
    """
    for m in messages:
        if _OPEN in m["content"] or _CLOSE in m["content"]:
            raise InputError("message text contains the private-use characters U+E000/U+E001, which l3zh-local "
                             "reserves; remove them")
    marked = render_fn([dict(m, content=f"{_OPEN}{i}{_CLOSE}") for i, m in enumerate(messages)])
    real = render_fn([dict(m) for m in messages])
    specials = sorted(set(control_tokens), key=len, reverse=True)
    special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
    for transform in (lambda text: text, str.strip):
        contents = [transform(m["content"]) for m in messages]
        if _fill(marked, contents) == real:
            return _pieces(marked, contents, special_re)
    raise InputError("the chat template changes message text (beyond trimming it); l3zh-local cannot keep message "
                     "text apart from control tokens with it: use a family template (--template)")


def _fill(marked: str, contents: list[str]) -> str:
    return _PLACEHOLDER.sub(lambda match: contents[int(match.group(1))], marked)


def _pieces(marked: str, contents: list[str], special_re: re.Pattern | None) -> list[Piece]:
    pieces: list[Piece] = []

    def add_text(text: str) -> None:
        if not text:
            return
        if pieces and not pieces[-1].control:
            pieces[-1] = Piece(pieces[-1].text + text, False)
        else:
            pieces.append(Piece(text, False))

    def add_template_text(text: str) -> None:
        pos = 0
        for match in special_re.finditer(text) if special_re else ():
            add_text(text[pos:match.start()])
            pieces.append(Piece(match.group(), True))
            pos = match.end()
        add_text(text[pos:])

    pos = 0
    for match in _PLACEHOLDER.finditer(marked):
        add_template_text(marked[pos:match.start()])
        add_text(contents[int(match.group(1))])
        pos = match.end()
    add_template_text(marked[pos:])
    return pieces


@dataclass(frozen=True)
class ChatPrompt:
    """A chat template bound to a tokenizer: messages -> prompt text -> token ids, injection-safe.

    tokenize_text(text) must return the ids of plain text: no BOS added, no special-token parsing.
    control_tokens maps the text of each control token to its id.
    """

    template: str
    tokenize_text: Callable[[str], list[int]]
    control_tokens: Mapping[str, int]
    bos_token: str = ""
    eos_token: str = ""

    def text(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        return render(self.template, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                      add_generation_prompt=add_generation_prompt)

    def pieces(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[Piece]:
        return split_pieces(lambda msgs: self.text(msgs, add_generation_prompt=add_generation_prompt), messages,
                            self.control_tokens)

    def ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (BOS only where the template prints it)."""
        ids: list[int] = []
        for piece in self.pieces(messages, add_generation_prompt=add_generation_prompt):
            ids.extend([self.control_tokens[piece.text]] if piece.control else self.tokenize_text(piece.text))
        return ids

    @classmethod
    def from_llama(cls, llm, template: str | None = None) -> ChatPrompt:
        """The prompt of a llama-cpp-python model: its GGUF's own template unless `template` is given."""
        template = template or llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise InputError("the GGUF has no chat template (tokenizer.chat_template); re-export it with "
                             "l3zh-local export --template NAME")
        return cls(
            template=template,
            tokenize_text=lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=False),
            control_tokens=llama_control_tokens(llm),
            bos_token=llama_token_text(llm, llm.token_bos()),
            eos_token=llama_token_text(llm, llm.token_eos()),
        )

    @classmethod
    def from_hf(cls, tokenizer, template: str | None = None) -> ChatPrompt:
        """The prompt of an HF tokenizer: its own chat template unless `template` is given."""
        template = template or tokenizer.chat_template
        if not template:
            raise InputError("the tokenizer has no chat template")
        return cls(
            template=template,
            tokenize_text=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
            control_tokens={t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special},
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
        )


def llama_token_text(llm, token: int) -> str:
    """The text of one token of a llama-cpp-python model ("" for none), control tokens included."""
    if token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def llama_control_tokens(llm) -> dict[str, int]:
    """Text -> id of every control token of a llama-cpp-python model's vocabulary."""
    import llama_cpp

    vocab = llm._model.vocab
    found = {}
    for token in range(llm.n_vocab()):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            found[llama_token_text(llm, token)] = token
    return found
