"""The `ChatFamily` definition and the renderings derived from it.

A family is described once, as plain pieces of text (`TurnFormat`): what goes before and after the system, user and
assistant messages, and what opens the assistant's reply. The HF/GGUF Jinja template, the Ollama Go template and
LM Studio's prefixes are all *generated* from those pieces, so they cannot drift apart.

Decisions that make every runtime agree (the runtimes cannot all be changed, so the family is defined to fit them):

- **Message text is used verbatim.** Meta's Llama-3 template trims each message; Go templates cannot trim.
  Our templates never trim. (Meta's template is still *recognised* by `detect_family`; the GGUF then gets ours.)
- **Consecutive messages of one role are merged with a blank line** ("\\n\\n"), because Ollama merges them before
  its template runs. The Jinja template merges them the same way.
- **A trailing assistant message is a finished turn**: it is closed like any other and the reply prompt follows
  (llama-cpp-python always renders with add_generation_prompt=True, and so do we).
- **Exactly one BOS.** For families whose model has `add_bos_token` (the Llama-3 ones), the Jinja template prints
  `{{ bos_token }}` first, because HF's `apply_chat_template` and llama-cpp-python's Jinja chat formatter tokenize the
  rendered text *without* adding BOS, and llama.cpp's own Jinja path (LM Studio) strips a leading BOS text before
  adding the BOS itself. The Ollama template and LM Studio's manual/legacy prefixes never print it: those runtimes
  add the BOS themselves. ChatML (SmolLM2) has no BOS anywhere.
- **Default system prompt**: when a conversation does not start with a system message, the family's default is
  used. The Jinja template inserts it; Ollama gets it as `SYSTEM` (which Ollama prepends as a message in exactly
  that case); LM Studio gets it as the preset's system prompt.
- **Llama-3.1's date lines** are fixed: "Cutting Knowledge Date: December 2023" and "Today Date: 26 Jul 2024"
  (the default of Meta's own template), so a prompt renders the same on every runtime and every day.
- Only the roles system, user and assistant are supported (no tool calls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import prompt
from ..prompt import Message

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TurnFormat:
    """The literal text around each message; everything else is derived from it."""

    system_prefix: str  # before a system message at the very start of the conversation
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str  # also the generation prompt that opens the reply
    assistant_suffix: str
    later_system_prefix: str | None = None  # before a system message further down (default: system_prefix)
    always_system: bool = False  # print the (empty) system block even when there is no system message
    bos_in_template: bool = True  # the Jinja template prints {{ bos_token }} first (see the module docstring)

    @property
    def mid_system_prefix(self) -> str:
        return self.system_prefix if self.later_system_prefix is None else self.later_system_prefix


@dataclass(frozen=True)
class Sampling:
    """Sampling settings: the one set of defaults that chat, serve, Modelfiles and presets all use.

    The seed project's values (its README's demo: temperature 0.6, top_p 0.9, repetition_penalty 1.1, 500 new
    tokens); top_k 40 and min_p 0 are llama.cpp's and Ollama's own defaults, written out so every runtime agrees.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    max_tokens: int = 500  # Ollama's num_predict, LM Studio's maxPredictedTokens


@dataclass(frozen=True)
class ChatFamily:
    """One chat format and everything a runtime needs to use it right."""

    name: str
    description: str
    jinja: str  # the HF / GGUF `chat_template`
    eos_token: str  # text of the token the GGUF's EOS is set to, e.g. "<|eot_id|>"
    stop_tokens: tuple[str, ...]  # every text that ends a reply (Ollama `stop`, LM Studio stop strings)
    default_system: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    turns: TurnFormat | None = None  # None for a custom --template-file family without Ollama template
    ollama_template_override: str | None = None  # a custom family's own Go template, if given
    bos_token: str = "<|begin_of_text|>"  # text the Jinja template receives as bos_token
    known_template_hashes: tuple[str, ...] = ()  # sha256 of normalised templates recognised as this family

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` with this family's Jinja template (BOS text where the template prints it)."""
        return prompt.render(self.jinja, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                             add_generation_prompt=add_generation_prompt)

    def ollama_template(self) -> str | None:
        """The Go text/template for Ollama's TEMPLATE, or None when it cannot be derived (custom Jinja)."""
        if self.ollama_template_override is not None:
            return self.ollama_template_override
        return go_template(self.turns) if self.turns else None

    def manual_prompt_template(self) -> dict[str, str] | None:
        """LM Studio's manual prompt template (beforeSystem ... afterAssistant), BOS left to the runtime."""
        if self.turns is None:
            return None
        t = self.turns
        return {
            "beforeSystem": t.system_prefix, "afterSystem": t.system_suffix,
            "beforeUser": t.user_prefix, "afterUser": t.user_suffix,
            "beforeAssistant": t.assistant_prefix, "afterAssistant": t.assistant_suffix,
        }


# ----- Jinja (HF, GGUF, llama-cpp-python, LM Studio) -----

def _jinja_str(text: str) -> str:
    """A Jinja string literal for `text` (single quotes; escapes that jinja2 and llama.cpp's minja both decode)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


def jinja_template(t: TurnFormat, default_system: str | None) -> str:
    """The HF/GGUF chat template for `t`, on one line so trim_blocks/lstrip_blocks cannot change it."""
    q = _jinja_str
    parts = []
    if t.bos_in_template:
        parts.append("{{- bos_token -}}")
    if default_system is not None or t.always_system:
        block = q(t.system_prefix) + " + " + q(default_system or "") + " + " + q(t.system_suffix)
        parts.append(
            "{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}{{- " + block + " -}}{%- endif -%}"
        )
    parts.append("{%- set ns = namespace(open=false, text='', first=false) -%}")
    parts.append("{%- for message in messages -%}")
    # Merge consecutive messages of one role with a blank line, as Ollama does before its template runs.
    parts.append(
        "{%- if ns.open -%}{%- set ns.text = ns.text + '\\n\\n' + message['content'] -%}"
        "{%- else -%}{%- set ns.open = true -%}{%- set ns.first = loop.first -%}"
        "{%- set ns.text = message['content'] -%}{%- endif -%}"
    )
    parts.append("{%- if loop.last or messages[loop.index0 + 1]['role'] != message['role'] -%}")
    system_first = ""
    if t.mid_system_prefix != t.system_prefix:  # Llama-3.1: the date lines only in the opening system block
        system_first = ("{%- if message['role'] == 'system' and ns.first -%}{{- " + q(t.system_prefix)
                        + " + ns.text + " + q(t.system_suffix) + " -}}{%- el")
    parts.append(
        (system_first or "{%- ") + "if message['role'] == 'system' -%}{{- " + q(t.mid_system_prefix)
        + " + ns.text + " + q(t.system_suffix) + " -}}"
        "{%- elif message['role'] == 'user' -%}{{- " + q(t.user_prefix) + " + ns.text + " + q(t.user_suffix) + " -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- " + q(t.assistant_prefix) + " + ns.text + "
        + q(t.assistant_suffix) + " -}}"
        "{%- else -%}{{- raise_exception('unsupported role ' + message['role'] + ': use system, user or assistant') -}}"
        "{%- endif -%}"
    )
    parts.append("{%- set ns.open = false -%}{%- endif -%}{%- endfor -%}")
    parts.append("{%- if add_generation_prompt -%}{{- " + q(t.assistant_prefix) + " -}}{%- endif -%}")
    return "".join(parts)


# ----- Go text/template (Ollama) -----

def _go_literal(text: str) -> str:
    """Text placed verbatim in a Go template. Our pieces never contain action delimiters; refuse if one does."""
    if "{{" in text or "}}" in text or '"""' in text:
        raise ValueError(f"template text {text!r} cannot be written literally into an Ollama TEMPLATE")
    return text


def go_template(t: TurnFormat) -> str:
    """Ollama TEMPLATE using .Messages: one run over the whole (already merged) conversation.

    No `{{-`/`-}}` trim markers anywhere: they would eat the newlines that belong to the format. No BOS: Ollama
    adds it. The default system prompt comes from the Modelfile's SYSTEM, which Ollama prepends as a message.
    """
    g = _go_literal
    out = []
    if t.always_system:
        out.append(
            '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
            + g(t.system_prefix) + g(t.system_suffix) + "{{ end }}"
        )
    system_prefix = g(t.system_prefix)
    if t.mid_system_prefix != t.system_prefix:
        system_prefix = "{{ if eq $i 0 }}" + system_prefix + "{{ else }}" + g(t.mid_system_prefix) + "{{ end }}"
    out.append("{{ range $i, $m := .Messages }}")
    out.append(
        '{{ if eq $m.Role "system" }}' + system_prefix + "{{ $m.Content }}" + g(t.system_suffix)
        + '{{ else if eq $m.Role "user" }}' + g(t.user_prefix) + "{{ $m.Content }}" + g(t.user_suffix)
        + '{{ else if eq $m.Role "assistant" }}' + g(t.assistant_prefix) + "{{ $m.Content }}"
        + g(t.assistant_suffix) + "{{ end }}"
    )
    out.append("{{ end }}" + g(t.assistant_prefix))
    return "".join(out)
