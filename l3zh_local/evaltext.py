"""The evaluation text that ships with the package (see data/eval/SOURCES.md for where each piece comes from).

- ``tokenizer_cases()``: short strings by kind (Chinese, classical Chinese, English, code, emoji, numbers,
  whitespace runs, special-token look-alikes) on which a GGUF's tokenizer must give the HF tokenizer's ids;
- ``heldout_text(lang)``: a few thousand characters of Chinese ("zh") or English ("en") on which a GGUF is
  compared with its reference model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

LANGUAGES = ("zh", "en")


@dataclass(frozen=True)
class TokenizerCase:
    kind: str
    text: str


def _eval_file(name: str):
    return resources.files("l3zh_local").joinpath("data", "eval", name)


def tokenizer_cases() -> list[TokenizerCase]:
    """The fixed multilingual tokenizer text set, in file order."""
    raw = json.loads(_eval_file("tokenizer_cases.json").read_text(encoding="utf-8"))
    return [TokenizerCase(kind=item["kind"], text=item["text"]) for item in raw]


def heldout_text(lang: str) -> str:
    """Held-out evaluation text in `lang` ("zh" or "en")."""
    if lang not in LANGUAGES:
        raise ValueError(f"no held-out text for language {lang!r}; have {', '.join(LANGUAGES)}")
    return _eval_file(f"{lang}_heldout.txt").read_text(encoding="utf-8")
