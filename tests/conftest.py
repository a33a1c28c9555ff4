"""Session fixtures: real models built offline once, converted by the real llama.cpp converter."""

from __future__ import annotations

import pytest

from l3zh_local import demo, fixtures, hfmodel, toolchain
from l3zh_local.convert import convert_to_gguf


@pytest.fixture(scope="session")
def tools() -> toolchain.LlamaCpp:
    return toolchain.llama_cpp()


@pytest.fixture(scope="session")
def tiny_llama3_dir():
    """Tiny LlamaForCausalLM (bf16) with Meta's Llama-3 tokenizer; cached across sessions."""
    return fixtures.tiny_llama3()


@pytest.fixture(scope="session")
def tiny_llama3_gguf(tiny_llama3_dir, tools, tmp_path_factory):
    """The tiny fixture converted to a bf16 GGUF by llama.cpp's converter."""
    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny.bf16.gguf"
    convert_to_gguf(hfmodel.inspect_model(tiny_llama3_dir), out, tools=tools)
    return out


@pytest.fixture(scope="session")
def demo_dir():
    """The embedded demo model (SmolLM2-135M-Instruct) as an HF folder; cached across sessions."""
    return demo.demo_model_dir()
