"""Verify an exported GGUF against the model it came from.

Checks, each a row of the report:
- ``tokenizer``: the GGUF's tokenizer (llama-cpp-python) gives the reference tokenizer's ids on the packaged
  multilingual text set, with and without parsing of special tokens, and adds BOS the same way;
- ``template``: the GGUF's own ``tokenizer.chat_template`` renders sample chats in jinja2's sandbox, holds one BOS,
  and gives token for token the expected rendering (when an expected template or family is given);
- ``eos``: the GGUF's EOS id is the expected stop token (when given) and the token the template ends an assistant
  turn with, and the runtime treats it as end of generation;
- ``quality``: mean KL divergence, share of positions with the same top token and perplexity ratio of the GGUF
  against the reference (HF model in fp32 on CPU, or a 16-bit GGUF in the same runtime) on held-out Chinese and
  English text, judged by per-quant-type thresholds;
- ``stop``: a short greedy chat ends with a stop token within a bounded number of tokens and emits no template
  text (on an untrained model the stop is forced through the logits instead, and the report says so).

`verify_endpoint` (``verify --endpoint``) checks a running OpenAI-compatible server instead; see endpoint.py.

Everything that loads the GGUF runs in a child process (``python -c``), so a native abort of llama.cpp (SIGABRT on
a broken vocabulary) becomes a failed check naming the signal, never a dead CLI.
"""

from __future__ import annotations

from .checks import ALL_CHECKS, SAMPLE_CHATS, verify_gguf
from .endpoint import verify_endpoint
from .report import FAIL, PASS, SKIP, WARN, CheckResult, VerifyReport
from .thresholds import QualityThreshold, default_threshold

__all__ = ["ALL_CHECKS", "FAIL", "PASS", "SAMPLE_CHATS", "SKIP", "WARN", "CheckResult", "QualityThreshold",
           "VerifyReport", "default_threshold", "verify_endpoint", "verify_gguf"]
