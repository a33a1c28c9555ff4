"""The context length and RoPE base an export writes: the seed's long-context trick, and Llama-3.1's native one.

Llama-3 was trained on 8192 positions with RoPE base (rope_theta) 500000. The seed project stretches it to 32K (or
96K) by editing config.json: ``max_position_embeddings`` 32768 and ``rope_theta`` 1000000 (or 4000000). A larger
base rotates every position's frequencies more slowly, so distant positions look more like the near ones the model
was trained on. `export --ctx N --rope-theta T` does the same without touching the user's files: the converter
reads a staged copy of config.json (convert.py), so the GGUF carries ``llama.context_length`` N and
``llama.rope.freq_base`` T.

Llama-3.1 reaches 131072 positions natively through ``rope_scaling`` of type ``llama3`` (per-frequency factors,
which llama.cpp's converter writes as the ``rope_freqs`` tensor). Its base is part of that scheme, so --rope-theta is
refused there, and --ctx only chooses how much of the native context the deployment files ask for.

Both transformers' config layouts are read: 4.x (``rope_theta`` and ``rope_scaling``) and 5.x (``rope_parameters``
holding both).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from .errors import InputError

# The seed's figures, quoted in messages.
SEED_ROPE_THETAS = (1_000_000.0, 4_000_000.0)


@dataclass(frozen=True)
class RopeInfo:
    """What a config.json says about positions."""

    context_length: int | None  # max_position_embeddings
    rope_theta: float | None
    scaling_type: str | None  # "llama3", "linear", "yarn", ...; None for plain RoPE
    original_context: int | None = None  # the scaling's original_max_position_embeddings


def rope_info(config: dict) -> RopeInfo:
    params = _rope_dict(config)
    kind = params.get("rope_type") or params.get("type")
    theta = params.get("rope_theta", config.get("rope_theta"))
    return RopeInfo(
        context_length=config.get("max_position_embeddings"),
        rope_theta=float(theta) if theta is not None else None,
        scaling_type=None if kind in (None, "default") else str(kind),
        original_context=params.get("original_max_position_embeddings"),
    )


def _rope_dict(config: dict) -> dict:
    for key in ("rope_parameters", "rope_scaling"):
        value = config.get(key)
        if isinstance(value, dict):
            return value
    return {}


@dataclass(frozen=True)
class ContextOverride:
    """What the staged config.json changes; None leaves the model's own value."""

    ctx: int | None = None  # max_position_embeddings -> llama.context_length
    rope_theta: float | None = None  # -> llama.rope.freq_base

    @property
    def empty(self) -> bool:
        return self.ctx is None and self.rope_theta is None

    def to_dict(self) -> dict:
        return {"ctx": self.ctx, "rope_theta": self.rope_theta}


@dataclass(frozen=True)
class ContextPlan:
    override: ContextOverride  # what the GGUF gets
    gguf_context: int | None  # the context the GGUF will declare
    deploy_ctx: int | None  # what the deployment files should ask for (None: the caller's default)
    notes: tuple[str, ...] = ()


def plan_context(config: dict, ctx: int | None = None, rope_theta: float | None = None) -> ContextPlan:
    """Check --ctx / --rope-theta against the model's config and decide what the GGUF and deploy files get."""
    info = rope_info(config)
    native = info.context_length
    if ctx is not None and ctx < 256:
        raise InputError(f"--ctx {ctx} is too small: give at least 256 tokens")
    if rope_theta is not None and not (math.isfinite(rope_theta) and rope_theta > 0):
        raise InputError(f"--rope-theta {rope_theta} is not a usable RoPE base: give a positive number like 1000000")
    if info.scaling_type is not None:
        if rope_theta is not None:
            what = " (the native long context of Llama-3.1)" if info.scaling_type == "llama3" else ""
            raise InputError(
                f"--rope-theta cannot be used on this model: its config.json has rope_scaling of type "
                f"{info.scaling_type}{what}, which fixes how positions stretch up to {native}; "
                f"use --ctx up to {native} instead")
        if ctx is not None and native is not None and ctx > native:
            raise InputError(f"--ctx {ctx} is beyond this model's {native} positions "
                             f"(rope_scaling {info.scaling_type}); give --ctx {native} or less")
        return ContextPlan(ContextOverride(), native, ctx)
    notes: list[str] = []
    new_ctx = ctx if ctx is not None and ctx != native else None
    new_theta = rope_theta if rope_theta is not None and rope_theta != info.rope_theta else None
    if ctx is not None and native is not None and ctx > native and rope_theta is None:
        notes.append(f"--ctx {ctx} goes past the {native} positions the model was trained on with its RoPE base "
                     f"{info.rope_theta:g}: the seed raises the base with it (--rope-theta {SEED_ROPE_THETAS[0]:.0f})")
    return ContextPlan(ContextOverride(new_ctx, new_theta), ctx or native, ctx, tuple(notes))


NO_OVERRIDE = ContextOverride()


def apply_override(config: dict, override: ContextOverride) -> dict:
    """A copy of `config` with the override written where transformers and llama.cpp's converter read it."""
    config = copy.deepcopy(config)
    if override.ctx is not None:
        config["max_position_embeddings"] = int(override.ctx)
    if override.rope_theta is not None:
        config["rope_theta"] = float(override.rope_theta)
        # The converter (and transformers 5) read the base from rope_parameters first when it is there.
        for key in ("rope_parameters", "rope_scaling"):
            if isinstance(config.get(key), dict):
                config[key]["rope_theta"] = float(override.rope_theta)
    return config


def override_for_gguf(config: dict, gguf_meta: dict) -> ContextOverride:
    """The override that makes an HF config match a GGUF exported from it (its context length and RoPE base)."""
    arch = gguf_meta.get("general.architecture", "llama")
    info = rope_info(config)
    # llama-cpp-python's metadata holds strings; ggufmeta's holds numbers.
    ctx = gguf_meta.get(f"{arch}.context_length")
    ctx = int(ctx) if ctx is not None else None
    base = gguf_meta.get(f"{arch}.rope.freq_base")
    base = float(base) if base is not None else None
    new_ctx = int(ctx) if ctx is not None and ctx != info.context_length else None
    new_theta = None
    if base is not None and info.rope_theta is not None and not math.isclose(base, info.rope_theta, rel_tol=1e-6):
        new_theta = float(base)
    return ContextOverride(new_ctx, new_theta)


def original_context(config: dict) -> int:
    """Positions the model was trained on before any stretching: the scaling's original, else the config's."""
    info = rope_info(config)
    return int(info.original_context or info.context_length or 8192)
