"""l3zh-local: Llama-3 Chinese chat models from Hugging Face weights to a laptop.

The command line (``l3zh-local``) is built on this API; everything it does can be done from Python::

    import l3zh_local

    result = l3zh_local.export(quants=["q4_k_m"], out="dist")   # the embedded demo model, offline
    gguf = result.quant_ggufs["q4_k_m"]
    print(l3zh_local.chat(gguf, "What is the capital of France?"))
    report = l3zh_local.verify_gguf(gguf, ref=result.base_gguf)
    print(report.table())

Serving: ``l3zh_local.serve.serve(gguf)`` (OpenAI-compatible server and chat page), ``verify_endpoint(url, gguf)``
(check any running server), ``l3zh_local.serve.write_bundles`` (llama-server, vLLM, LM Studio files).

Errors the user can fix are `L3zhError` subclasses with a one-line message; each also subclasses the matching
builtin (`InputError` is a `ValueError`, `OutputExists` a `FileExistsError`, ...).
"""

from ._version import __version__
from .chat import ChatSession, chat
from .errors import (
    Busy,
    DiskSpaceError,
    InputError,
    L3zhError,
    OfflineError,
    OutputExists,
    ToolchainError,
    UnsupportedArchitecture,
)
from .export import ExportResult, export
from .merge import MergeReport, merge_lora
from .prompt import ChatPrompt
from .quantize import QuantType, quant_types
from .templates import ChatFamily, Sampling, get_family, list_families
from .verify import VerifyReport, verify_endpoint, verify_gguf

__all__ = [
    "Busy", "ChatFamily", "ChatPrompt", "ChatSession", "DiskSpaceError", "ExportResult", "InputError", "L3zhError",
    "MergeReport", "OfflineError", "OutputExists", "QuantType", "Sampling", "ToolchainError",
    "UnsupportedArchitecture", "VerifyReport", "chat", "export", "get_family", "list_families", "merge_lora",
    "__version__", "quant_types", "verify_endpoint", "verify_gguf",
]
