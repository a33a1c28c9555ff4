"""Parity, token for token: every family renders the same prompt ids in HF, llama-cpp-python (from the exported
GGUF's own metadata), Ollama (Go text/template) and LM Studio (preset Jinja, legacy prefixes).

Each family's GGUF is made by llama.cpp's converter with the family's template and EOS: the tiny Llama-3 fixture
for the Llama-3 families, the demo model (SmolLM2-135M-Instruct, real weights) for ChatML.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import template_runtimes as rt
from l3zh_local import hfmodel
from l3zh_local.convert import TokenizerOverrides, convert_to_gguf
from l3zh_local.deploy import read_modelfile, write_deploy_files
from l3zh_local.prompt import ChatPrompt, split_pieces
from l3zh_local.templates import get_family, list_families
from support import fixtures

LLAMA3_FAMILIES = ["llama3", "llama3.1", "shareai-instruct-sft", "shareai-base-sft"]
ALL_FAMILIES = [f.name for f in list_families()]
assert set(LLAMA3_FAMILIES) | {"chatml"} == set(ALL_FAMILIES), "a new family needs a parity fixture"
BOS_ID = 128000

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "with_system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a colour."},
    ],
    "empty_system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hello"}],
    "chinese_emoji": [
        {"role": "system", "content": "你是一个乐于助人的助手，请用中文回答。"},
        {"role": "user", "content": "你好！今天天气怎么样？🌞😀"},
        {"role": "assistant", "content": "今天阳光明媚 ☀️，适合出去走走。"},
        {"role": "user", "content": "谢谢 👍 再讲个笑话吧。"},
    ],
    "same_role_twice": [
        {"role": "user", "content": "First part."},
        {"role": "user", "content": "Second part."},
        {"role": "assistant", "content": "Answer one."},
        {"role": "assistant", "content": "Answer two."},
        {"role": "user", "content": "Third."},
    ],
    "trailing_assistant": [
        {"role": "user", "content": "Start a story."},
        {"role": "assistant", "content": "Once upon a time"},
    ],
    "untrimmed_text": [{"role": "user", "content": "  spaces around, and a newline \n"}],
}


@pytest.fixture(scope="session")
def go_renderer(tmp_path_factory):
    exe = rt.build_go_renderer(tmp_path_factory.mktemp("go"))
    if exe is None:
        pytest.fail(f"Go is missing, so Ollama's template engine cannot run: {rt.GO_INSTALL_HINT}")
    return exe


class Runtime:
    """One family's exported artifacts and the runtimes loaded on them."""

    def __init__(self, family, hf_tokenizer, llm, deploy_dir: Path, gguf_path: Path):
        self.family, self.hf, self.llm, self.gguf_path = family, hf_tokenizer, llm, gguf_path
        paths = write_deploy_files(gguf_path, family, model_name=f"test-{family.name}", num_ctx=2048)
        self.modelfile = read_modelfile(paths[0].read_text(encoding="utf-8"))
        self.preset = json.loads(paths[1].read_text(encoding="utf-8"))
        self.legacy = json.loads(paths[2].read_text(encoding="utf-8"))
        self.adds_bos = llm._model.add_bos_token()
        self.bos_text = llm._model.token_get_text(llm.token_bos())
        self.eos_text = llm._model.token_get_text(llm.token_eos())
        self.specials = [t.content for t in self.hf.added_tokens_decoder.values() if t.special]
        self.prompt = ChatPrompt.from_llama(llm)  # what chat, verify and serve use

    def tokenize(self, text: str) -> list[int]:
        """How llama.cpp runtimes tokenize a rendered prompt: BOS by add_bos_token, special tokens parsed."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.adds_bos, special=True)

    def text_ids(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def text_ids_special(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def control_id(self, text: str) -> int:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert len(ids) == 1, f"{text!r} is not one token"
        return ids[0]

    def preset_field(self, key):
        return next(f["value"] for f in self.preset["operation"]["fields"] if f["key"] == key)


def _load_llama(path: Path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=1024, n_threads=2, verbose=False, seed=0)


@pytest.fixture(scope="session")
def runtimes(tiny_llama3_dir, tools, tmp_path_factory):
    """family name -> Runtime, built lazily (each Llama-3 family converts the tiny model once)."""
    cache: dict[str, Runtime] = {}

    def get(name: str) -> Runtime:
        if name in cache:
            return cache[name]
        family = get_family(name)
        out = tmp_path_factory.mktemp(f"export-{name}")
        if name == "chatml":
            from transformers import AutoTokenizer

            from l3zh_local import demo

            source = demo.demo_model_dir()  # the demo model (SmolLM2-135M-Instruct) as an HF folder, cached
            gguf_path = out / "smollm2-135m-instruct.f16.gguf"
            convert_to_gguf(
                hfmodel.inspect_model(source), gguf_path, tools=tools,
                overrides=TokenizerOverrides(chat_template=family.jinja, eos_token=family.eos_token),
            )
            llm = _load_llama(gguf_path)
            hf = AutoTokenizer.from_pretrained(source)
            hf.chat_template = family.jinja
        else:
            gguf_path = out / f"tiny-{name}.bf16.gguf"
            convert_to_gguf(
                hfmodel.inspect_model(tiny_llama3_dir), gguf_path, tools=tools,
                overrides=TokenizerOverrides(chat_template=family.jinja, eos_token=family.eos_token),
            )
            llm = _load_llama(gguf_path)
            hf = fixtures.build_llama3_tokenizer(chat_template=family.jinja, eos_token=family.eos_token)
        assert llm.chat_format == "chat_template.default"  # the GGUF's own Jinja, not a built-in format
        cache[name] = Runtime(family, hf, llm, out, gguf_path)
        return cache[name]

    return get


def _all_ids(r: Runtime, go_renderer, conversation: list[dict]) -> dict[str, list[int]]:
    family = r.family
    ids = {
        "hf": list(r.hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)["input_ids"]),
        "llama_cpp": rt.llama_cpp_chat_ids(r.llm, conversation),
    }
    [ollama_text] = rt.go_render(go_renderer, r.modelfile.template, r.modelfile.system, [conversation])
    ids["ollama"] = r.tokenize(ollama_text)
    template = r.preset_field("llm.prediction.promptTemplate")
    lms_messages = rt.lmstudio_messages(conversation, r.preset_field("llm.prediction.systemPrompt"))
    ids["lmstudio"] = r.tokenize(rt.lmstudio_jinja_prompt(
        template["jinjaPromptTemplate"]["template"], lms_messages, r.bos_text, r.eos_text, r.adds_bos))
    if rt.legacy_expressible(family, conversation):
        ids["lmstudio_legacy"] = r.tokenize(rt.lmstudio_legacy_prompt(r.legacy, conversation))
    # The project's own prompt path (chat, verify, serve), on the GGUF's own metadata, agrees too.
    ids["l3zh_local"] = r.prompt.ids(conversation)
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("family_name", ALL_FAMILIES)
def test_every_runtime_gives_the_same_ids(family_name, runtimes, go_renderer):
    r = runtimes(family_name)
    for conv_name, conversation in CONVERSATIONS.items():
        ids = _all_ids(r, go_renderer, conversation)
        reference = ids["hf"]
        for runtime, got in ids.items():
            assert got == reference, f"{family_name}/{conv_name}: {runtime} differs from HF"
        if r.adds_bos:
            assert reference[0] == BOS_ID and reference.count(BOS_ID) == 1, f"{family_name}/{conv_name}: BOS"
        else:  # no BOS added: the prompt is exactly the rendered template, which starts with its own token
            assert reference == r.text_ids_special(r.family.render(conversation))
    # The legacy preset was really compared for some conversations of every family.
    assert any(rt.legacy_expressible(r.family, c) for c in CONVERSATIONS.values())


@pytest.mark.slow
@pytest.mark.parametrize("family_name", LLAMA3_FAMILIES)
def test_gguf_metadata_carries_the_family(family_name, runtimes):
    r = runtimes(family_name)
    family = r.family
    assert r.llm.metadata["tokenizer.chat_template"] == family.jinja
    expected_eos = {"<|eot_id|>": 128009, "<|end_of_text|>": 128001}[family.eos_token]
    assert r.llm.token_eos() == expected_eos
    assert r.adds_bos and r.llm.token_bos() == BOS_ID


@pytest.mark.slow
@pytest.mark.parametrize("family_name", ALL_FAMILIES)
def test_generation_stops_at_the_family_stop_token(family_name, runtimes):
    """Force two ordinary tokens, then the family's EOS: llama-cpp-python must stop there and not print it."""
    r = runtimes(family_name)
    plain = r.text_ids(" ok")
    stop_id = r.control_id(r.family.eos_token)
    capture = rt.PromptCapture(force=[plain[0], plain[0], stop_id, plain[0], plain[0]])
    out = r.llm.create_chat_completion(
        messages=CONVERSATIONS["single"], max_tokens=20, logits_processor=[capture], temperature=0.0,
    )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 2
    assert r.family.eos_token not in choice["message"]["content"]


# ----- arbitrary message text -----

LOOKALIKES = ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_of_text|>", "<|im_end|>",
              "<|im_start|>", "<<SYS>>", "<</SYS>>", "{{ .Content }}", "{% endfor %}", "{{", "}}", '"""', "'", '"',
              "\\n", "\n\n"]
TEXT = st.lists(st.one_of(st.sampled_from(LOOKALIKES), st.text(max_size=12)), max_size=4).map("".join).filter(
    lambda s: "\ue000" not in s and "\ue001" not in s)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
    min_size=1, max_size=5,
)


@pytest.mark.slow
@pytest.mark.parametrize("family_name", ["llama3.1", "shareai-base-sft", "chatml"])
def test_arbitrary_text_keeps_parity_and_never_injects_control_tokens(family_name, runtimes, go_renderer):
    r = runtimes(family_name)
    lms_template = r.preset_field("llm.prediction.promptTemplate")["jinjaPromptTemplate"]["template"]
    lms_system = r.preset_field("llm.prediction.systemPrompt")

    def ollama(msgs):
        return rt.go_render(go_renderer, r.modelfile.template, r.modelfile.system, [msgs])[0]

    def lmstudio(msgs):
        return rt.lmstudio_jinja_prompt(lms_template, rt.lmstudio_messages(msgs, lms_system), r.bos_text,
                                        r.eos_text, r.adds_bos)

    def encode(pieces):
        ids = []
        for piece in pieces:
            ids += [r.control_id(piece.text)] if piece.control else r.text_ids(piece.text)
        return ids

    bos = [r.llm.token_bos()] if r.adds_bos else []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(MESSAGES)
    def check(conversation):
        # The project's own path on the GGUF's own template: what chat, verify and serve send to the model.
        pieces = r.prompt.pieces(conversation)
        ids = r.prompt.ids(conversation)
        # Ollama and LM Studio render without the BOS text (their runtimes add the BOS token).
        for render in (ollama, lmstudio):
            assert bos + encode(split_pieces(render, conversation, r.specials)) == ids
        # Control tokens come from the template alone: the same ones as for harmless text, nothing more.
        benign = [dict(m, content="x") for m in conversation]
        expected_controls = [p.text for p in r.prompt.pieces(benign) if p.control]
        assert [p.text for p in pieces if p.control] == expected_controls
        control_ids = set(r.prompt.control_tokens.values())
        assert sum(1 for i in ids if i in control_ids) == len(expected_controls)
        # Plain text (no look-alikes): the safe encoding is what HF's apply_chat_template gives.
        if not any(s in m["content"] for m in conversation for s in r.specials):
            hf = r.hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)["input_ids"]
            assert list(hf) == ids

    check()
