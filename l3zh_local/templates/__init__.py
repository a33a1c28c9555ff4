"""Chat families: one definition each, from which every rendering (GGUF Jinja, Ollama, LM Studio) is derived.

See `family.py` for the decisions that make all runtimes agree token for token; rendering and tokenizing a chat
is `l3zh_local.prompt`'s job.
"""

from .family import ChatFamily, Sampling, TurnFormat
from .registry import (
    FAMILIES,
    detect_family,
    family_from_file,
    get_family,
    list_families,
    normalise_template,
    template_hash,
    with_default_system,
)

__all__ = [
    "FAMILIES", "ChatFamily", "Sampling", "TurnFormat", "detect_family", "family_from_file", "get_family",
    "list_families", "normalise_template", "template_hash", "with_default_system",
]
