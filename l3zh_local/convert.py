"""HF folder to 16-bit (or q8_0) GGUF with llama.cpp's own converter.

The chat template and EOS the GGUF must carry are decided by us, not by whatever the model folder says: we give
the converter a staging folder whose tokenizer_config.json carries them, the weights linked, not copied. An export's
context override (context.py: --ctx / --rope-theta) is staged the same way, in a rewritten config.json.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import toolchain
from .context import NO_OVERRIDE, ContextOverride, apply_override
from .errors import InputError
from .files import atomic_output, ensure_free_space, read_json
from .hfmodel import ModelInfo, estimate_gguf_bytes

CONVERTER_OUTTYPES = {"f16": 16.0, "bf16": 16.0, "f32": 32.0, "q8_0": 8.5}
# Files the converter reads that we may rewrite; everything else is linked into the staging folder as it is.
_REWRITTEN = {"tokenizer_config.json", "chat_template.jinja", "chat_template.json"}


@dataclass(frozen=True)
class TokenizerOverrides:
    """What the GGUF's tokenizer metadata must say, whatever the model folder says."""

    chat_template: str | None = None
    eos_token: str | None = None  # token text, e.g. "<|eot_id|>"

    @property
    def empty(self) -> bool:
        return self.chat_template is None and self.eos_token is None


def resolve_outtype(info: ModelInfo, outtype: str) -> str:
    outtype = outtype.lower()
    if outtype == "auto":
        return info.outtype_16bit
    if outtype not in CONVERTER_OUTTYPES:
        raise InputError(f"unknown conversion type {outtype}: choose one of auto, {', '.join(CONVERTER_OUTTYPES)}")
    return outtype


def convert_to_gguf(
    info: ModelInfo,
    outfile: Path,
    *,
    outtype: str = "auto",
    overrides: TokenizerOverrides = TokenizerOverrides(),
    context: ContextOverride = NO_OVERRIDE,
    tools: toolchain.LlamaCpp | None = None,
    force: bool = False,
) -> str:
    """Convert the model described by `info` into `outfile`; return the GGUF type written.

    context: the context length and RoPE base the GGUF declares instead of config.json's (the user's files are
    left as they are).
    """
    outtype = resolve_outtype(info, outtype)
    tools = tools or toolchain.llama_cpp()
    outfile = Path(outfile)
    expected = estimate_gguf_bytes(info, CONVERTER_OUTTYPES[outtype])
    ensure_free_space(outfile.parent, expected, f"the {outtype} GGUF")
    with atomic_output(outfile, force=force) as tmp:
        with tempfile.TemporaryDirectory(prefix="l3zh-stage-") as stage:
            staged = not (overrides.empty and context.empty)
            source = _stage(info.path, Path(stage), overrides, context) if staged else info.path
            toolchain.run_converter(tools, source, tmp, outtype, expected_bytes=expected)
    return outtype


def _stage(model_dir: Path, stage: Path, overrides: TokenizerOverrides,
           context: ContextOverride = NO_OVERRIDE) -> Path:
    """A folder that looks like `model_dir` but whose tokenizer config carries `overrides` and whose config.json
    carries `context`."""
    rewritten = _REWRITTEN | ({"config.json"} if not context.empty else set())
    for entry in model_dir.iterdir():
        if entry.name not in rewritten:
            os.symlink(entry.resolve(), stage / entry.name)
    if not context.empty:
        model_config = apply_override(read_json(model_dir / "config.json"), context)
        (stage / "config.json").write_text(json.dumps(model_config, indent=2), encoding="utf-8")
    config_path = model_dir / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if overrides.chat_template is not None:
        config["chat_template"] = overrides.chat_template
    else:
        template = existing_chat_template(model_dir)
        if template is not None:
            config["chat_template"] = template
    if overrides.eos_token is not None:
        config["eos_token"] = overrides.eos_token
    (stage / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return stage


def existing_chat_template(model_dir: Path) -> str | None:
    """The chat template an HF folder carries: tokenizer_config.json, chat_template.jinja or chat_template.json."""
    model_dir = Path(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if isinstance(config.get("chat_template"), str):
        return config["chat_template"]
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = model_dir / "chat_template.json"
    if as_json.is_file():
        return read_json(as_json).get("chat_template")
    return None
