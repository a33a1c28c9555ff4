"""Session fixtures: real models built offline once, converted by the real llama.cpp converter.

Tests come in two lanes: the fast one (pure functions: parsing, detection, thresholds, file names; under a
minute) and the slow one (`-m slow`: models built, converted, quantized, loaded). A test that uses a model fixture
is in the slow lane by itself; a module that builds its own models says `pytestmark = pytest.mark.slow`.
"""

from __future__ import annotations

import pytest

from l3zh_local import demo, hfmodel, toolchain
from l3zh_local.convert import convert_to_gguf
from support import fixtures

# Every fixture that builds or converts a model depends on one of these.
MODEL_FIXTURES = {"tools", "tiny_llama3_dir", "tiny_llama31_dir", "demo_dir"}


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
def tiny_llama31_dir():
    """The tiny fixture with Llama-3.1's rope_scaling (llama3) and 131072 positions; cached across sessions."""
    return fixtures.tiny_llama31()


@pytest.fixture(scope="session")
def demo_dir():
    """The embedded demo model (SmolLM2-135M-Instruct) as an HF folder; cached across sessions."""
    return demo.demo_model_dir()
