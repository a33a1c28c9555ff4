"""Conversion of the tiny Llama-3 fixture by llama.cpp's real converter, checked with the real runtime."""

from __future__ import annotations

import numpy as np
import pytest

from l3zh_local import ggufmeta, hfmodel
from l3zh_local.convert import convert_to_gguf

CHINESE_CHAT = [
    {"role": "system", "content": "你是一个乐于助人的中文助手。"},
    {"role": "user", "content": "请用三句话介绍一下长城的历史，以及它为什么重要？"},
]


def test_tiny_gguf_metadata(tiny_llama3_gguf, tiny_llama3_dir):
    meta = ggufmeta.read_metadata(tiny_llama3_gguf)
    config = hfmodel.inspect_model(tiny_llama3_dir).config
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.bos_token_id"] == 128000
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.eos_token_id"] == 128009
    assert meta["llama.context_length"] == config["max_position_embeddings"] == 8192
    assert meta["llama.rope.freq_base"] == pytest.approx(500000.0)
    assert meta["llama.attention.head_count"] == 4
    assert meta["llama.attention.head_count_kv"] == 2
    assert ggufmeta.file_type_name(meta) == "bf16"  # the fixture's weights are bf16: kept as they are


def test_vocab_reproduces_llama_cpp_test_vectors(tiny_llama3_gguf, tools):
    from llama_cpp import Llama

    inp_path, out_path = tools.vocab_test_vectors
    inputs = inp_path.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = out_path.read_text(encoding="utf-8").splitlines()
    # 46 vectors in the pinned llama.cpp (46 inputs, 46 output lines).
    assert len(inputs) == len(expected) == 46
    llm = Llama(str(tiny_llama3_gguf), vocab_only=True, verbose=False)
    for text, ids in zip(inputs, expected):
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert got == [int(x) for x in ids.split()], f"tokenization differs for {text!r}"


def _hf_logits(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _gguf_logits(gguf, ids):
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def _mean_kl(ref_logits, test_logits):
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p_log, q_log = log_softmax(ref_logits.astype(np.float64)), log_softmax(test_logits)
    return float((np.exp(p_log) * (p_log - q_log)).sum(axis=-1).mean())


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_16bit_gguf_logits_match_hf(tiny_llama3_dir, tools, tmp_path, outtype):
    from transformers import AutoTokenizer

    gguf = tmp_path / f"tiny.{outtype}.gguf"
    convert_to_gguf(hfmodel.inspect_model(tiny_llama3_dir), gguf, outtype=outtype, tools=tools)
    tok = AutoTokenizer.from_pretrained(tiny_llama3_dir)
    ids = tok.apply_chat_template(CHINESE_CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == 128000 and ids.count(128000) == 1
    ref, got = _hf_logits(tiny_llama3_dir, ids), _gguf_logits(gguf, ids)
    kl = _mean_kl(ref, got)
    assert kl < 1e-4, f"mean KL divergence {kl:.2e}"
    same_top = float((ref.argmax(-1) == got.argmax(-1)).mean())
    # ggml's CPU kernels round activations to bf16 for bf16 weights, so near-ties of a random model can flip;
    # f16 keeps 3 more mantissa bits and must agree everywhere.
    assert same_top == 1.0 if outtype == "f16" else same_top >= 0.95, f"same top token at {same_top:.1%}"


def test_gguf_tokenizes_chat_like_hf(tiny_llama3_gguf, tiny_llama3_dir):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama3_dir)
    text = tok.apply_chat_template(CHINESE_CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = Llama(str(tiny_llama3_gguf), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
