"""Chat families: one definition each, from which every rendering (GGUF Jinja, Ollama, LM Studio) is derived.

See `family.py` for the decisions that make all runtimes agree token for token.
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
from .render import Piece, encode_pieces, jinja_environment, prompt_pieces, render_jinja, render_prompt

__all__ = [
    "ChatFamily", "Sampling", "TurnFormat", "FAMILIES", "detect_family", "family_from_file", "get_family",
    "list_families", "normalise_template", "template_hash", "with_default_system", "Piece", "encode_pieces", "jinja_environment",
    "prompt_pieces", "render_jinja", "render_prompt",
]
