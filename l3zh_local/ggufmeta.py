"""Read a GGUF's metadata with gguf-py (header only; tensors stay on disk)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .errors import InputError

_ARRAYS_SKIPPED = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores")


def read_metadata(path: Path) -> dict:
    """Scalar and short-array key/values of a GGUF; the vocabulary arrays are left out."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable GGUF file ({exc})") from None
    meta = {}
    for key, field in reader.fields.items():
        if key in _ARRAYS_SKIPPED:
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError):
            continue
    meta["l3zh.tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    return meta


def file_type_name(meta: dict) -> str:
    """general.file_type as the lower-case name users know (q4_k_m, bf16, ...)."""
    import gguf

    value = meta.get("general.file_type")
    if value is None:
        return "unknown"
    name = gguf.LlamaFileType(value).name  # e.g. MOSTLY_Q4_K_M, ALL_F32
    return name.split("_", 1)[1].lower()
