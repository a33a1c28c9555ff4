"""GGUF quantization through libllama (the C API bound by llama-cpp-python), in a child process that Ctrl-C can stop.

The ladder and its approximate bits per weight follow llama.cpp's quantize tool. Types that llama.cpp only makes
well with an importance matrix are refused unless one is given (see imatrix.py: computed from calibration text).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, ToolchainError
from .files import atomic_output, ensure_free_space
from .interrupts import wait_or_kill

if TYPE_CHECKING:
    from .imatrix import ImportanceMatrix


@dataclass(frozen=True)
class QuantType:
    name: str  # lower-case, as users type it: q4_k_m
    ftype: str  # the llama_ftype constant's name in llama_cpp
    bits_per_weight: float  # approximate, for size estimates (llama.cpp's figures for 7-8B models)
    note: str
    needs_imatrix: bool = False

    @property
    def ftype_value(self) -> int:
        import llama_cpp

        return int(getattr(llama_cpp, self.ftype))


_LADDER = (
    QuantType("f32", "LLAMA_FTYPE_ALL_F32", 32.0, "full precision, reference only"),
    QuantType("f16", "LLAMA_FTYPE_MOSTLY_F16", 16.0, "16-bit, lossless for f16 models"),
    QuantType("bf16", "LLAMA_FTYPE_MOSTLY_BF16", 16.0, "16-bit, lossless for bf16 models"),
    QuantType("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", 8.50, "near-lossless"),
    QuantType("q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K", 6.56, "very close to 16-bit"),
    QuantType("q5_k_m", "LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.70, "high quality"),
    QuantType("q5_k_s", "LLAMA_FTYPE_MOSTLY_Q5_K_S", 5.52, "high quality, a little smaller"),
    QuantType("q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0", 5.54, "legacy; prefer q5_k_m"),
    QuantType("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.89, "recommended for laptops: best size/quality balance"),
    QuantType("q4_k_s", "LLAMA_FTYPE_MOSTLY_Q4_K_S", 4.58, "a little smaller than q4_k_m"),
    QuantType("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", 4.55, "legacy; fast on some ARM CPUs"),
    QuantType("iq4_xs", "LLAMA_FTYPE_MOSTLY_IQ4_XS", 4.25, "small 4-bit; best with an imatrix"),
    QuantType("iq4_nl", "LLAMA_FTYPE_MOSTLY_IQ4_NL", 4.50, "non-linear 4-bit"),
    QuantType("q3_k_l", "LLAMA_FTYPE_MOSTLY_Q3_K_L", 4.27, "3-bit, large; noticeable loss"),
    QuantType("q3_k_m", "LLAMA_FTYPE_MOSTLY_Q3_K_M", 3.91, "3-bit; noticeable loss"),
    QuantType("q3_k_s", "LLAMA_FTYPE_MOSTLY_Q3_K_S", 3.50, "3-bit, small; large loss"),
    QuantType("q2_k", "LLAMA_FTYPE_MOSTLY_Q2_K", 3.35, "2-bit; large loss, last resort"),
    QuantType("q2_k_s", "LLAMA_FTYPE_MOSTLY_Q2_K_S", 2.97, "2-bit", needs_imatrix=True),
    QuantType("iq3_xxs", "LLAMA_FTYPE_MOSTLY_IQ3_XXS", 3.21, "3-bit i-quant", needs_imatrix=True),
    QuantType("iq2_m", "LLAMA_FTYPE_MOSTLY_IQ2_M", 2.93, "2-bit i-quant", needs_imatrix=True),
    QuantType("iq2_s", "LLAMA_FTYPE_MOSTLY_IQ2_S", 2.74, "2-bit i-quant", needs_imatrix=True),
    QuantType("iq2_xs", "LLAMA_FTYPE_MOSTLY_IQ2_XS", 2.59, "2-bit i-quant", needs_imatrix=True),
    QuantType("iq2_xxs", "LLAMA_FTYPE_MOSTLY_IQ2_XXS", 2.38, "2-bit i-quant", needs_imatrix=True),
    QuantType("iq1_m", "LLAMA_FTYPE_MOSTLY_IQ1_M", 1.94, "1-bit i-quant", needs_imatrix=True),
    QuantType("iq1_s", "LLAMA_FTYPE_MOSTLY_IQ1_S", 1.78, "1-bit i-quant", needs_imatrix=True),
)
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in _LADDER}
SIXTEEN_BIT = ("f16", "bf16")


def quant_types() -> list[QuantType]:
    """Every quant type, from the least loss to the most (`needs_imatrix` marks the importance-matrix-only ones)."""
    return list(_LADDER)


def get_quant_type(name: str, *, have_imatrix: bool = False) -> QuantType:
    key = name.strip().lower()
    qtype = QUANT_TYPES.get(key)
    if qtype is None:
        usable = ", ".join(q.name for q in _LADDER if not q.needs_imatrix)
        raise InputError(f"unknown quant type {name!r}: choose from {usable}")
    if qtype.needs_imatrix and not have_imatrix:
        raise InputError(
            f"{qtype.name} needs an importance matrix: drop --no-imatrix (export computes one by default) or give "
            "--imatrix FILE, or choose q3_k_m, q2_k or iq4_xs"
        )
    return qtype


def parse_quant_list(spec: str, *, have_imatrix: bool = False) -> list[QuantType]:
    """'q4_k_m,q5_k_m, q8_0' -> validated QuantTypes in the order given, without repeats."""
    names = [part for part in (p.strip() for p in spec.split(",")) if part]
    if not names:
        raise InputError("--q is empty: give one or more quant types, e.g. --q q4_k_m,q8_0")
    seen: dict[str, QuantType] = {}
    for name in names:
        qtype = get_quant_type(name, have_imatrix=have_imatrix)
        seen.setdefault(qtype.name, qtype)
    return list(seen.values())


def quantize(src: Path, dst: Path, qtype: QuantType, *, n_params: int | None = None, threads: int = 0,
             imatrix: ImportanceMatrix | None = None, force: bool = False) -> str | None:
    """Quantize the GGUF `src` into `dst` (written atomically) with libllama.

    With `imatrix`, the GGUF also records it in the quantize.imatrix.* keys llama-quantize writes.
    Returns libllama's note on tensors that fell back to another type, if any.

    libllama runs in a child process: llama_model_quantize cannot be interrupted, and a model of some GB takes
    minutes, so Ctrl-C or SIGTERM would otherwise wait for it to finish. The child is killed instead.
    """
    from .toolchain import watch_file_growth

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(f"{src} does not exist; give a GGUF file to quantize")
    expected = int(n_params * qtype.bits_per_weight / 8) if n_params else src.stat().st_size
    ensure_free_space(dst.parent, expected, f"the {qtype.name} GGUF")
    if qtype.needs_imatrix and not imatrix:
        raise InputError(f"{qtype.name} needs an importance matrix; pass one")
    log_path = dst.with_name(dst.name + ".log")
    with atomic_output(dst, force=force) as tmp, tempfile.TemporaryDirectory(prefix="l3zh-quantize-") as work:
        request: dict[str, Any] = {"src": str(src), "dst": str(tmp), "ftype": qtype.ftype, "threads": threads,
                                   "imatrix": None, "answer": str(Path(work) / "rc")}
        if imatrix:
            from .imatrix import save_imatrix

            request["imatrix"] = str(Path(work) / "imatrix.gguf")
            request["imatrix_name"] = imatrix.file_name  # what the GGUF records, not this temporary copy
            save_imatrix(Path(request["imatrix"]), imatrix)
        stop = watch_file_growth(tmp, expected, f"quantize to {qtype.name}")
        try:
            exit_code = _run_child(request, log_path)
        finally:
            stop.set()
        answer = Path(request["answer"])
        rc = int(answer.read_text()) if answer.is_file() else None
        if exit_code != 0 or rc != 0:
            why = (f"code {rc}" if rc is not None else
                   f"killed by {signal.Signals(-exit_code).name}" if exit_code < 0 else f"exit {exit_code}")
            raise ToolchainError(f"libllama could not quantize {src.name} to {qtype.name} ({why}); "
                                 f"is it a valid GGUF? libllama's log: {log_path}")
    note = fallback_note(log_path.read_text(errors="replace"))
    log_path.unlink(missing_ok=True)
    return note


def _run_child(request: dict, log_path: Path) -> int:
    package_parent = str(Path(__file__).resolve().parent.parent)  # the child imports this very l3zh_local
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    code = "import sys; from l3zh_local.quantize import _child_main; _child_main(sys.argv[1])"
    with open(log_path, "w", encoding="utf-8") as log:  # libllama prints to fd 2: its log is the child's stderr
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(request)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        return wait_or_kill(proc)


def _child_main(request_json: str) -> None:
    """The child process: one llama_model_quantize call; its return code goes to the answer file."""
    import llama_cpp

    from .toolchain import quiet_libllama

    request = json.loads(request_json)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(llama_cpp, request["ftype"]))
    params.nthread = request["threads"]
    imatrix_param = None
    if request["imatrix"]:
        from .imatrix import ImatrixParam, load_imatrix

        matrix = load_imatrix(Path(request["imatrix"]))
        matrix.file_name = request["imatrix_name"]
        imatrix_param = ImatrixParam(matrix)  # must outlive the call below
        params.imatrix = imatrix_param.pointer
        params.kv_overrides = imatrix_param.kv_overrides  # the quantize.imatrix.* keys llama-quantize writes
    quiet_libllama()
    rc = llama_cpp.llama_model_quantize(request["src"].encode(), request["dst"].encode(), ctypes.byref(params))
    Path(request["answer"]).write_text(str(rc))


def fallback_note(log: str) -> str | None:
    """libllama's summary of tensors that could not take the requested type (rows not a multiple of 256)."""
    for line in log.splitlines():
        if "required fallback quantization" in line:
            return line.split("WARNING:", 1)[-1].strip()
    return None
