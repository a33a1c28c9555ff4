"""Time and peak memory of `l3zh-local export` against llama.cpp's converter and quantizer run directly.

Both sides do the same work on the same model: HF folder -> 16-bit GGUF (the same pinned convert_hf_to_gguf.py)
-> one quant through libllama's llama_model_quantize. The export runs with --no-imatrix --no-verify, since the
baseline has no importance matrix and no checks; the imatrix's own cost is printed on a separate line. Each run is
a fresh process tree; peak memory is the largest RSS of any process in it. Runs alternate; medians are shown.

    python benchmarks/export_overhead.py                 # the demo model, q4_k_m
    python benchmarks/export_overhead.py --model PATH --q q5_k_m --repeat 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs `argv` as a child, then prints its wall time and the peak RSS of the whole tree below this wrapper.
_MEASURE = r"""
import json, resource, subprocess, sys, time
start = time.monotonic()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.monotonic() - start
if proc.returncode:
    sys.exit(proc.stderr[-2000:])
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024}))
"""

_BASELINE = r"""
import ctypes, subprocess, sys
import llama_cpp
from llama_cpp import _logger
_logger.set_verbose(False)
converter, model, outtype, f16, quant, ftype = sys.argv[1:]
subprocess.run([sys.executable, converter, model, "--outfile", f16, "--outtype", outtype], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, ftype)
assert llama_cpp.llama_model_quantize(f16.encode(), quant.encode(), ctypes.byref(params)) == 0
"""


def measure(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"run failed: {' '.join(argv[:4])} ...\n{out.stderr}")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF folder (default: the embedded demo model)")
    parser.add_argument("--q", default="q4_k_m")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from l3zh_local import demo, hfmodel, toolchain
    from l3zh_local.quantize import get_quant_type

    model = Path(args.model) if args.model else demo.demo_model_dir()
    info = hfmodel.inspect_model(model)
    tools = toolchain.llama_cpp()
    qtype = get_quant_type(args.q)
    runs: dict[str, list[dict]] = {"llama.cpp direct": [], "l3zh-local export": [], "imatrix (extra)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            base_dir = Path(tmp) / f"base{i}"
            base_dir.mkdir()
            runs["llama.cpp direct"].append(measure([
                sys.executable, "-c", _BASELINE, str(tools.converter), str(model), info.outtype_16bit,
                str(base_dir / "m.gguf"), str(base_dir / "q.gguf"), qtype.ftype]))
            runs["l3zh-local export"].append(measure([
                sys.executable, "-m", "l3zh_local.cli", "export", str(model), "--q", qtype.name, "--no-imatrix",
                "--no-verify", "--out", str(Path(tmp) / f"export{i}")]))
        probe = Path(tmp) / "imatrix"
        runs["imatrix (extra)"].append(measure([
            sys.executable, "-c",
            "import sys; from l3zh_local import imatrix; "
            "imatrix.compute_imatrix(sys.argv[1], imatrix.default_calibration_text(), progress=False)",
            str(model)]))
        del probe

    base = runs["llama.cpp direct"]
    base_s = statistics.median(r["seconds"] for r in base)
    base_m = statistics.median(r["peak_mib"] for r in base)
    print(f"model: {model.name} ({info.n_params / 1e6:.0f}M parameters, {info.weight_dtype}), quant {qtype.name}, "
          f"{args.repeat} runs each, median; {platform.processor() or platform.machine()}, "
          f"llama-cpp-python {tools.runtime_version}")
    print(f"| {'what':<20} | {'time s':>7} | {'peak RSS MiB':>12} | {'time ratio':>10} | {'memory ratio':>12} |")
    print(f"|{'-' * 22}|{'-' * 9}|{'-' * 14}|{'-' * 12}|{'-' * 14}|")
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        peak = statistics.median(r["peak_mib"] for r in results)
        ratios = ("", "") if name.startswith("imatrix") else (f"{seconds / base_s:.2f}", f"{peak / base_m:.2f}")
        print(f"| {name:<20} | {seconds:7.1f} | {peak:12.0f} | {ratios[0]:>10} | {ratios[1]:>12} |")
    print("target: time ratio and memory ratio <= 1.10 (export with --no-imatrix against the same steps run directly)")


if __name__ == "__main__":
    main()
