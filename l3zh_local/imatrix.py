"""Importance matrices, computed with the HF model and passed to libllama's quantizer in-process.

For every linear layer, llama.cpp's quantizer can weigh its rounding error by how large each input column's
activations are: the mean of x_j^2 over calibration tokens. llama.cpp computes that with its C++ llama-imatrix tool;
we compute the same statistic with forward hooks on the HF model (no C++ build needed) and hand it to
``llama_model_quantize`` through ``llama_model_quantize_params.imatrix``.

Measured on the demo model (SmolLM2-135M): without an imatrix its q4_k_m answers "What is the capital of France?"
with nonsense; with one, "The capital of France is Paris." (see benchmarks/).
"""

from __future__ import annotations

import ctypes
import re
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import InputError

# HF Llama module names -> llama.cpp GGUF tensor names.
_LAYER_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Models at most this large get an imatrix by default: a forward pass over the calibration text stays short.
AUTO_MAX_PARAMS = 4_000_000_000


def default_calibration_text() -> str:
    """Mixed Chinese/English calibration text written for this project (chat turns, prose, code, numbers)."""
    return resources.files("l3zh_local").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def gguf_tensor_name(hf_module: str) -> str | None:
    match = _LAYER.match(hf_module)
    if match and match.group(2) in _LAYER_MODULES:
        return f"blk.{match.group(1)}.{_LAYER_MODULES[match.group(2)]}.weight"
    return None


def compute_imatrix(model_dir: Path, text: str, *, chunk_tokens: int = 512, max_tokens: int = 8192,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Mean squared activation of each input column of each linear layer, keyed by GGUF tensor name."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text, add_special_tokens=True)["input_ids"][:max_tokens]
    if len(ids) < 16:
        raise InputError("the calibration text is too short for an importance matrix: give a few pages of text")
    from .hfmodel import inspect_model

    # fp32 where it fits comfortably; a large model stays in its own 16-bit dtype (an 8B model in fp32 is 32 GB).
    small = inspect_model(model_dir).n_params <= 2_000_000_000
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if small else "auto",
                                                 low_cpu_mem_usage=True)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [module.register_forward_pre_hook(hook_for(gguf))
               for hf_name, module in model.named_modules() if (gguf := gguf_tensor_name(hf_name))]
    record_output = hook_for("output.weight")
    try:
        with torch.no_grad():
            starts = range(0, len(ids), chunk_tokens)
            for start in tqdm(starts, desc="importance matrix", unit="chunk", leave=False, disable=not progress or None):
                # The decoder stack only: its normed output is lm_head's input, and the vocabulary projection
                # itself (128k columns for Llama-3) would cost time and memory for nothing.
                hidden = model.model(torch.tensor([ids[start:start + chunk_tokens]])).last_hidden_state
                record_output(None, (hidden,))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).to(torch.float32).numpy() for name in sums}


def save_imatrix(path: Path, data: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in data.items()}, str(path))


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InputError(f"{path} is not an importance matrix saved by l3zh-local ({exc})") from None


class ImatrixParam:
    """The NULL-terminated C array libllama reads; keeps the numpy buffers alive while it is in use."""

    def __init__(self, data: dict[str, np.ndarray]):
        import llama_cpp

        self._buffers = [(name.encode(), np.ascontiguousarray(v, dtype=np.float32)) for name, v in data.items()]
        self._array = (llama_cpp.llama_model_imatrix_data * (len(self._buffers) + 1))()
        for slot, (name, values) in zip(self._array, self._buffers):
            slot.name = name
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = values.size
        self._array[len(self._buffers)].name = None  # terminator
        self.pointer = ctypes.cast(self._array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
