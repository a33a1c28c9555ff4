"""Small models built offline, for tests and benchmarks.

``tiny_llama3``: a randomly initialised LlamaForCausalLM with Meta's real Llama-3 tokenizer (from the
``llama-models`` package, a test extra). Its hidden and FFN sizes are multiples of 256 so k-quants are really
exercised. Built once into the cache and reused.

``tiny_llama31``: the same weights with Llama-3.1's position scheme (rope_scaling of type llama3, 131072 positions),
for the long-context tests: llama.cpp's converter turns that scaling into a ``rope_freqs`` tensor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from l3zh_local import locks, settings
from l3zh_local.errors import InputError
from l3zh_local.templates.registry import META_LLAMA3_TEMPLATE

TINY_LLAMA3_VERSION = "v1"
TINY_LLAMA31_VERSION = "v1"
# Llama-3.1-8B's own rope_scaling.
LLAMA31_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
BOS, EOS_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def llama3_tokenizer_model() -> Path:
    try:
        import llama_models
    except ImportError:
        raise InputError("the tiny Llama-3 fixture needs the test extra: pip install -e '.[test]'") from None
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise InputError(f"llama-models has no Llama-3 tokenizer at {path}")
    return path


def build_llama3_tokenizer(chat_template: str = META_LLAMA3_TEMPLATE, eos_token: str = EOT):
    """Meta's Llama-3 tokenizer as an HF fast tokenizer that prepends <|begin_of_text|> like the original."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = MetaTokenizer(llama3_tokenizer_model())
    specials = sorted(meta.special_tokens, key=meta.special_tokens.get)
    backend = TikTokenConverter(
        vocab_file=str(llama3_tokenizer_model()), pattern=meta.pat_str, extra_special_tokens=specials
    ).converted()
    bos_id = meta.special_tokens[BOS]
    # Without this post-processor the converter hashes the pre-tokenizer as smaug-bpe, not llama-bpe.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=eos_token, model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = chat_template
    return tok


def tiny_llama3(dest: Path | None = None, *, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Return the folder of the tiny Llama-3 fixture, building it once (about 20 s)."""
    dest = Path(dest) if dest else settings.cache_dir() / "fixtures" / f"tiny-llama3-{TINY_LLAMA3_VERSION}-{dtype}"
    return _tiny(dest, dtype=dtype, seed=seed, rope_theta=500000.0, max_position_embeddings=8192)


def tiny_llama31(dest: Path | None = None, *, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """The tiny fixture with Llama-3.1's rope_scaling (llama3, factor 8) and 131072 positions, built once."""
    from l3zh_local.templates import get_family

    dest = Path(dest) if dest else settings.cache_dir() / "fixtures" / f"tiny-llama31-{TINY_LLAMA31_VERSION}-{dtype}"
    return _tiny(dest, dtype=dtype, seed=seed, max_position_embeddings=131072,
                 rope_parameters={**LLAMA31_ROPE_SCALING, "rope_theta": 500000.0},
                 chat_template=get_family("llama3.1").jinja)


def _tiny(dest: Path, *, dtype: str, seed: int, chat_template: str = META_LLAMA3_TEMPLATE, **rope) -> Path:
    if (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file():
        return dest
    # Test processes running side by side (pytest -n, two sessions) build it once; the others wait and reuse it.
    with locks.hold(locks.lock_path_for(dest), f"the test fixture cache {dest}"):
        if (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file():
            return dest
        return _build_tiny_llama3(dest, dtype, seed, chat_template, rope)


def _build_tiny_llama3(dest: Path, dtype: str, seed: int, chat_template: str, rope: dict) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_llama3_tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=128256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **rope,
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=False,
        # Larger than the usual 0.02 so the logits are peaked and the top token means something.
        initializer_range=0.08,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.bos_token_id = 128000
    model.generation_config.eos_token_id = [128001, 128009]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        os.mkdir(tmp)  # TemporaryDirectory wants something to clean up
    return dest
