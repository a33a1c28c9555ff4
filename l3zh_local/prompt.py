"""Chat prompts from a GGUF's own chat template: sandboxed rendering and injection-safe tokenization.

The template is rendered the way transformers renders it (jinja2 sandbox, trim_blocks, lstrip_blocks). The
rendered text is then tokenized in pieces: the template's own text with special tokens parsed (so
``<|eot_id|>`` in the template becomes the control token), and every message's text as plain text (so a user who
types ``<|eot_id|>`` gets the characters, never the control token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache

from .errors import InputError

Message = dict  # {"role": str, "content": str}
# tokenize(text, special) -> ids, without adding BOS: special=True parses control tokens written in `text`.
Tokenize = Callable[[str, bool], list]


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    template: str,
    messages: Sequence[Message],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render `messages` with a Jinja chat template in jinja2's sandbox; InputError if the template is broken."""
    import jinja2

    try:
        return _compile(template).render(
            messages=list(messages), bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as err:
        raise InputError(f"the chat template does not render: {err}") from None


def text_spans(rendered: str, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """Cut `rendered` into (piece, is_message_text) pieces, finding each message's text in order.

    Templates may trim message text, so the stripped text is looked for when the whole is not there. A message
    whose text cannot be found is an error: tokenizing it with the template would let it inject control tokens.
    """
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for message in messages:
        content = message.get("content") or ""
        for candidate in (content, content.strip()):
            if not candidate:
                break
            at = rendered.find(candidate, cursor)
            if at >= 0:
                if at > cursor:
                    pieces.append((rendered[cursor:at], False))
                pieces.append((candidate, True))
                cursor = at + len(candidate)
                break
        else:
            raise InputError(
                f"the chat template changes the text of a {message.get('role')} message; "
                "cannot tokenize it safely as text"
            )
    if cursor < len(rendered):
        pieces.append((rendered[cursor:], False))
    return pieces


def tokenize_chat(
    tokenize: Tokenize,
    template: str,
    messages: Sequence[Message],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the rendered chat: template text with special tokens parsed, message text as plain text."""
    rendered = render_chat(
        template, messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
    )
    ids: list[int] = []
    for piece, is_text in text_spans(rendered, messages):
        ids.extend(tokenize(piece, not is_text))
    return ids
