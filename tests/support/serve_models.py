"""GGUFs for the serve tests and benchmark, built offline once and kept in the cache.

``demo_gguf("q8_0")``: the demo model (SmolLM2-135M-Instruct, real weights) converted straight to q8_0 with the chatml
family's template and EOS, as export writes them; a trained model that answers and stops by itself.
``demo_gguf("q4_k_m")``: the same quantized to q4_k_m (no importance matrix: answers are worse, speed is the same).
``tiny_gguf()``: the tiny random Llama-3 with Meta's tokenizer and Meta's template, bf16.
"""

from __future__ import annotations

from pathlib import Path

from l3zh_local import hfmodel, settings
from l3zh_local.convert import TokenizerOverrides, convert_to_gguf

from . import fixtures


def _folder() -> Path:
    folder = settings.cache_dir() / "fixtures" / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def demo_gguf(kind: str = "q8_0") -> Path:
    from l3zh_local.demo import demo_model_dir
    from l3zh_local.quantize import get_quant_type, quantize
    from l3zh_local.templates import get_family

    family = get_family("chatml")
    overrides = TokenizerOverrides(chat_template=family.jinja, eos_token=family.eos_token)
    q8 = _folder() / "demo.q8_0.gguf"
    if not q8.is_file():
        convert_to_gguf(hfmodel.inspect_model(demo_model_dir()), q8, outtype="q8_0", overrides=overrides)
    if kind == "q8_0":
        return q8
    out = _folder() / f"demo.{kind}.gguf"
    if not out.is_file():
        f16 = _folder() / "demo.f16.gguf"
        if not f16.is_file():
            convert_to_gguf(hfmodel.inspect_model(demo_model_dir()), f16, outtype="f16", overrides=overrides)
        quantize(f16, out, get_quant_type(kind))
    return out


def tiny_gguf() -> Path:
    out = _folder() / "tiny.bf16.gguf"
    if not out.is_file():
        convert_to_gguf(hfmodel.inspect_model(fixtures.tiny_llama3()), out)
    return out
