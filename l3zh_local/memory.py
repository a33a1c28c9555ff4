"""What a model costs to run with llama.cpp on a CPU: weights + KV cache + compute buffer, and its file size.

The one estimate behind `plan`, `chat --ctx auto` (`choose_context`), `doctor` and export's warnings. The figures
follow how the llama.cpp pinned by llama-cpp-python allocates, calibrated against the buffer sizes it logs ("model
buffer", "KV buffer", "compute buffer", "output buffer") on the demo model and the tiny Llama-3 fixture;
tests/test_memory.py checks them there within 10 %:

- weights: the GGUF's tensor data, memory-mapped (its size on disk less the header);
- KV cache: 2 (K and V) x layers x KV heads x head size x bytes per element, per token of context; llama.cpp rounds
  the context up to a multiple of 256. f16 takes 2 bytes per element, q8_0 34/32, q4_0 18/32 (blocks of 32 values
  with one f16 scale);
- compute buffer: the larger of two stages of the graph reserved for one micro-batch (n_ubatch tokens): the output
  stage (the batch's logits, n_ubatch x vocabulary floats) and the attention stage (without flash attention, the
  batch's attention scores n_ubatch x context x heads floats plus the mask; with it, the f16 mask only), each plus a
  few activation rows;
- output buffer: one row of logits (chat asks only for the last position's).

An 8B Llama-3 (32 layers, 8 KV heads of 128) needs 128 KiB of f16 KV cache per token: 1 GiB at 8K, 4 GiB at 32K.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

# Re-exported under the names plan, doctor and export call (tests replace them to play another machine).
from .hardware import available_memory as available_ram
from .hardware import total_memory as total_ram

# Bytes per cached element: quantized types store blocks of 32 values with one f16 scale.
KV_TYPES: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# llama.cpp rounds the context (the KV cache's cells) up to a multiple of this.
CTX_PAD = 256
# llama-cpp-python's default batch and micro-batch (what chat and verify load with).
DEFAULT_BATCH = 512
# Contexts the tables show.
TABLE_CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)
GIB = 1024**3
MIB = 1024**2
# A GGUF's header (vocabulary, merges, template) on top of its tensor data: ~7.5 MiB for Llama-3's 128K vocabulary.
GGUF_HEADER_BYTES = 8 * MIB


def needs_flash_attention(kv_type: str) -> bool:
    """llama.cpp only reads a quantized V cache through flash attention."""
    return kv_type != "f16"


def check_kv_type(kv_type: str) -> str:
    key = kv_type.strip().lower()
    if key not in KV_TYPES:
        raise InputError(f"unknown KV cache type {kv_type!r}: choose one of {', '.join(KV_TYPES)}")
    return key


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs, from an HF config.json or a GGUF's metadata."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    hidden: int
    ffn: int
    vocab: int
    n_params: int
    context_length: int | None = None  # the positions the model (or the GGUF) declares

    @classmethod
    def from_hf_config(cls, config: dict, n_params: int) -> ModelShape:
        try:
            hidden, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or hidden // n_heads)
            return cls(
                n_layers=int(config["num_hidden_layers"]), n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads), head_dim_k=head_dim,
                head_dim_v=head_dim, hidden=hidden, ffn=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]), n_params=int(n_params),
                context_length=config.get("max_position_embeddings"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"config.json lacks the sizes of a Llama model ({exc})") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> ModelShape:
        arch = meta.get("general.architecture", "llama")

        def get(key: str, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise InputError(f"the GGUF has no {arch}.{key}: not a model llama.cpp can run as a decoder")
            return value[0] if isinstance(value, list) else value  # per-layer arrays: the first layer's

        hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_k = int(get("attention.key_length", hidden // n_heads))
        vocab = meta.get(f"{arch}.vocab_size") or meta.get("l3zh.array_lengths", {}).get("tokenizer.ggml.tokens")
        if not vocab:
            raise InputError("the GGUF declares no vocabulary size")
        data = int(meta.get("l3zh.tensor_data_bytes", 0))
        return cls(
            n_layers=int(get("block_count")), n_heads=n_heads, n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim_k=head_k, head_dim_v=int(get("attention.value_length", head_k)), hidden=hidden,
            ffn=int(get("feed_forward_length")), vocab=int(vocab), n_params=_params_of(meta, data),
            context_length=int(get("context_length")),
        )


def _params_of(meta: dict, data_bytes: int) -> int:
    """Parameter count: general.parameter_count when written, else from the data size at the file type's width."""
    if meta.get("general.parameter_count"):
        return int(meta["general.parameter_count"])
    from .ggufmeta import file_type_name
    from .quantize import QUANT_TYPES

    qtype = QUANT_TYPES.get(file_type_name(meta))
    return int(data_bytes * 8 / qtype.bits_per_weight) if qtype else 0


def gguf_model(path: Path) -> tuple[ModelShape, int]:
    """The shape of a GGUF and the bytes of its weights (tensor data), from its header alone."""
    from .ggufmeta import read_metadata

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no GGUF file at {path}")
    meta = read_metadata(path)
    return ModelShape.from_gguf_metadata(meta), int(meta["l3zh.tensor_data_bytes"])


# Meta-Llama-3-8B's shape (config.json), for the tables of `doctor` and the README.
LLAMA3_8B_CONFIG = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 8192}
LLAMA3_8B_PARAMS = 8_030_261_248


def llama3_8b() -> ModelShape:
    return ModelShape.from_hf_config(LLAMA3_8B_CONFIG, LLAMA3_8B_PARAMS)


# -- the parts ---------------------------------------------------------------------------------------------------

def padded_ctx(n_ctx: int) -> int:
    return -(-int(n_ctx) // CTX_PAD) * CTX_PAD


def kv_bytes_per_token(shape: ModelShape, kv_type: str = "f16") -> float:
    per_element = KV_TYPES[check_kv_type(kv_type)]
    return shape.n_layers * shape.n_kv_heads * (shape.head_dim_k + shape.head_dim_v) * per_element


def kv_cache_bytes(shape: ModelShape, n_ctx: int, kv_type: str = "f16") -> int:
    return int(kv_bytes_per_token(shape, kv_type) * padded_ctx(n_ctx))


def micro_batch(n_ctx: int, n_batch: int = DEFAULT_BATCH, n_ubatch: int = DEFAULT_BATCH) -> int:
    """The micro-batch llama-cpp-python ends up with: never more than the batch, nor the batch than the context."""
    return max(1, min(n_ubatch, n_batch, int(n_ctx)))


def compute_buffer_bytes(shape: ModelShape, n_ctx: int, *, flash_attn: bool, n_batch: int = DEFAULT_BATCH,
                         n_ubatch: int = DEFAULT_BATCH) -> int:
    """The larger of the output stage and the attention stage of the graph llama.cpp reserves (see module doc)."""
    ub = micro_batch(n_ctx, n_batch, n_ubatch)
    kv = padded_ctx(n_ctx)
    rows = 4 * ub * (shape.ffn + 3 * shape.hidden)  # activations alive beside the big tensor (f32)
    output = 4 * ub * (shape.vocab + 3 * shape.hidden)
    if flash_attn:
        attention = 2 * ub * kv + rows  # the f16 mask; the scores never materialise
    else:
        attention = 4 * ub * kv * (shape.n_heads + 1) + rows  # scores of every head, softmaxed in place, + mask
    return max(output, attention)


def output_buffer_bytes(shape: ModelShape, n_outputs: int = 1) -> int:
    return 4 * shape.vocab * max(1, n_outputs)


# The type llama.cpp quantizes a matrix to when its rows are not a whole number of the type's 256-value blocks
# (llama-quant.cpp, tensor_type_fallback), in bits per weight.
_FALLBACK_BITS = {"q2_k": 4.5, "q3_k": 4.5, "q4_k": 5.5, "q5_k": 6.0, "q6_k": 8.5, "iq": 4.5}


def weights_bytes(n_params: int, bits_per_weight: float, qtype: str | None = None,
                  shapes: Iterable[Sequence[int]] | None = None, tied_vocab: int | None = None) -> int:
    """The tensor data of a GGUF at `bits_per_weight` (llama.cpp's average for the type, mixed tensors included).

    With the tensors' `shapes` (HF order, rows last) and the type's name, vectors count as f32 and matrices whose
    rows do not fit the type's 256-value blocks at their fallback type, as llama.cpp's quantizer writes them:
    small models (SmolLM2's 576-wide rows) lose most k-quant tensors that way. `tied_vocab`: the vocabulary size
    of a model whose embedding is also its output projection; every k-quant mix stores the output as q6_k.
    """
    if shapes is None or qtype is None:
        return int(n_params * bits_per_weight / 8)
    family = "iq" if qtype.startswith("iq") else qtype[:4]
    block = 256 if family in _FALLBACK_BITS else 32 if qtype not in ("f16", "bf16", "f32") else 1
    total = 0.0
    for shape in shapes:
        n = math.prod(shape)
        bits, kind = bits_per_weight, family
        if tied_vocab and block == 256 and len(shape) == 2 and shape[0] == tied_vocab:
            bits, kind = 6.5625, "q6_k"
        if len(shape) < 2:
            total += 4 * n  # norms stay f32
        elif shape[-1] % block == 0:
            total += n * bits / 8
        elif shape[-1] % 32 == 0:
            total += n * _FALLBACK_BITS.get(kind, bits) / 8
        else:
            total += 2 * n  # no quantized type fits: f16
    return int(total)


def gguf_file_bytes(n_params: int, bits_per_weight: float, qtype: str | None = None,
                    shapes: Iterable[Sequence[int]] | None = None, tied_vocab: int | None = None) -> int:
    """A GGUF's size on disk: its tensor data (`weights_bytes`) and header."""
    return weights_bytes(n_params, bits_per_weight, qtype, shapes, tied_vocab) + GGUF_HEADER_BYTES


def hf_weights_bytes(config: dict, n_params: int, qtype: str, bits_per_weight: float,
                     shapes: Iterable[Sequence[int]] | None = None) -> int:
    """`weights_bytes` for an HF model about to be exported (config.json says whether the embedding is tied)."""
    tied = int(config["vocab_size"]) if config.get("tie_word_embeddings") and config.get("vocab_size") else None
    return weights_bytes(n_params, bits_per_weight, qtype, shapes, tied)


# -- the estimate ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    n_ctx: int
    kv_type: str
    flash_attn: bool
    weights: int
    kv_cache: int
    compute: int
    output: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.output

    def to_dict(self) -> dict:
        return {"n_ctx": self.n_ctx, "kv_type": self.kv_type, "flash_attn": self.flash_attn, "weights": self.weights,
                "kv_cache": self.kv_cache, "compute": self.compute, "output": self.output, "total": self.total}

    def line(self) -> str:
        return (f"weights {gib(self.weights)} + KV cache {gib(self.kv_cache)} ({self.kv_type}) + compute "
                f"{gib(self.compute)} = {gib(self.total)}")


def estimate(shape: ModelShape, weights: int, n_ctx: int, kv_type: str = "f16", *, flash_attn: bool | None = None,
             n_batch: int = DEFAULT_BATCH, n_ubatch: int = DEFAULT_BATCH, n_outputs: int = 1) -> MemoryEstimate:
    """Memory to run a model of `shape` whose weights take `weights` bytes at context `n_ctx`.

    flash_attn None: as chat loads it, on exactly when the KV cache is quantized (llama.cpp requires it there).
    n_outputs: rows of logits kept per batch (1 for chat; n_batch where every position's logits are read).
    """
    kv_type = check_kv_type(kv_type)
    if flash_attn is None:
        flash_attn = needs_flash_attention(kv_type)
    if n_ctx < 1:
        raise InputError(f"a context of {n_ctx} tokens is not a context")
    return MemoryEstimate(
        n_ctx=int(n_ctx), kv_type=kv_type, flash_attn=flash_attn, weights=int(weights),
        kv_cache=kv_cache_bytes(shape, n_ctx, kv_type),
        compute=compute_buffer_bytes(shape, n_ctx, flash_attn=flash_attn, n_batch=n_batch, n_ubatch=n_ubatch),
        output=output_buffer_bytes(shape, n_outputs),
    )


def table(shape: ModelShape, weights: int, contexts=TABLE_CONTEXTS, kv_types=tuple(KV_TYPES)) -> list[MemoryEstimate]:
    """One estimate per context x KV type."""
    return [estimate(shape, weights, n, kv) for n in contexts for kv in kv_types]


def format_table(rows: list[MemoryEstimate], *, budget: int | None = None, native: int | None = None) -> str:
    """context x KV type -> total memory; `*` where it exceeds `budget`, `+` past the model's native context."""
    kv_types = list(dict.fromkeys(r.kv_type for r in rows))
    contexts = list(dict.fromkeys(r.n_ctx for r in rows))
    by_key = {(r.n_ctx, r.kv_type): r for r in rows}
    head = f"{'context':>9}  " + "  ".join(f"{'KV ' + kv:>18}" for kv in kv_types)
    lines = [head]
    for n in contexts:
        cells = []
        for kv in kv_types:
            r = by_key[(n, kv)]
            mark = "*" if budget is not None and r.total > budget else " "
            cells.append(f"{gib(r.kv_cache):>8} -> {gib(r.total):>8}{mark}")
        beyond = "+" if native and n > native else " "
        lines.append(f"{n:>8}{beyond}  " + "  ".join(f"{c:>18}" for c in cells))
    notes = ["KV cache -> total (weights + KV cache + compute buffer); quantized KV uses flash attention"]
    if budget is not None:
        notes.append(f"* more than the {gib(budget)} usable here")
    if native and any(n > native for n in contexts):
        notes.append(f"+ beyond the model's {native} positions (export --ctx, see README: Long context)")
    return "\n".join(lines + ["; ".join(notes)])


# -- what fits ---------------------------------------------------------------------------------------------------

def ram_budget(ram: int) -> int:
    """Memory a model may use out of `ram`: keep a tenth (at least 1 GiB) for the system and the program."""
    return max(0, int(ram - max(GIB, ram * 0.1)))


def largest_context(shape: ModelShape, weights: int, budget: int, kv_type: str = "f16", *,
                    limit: int | None = None, flash_attn: bool | None = None) -> int | None:
    """The largest context (a multiple of 256, at most `limit`) whose estimate fits `budget`; None if none does."""
    limit = limit or shape.context_length or 131072

    def fits(n: int) -> bool:
        return estimate(shape, weights, n, kv_type, flash_attn=flash_attn).total <= budget

    lo, hi = 0, limit // CTX_PAD  # in units of CTX_PAD; memory grows with the context
    if hi == 0:
        return limit if fits(limit) else None
    if fits(hi * CTX_PAD):
        return hi * CTX_PAD
    while lo < hi - 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * CTX_PAD) else (lo, mid)
    return lo * CTX_PAD or None


@dataclass(frozen=True)
class ContextChoice:
    n_ctx: int
    estimate: MemoryEstimate
    ram: int  # the memory the choice was made against
    limit: int  # the model's own context

    def line(self) -> str:
        capped = " (the model's own limit)" if self.n_ctx == self.limit else ""
        return (f"context {self.n_ctx} tokens{capped}: {self.estimate.line()}, of {gib(self.ram)} free")


def choose_context(gguf: Path, ram: int | None = None, kv_type: str = "f16", *,
                   flash_attn: bool | None = None) -> ContextChoice:
    """The largest context `gguf` can run at within `ram` (default: the memory free now), up to its own context.

    InputError when not even a short context fits.
    """
    shape, weights = gguf_model(gguf)
    ram = available_ram() if ram is None else int(ram)
    if ram is None:
        raise InputError("cannot tell how much memory is free here: give the context as a number (--ctx 8192)")
    limit = shape.context_length or 4096
    n = largest_context(shape, weights, ram_budget(ram), kv_type, limit=limit, flash_attn=flash_attn)
    if n is not None and n != limit:
        n = round_context(n)
    if n is None:
        need = estimate(shape, weights, min(limit, 1024), kv_type, flash_attn=flash_attn).total
        raise InputError(f"{Path(gguf).name} does not fit in {gib(ram)} of free memory: it needs about {gib(need)} "
                         "even at 1024 tokens; close other programs or use a smaller quant")
    return ContextChoice(n, estimate(shape, weights, n, kv_type, flash_attn=flash_attn), ram, limit)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'16G', '16GB', '16GiB', '512M' -> bytes (binary units: what a machine's RAM is sold as)."""
    found = _SIZE.match(str(text))
    if not found:
        raise InputError(f"cannot read {text!r} as a memory size: write it like 16G or 512M")
    scale = {"": 1, "k": 1024, "m": MIB, "g": GIB, "t": 1024**4}[found[2].lower()]
    if found[2] == "" and float(found[1]) < 1024:
        scale = GIB  # a bare small number is meant in GiB
    return int(float(found[1]) * scale)


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB), the way the tables print them."""
    if n < GIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / GIB:.{1 if n < 100 * GIB else 0}f} GiB"


def round_context(n: int) -> int:
    """Down to a power of two times 1024 or a multiple of 1024: contexts users recognise."""
    if n >= 1024:
        return n // 1024 * 1024
    return max(CTX_PAD, n // CTX_PAD * CTX_PAD)


__all__ = ["KV_TYPES", "ContextChoice", "MemoryEstimate", "ModelShape", "available_ram", "choose_context",
           "compute_buffer_bytes", "estimate", "format_table", "gguf_file_bytes", "gguf_model", "kv_bytes_per_token",
           "kv_cache_bytes", "largest_context", "parse_size", "ram_budget", "table", "total_ram"]
