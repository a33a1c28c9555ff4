"""Rendering a conversation with a family, and turning a rendered prompt into token ids safely.

`prompt_pieces` finds out which parts of a rendered prompt come from the template and which from the messages, by
rendering with placeholder message texts. Control tokens are then taken only from the template's parts:
a user who types "<|eot_id|>" gets the text "<|eot_id|>", never the token. (Runtimes that tokenize the whole
rendered prompt with special tokens enabled, as llama-cpp-python and Ollama do, cannot make that distinction;
l3zh-local's own chat and verify code should encode through `encode_pieces`.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .family import ChatFamily

Message = dict  # {"role": str, "content": str}

# Private-use code points delimit the placeholders; message texts containing them are refused.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def _raise(message: str):
    raise ValueError(message)


@lru_cache(maxsize=1)
def jinja_environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja environment HF transformers and llama-cpp-python render chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    return env


@lru_cache(maxsize=64)
def _compiled(template: str):
    return jinja_environment().from_string(template)


def render_jinja(
    template: str, messages: Sequence[Message], *, bos_token: str, eos_token: str, add_generation_prompt: bool = True
) -> str:
    """Render a chat template the way HF's apply_chat_template does (sandboxed)."""
    return _compiled(template).render(
        messages=[dict(m) for m in messages], bos_token=bos_token, eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
    )


def render_prompt(family: ChatFamily, messages: Sequence[Message]) -> str:
    """The prompt text of `messages` with the family's Jinja template, reply prompt included, BOS text included
    where the family's template prints it."""
    return render_jinja(family.jinja, messages, bos_token=family.bos_token, eos_token=family.eos_token)


@dataclass(frozen=True)
class Piece:
    text: str
    control: bool  # a control token written by the template (not by a message)


def prompt_pieces(
    render: Callable[[list[Message]], str], messages: Sequence[Message], control_tokens: Iterable[str]
) -> list[Piece]:
    """Split what `render` makes of `messages` into text and control tokens, taking control tokens only from the
    template's own text. Adjacent text (template text and message text) is joined into one piece, so encoding the
    pieces gives the same ids as tokenizing the whole prompt whenever the messages hold no control-token text."""
    for m in messages:
        if _OPEN in m["content"] or _CLOSE in m["content"]:
            raise ValueError("message text contains the private-use placeholder characters U+E000/U+E001")
    marked = [dict(m, content=f"{_OPEN}{i}{_CLOSE}") for i, m in enumerate(messages)]
    rendered = render(marked)
    specials = sorted(set(control_tokens), key=len, reverse=True)
    special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
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
    for match in _PLACEHOLDER.finditer(rendered):
        add_template_text(rendered[pos:match.start()])
        add_text(messages[int(match.group(1))]["content"])
        pos = match.end()
    add_template_text(rendered[pos:])
    return pieces


def encode_pieces(
    pieces: Sequence[Piece], tokenize_text: Callable[[str], list[int]], control_id: Callable[[str], int]
) -> list[int]:
    """Token ids of `pieces`: text through `tokenize_text` (no special-token parsing, no BOS), control tokens by id."""
    ids: list[int] = []
    for piece in pieces:
        ids.extend([control_id(piece.text)] if piece.control else tokenize_text(piece.text))
    return ids
