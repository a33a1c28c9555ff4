"""Quality of every quant type against the 16-bit GGUF, in Chinese and English, for the demo and tiny models.

For each model: convert to a 16-bit GGUF, quantize to each type (in-process, libllama), and measure with
l3zh-local's own quality check (verify_gguf, checks=quality; the reference is the 16-bit GGUF in the same runtime,
as in llama.cpp's scoreboard) the mean KL divergence, same-top share and perplexity ratio on the packaged held-out
text. A first row compares the 16-bit GGUF with the HF model itself (fp32 on CPU). Writes a Markdown table, a CSV
and, when matplotlib is installed, a PNG.

    python benchmarks/quant_quality.py [--models demo,tiny] [--types q8_0,...] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "tests")]

from l3zh_local import hfmodel  # noqa: E402
from l3zh_local.convert import convert_to_gguf  # noqa: E402
from l3zh_local.quantize import get_quant_type, quantize  # noqa: E402
from l3zh_local.verify import default_threshold, verify_gguf  # noqa: E402
from l3zh_local.verify.thresholds import PUBLISHED_LLAMA3_8B  # noqa: E402

DEFAULT_TYPES = "q8_0,q6_k,q5_k_m,q5_k_s,q4_k_m,q4_k_s,q4_0,iq4_nl,q3_k_l,q3_k_m,q2_k"
IMATRIX_TYPES = ("q4_k_m", "q2_k")
FIELDS = ["model", "type", "imatrix", "size_mib", "zh_kld", "zh_same_top", "zh_ppl_ratio", "en_kld", "en_same_top",
          "en_ppl_ratio", "verdict", "llama3_8b_kld", "seconds"]


def model_dirs(names: list[str]) -> dict[str, Path]:
    dirs = {}
    for name in names:
        if name == "demo":
            from l3zh_local.demo import demo_model_dir

            dirs["demo (SmolLM2-135M)"] = demo_model_dir()
        elif name == "tiny":
            from support.fixtures import tiny_llama3

            dirs["tiny Llama-3 (random)"] = tiny_llama3()
        else:
            dirs[Path(name).name] = Path(name)
    return dirs


def measure(gguf: Path, ref: Path, qtype: str, max_eval_tokens: int) -> dict:
    start = time.perf_counter()
    report = verify_gguf(gguf, ref=ref, quant_type=qtype, checks=("quality",), max_eval_tokens=max_eval_tokens)
    check = report.check("quality")
    if "languages" not in check.figures:
        raise RuntimeError(f"{gguf.name}: {check.message}")
    row = {"size_mib": round(gguf.stat().st_size / 2**20, 1), "verdict": check.status,
           "seconds": round(time.perf_counter() - start, 1)}
    for lang, f in check.figures["languages"].items():
        row.update({f"{lang}_kld": round(f["kld_mean"], 6), f"{lang}_same_top": round(f["same_top"], 4),
                    f"{lang}_ppl_ratio": round(f["ppl_ratio"], 4)})
    return row


def run(models: dict[str, Path], types: list[str], max_eval_tokens: int, work: Path, log) -> list[dict]:
    rows = []
    for label, model_dir in models.items():
        info = hfmodel.inspect_model(model_dir)
        base = work / f"{model_dir.name}.{info.outtype_16bit}.gguf"
        convert_to_gguf(info, base, force=True)
        row = {"model": label, "type": f"{info.outtype_16bit} (vs HF fp32)", "imatrix": "",
               "llama3_8b_kld": ""} | measure(base, model_dir, info.outtype_16bit, max_eval_tokens)
        rows.append(row)
        log(row)
        imatrix = None
        for name in types:
            for use_imatrix in (False, True):
                if use_imatrix and (name not in IMATRIX_TYPES or not label.startswith("demo")):
                    continue
                if use_imatrix and imatrix is None:
                    from l3zh_local.imatrix import compute_imatrix, default_calibration_text

                    imatrix = compute_imatrix(model_dir, default_calibration_text())
                out = work / f"{model_dir.name}.{name}{'.imatrix' if use_imatrix else ''}.gguf"
                quantize(base, out, get_quant_type(name), imatrix=imatrix if use_imatrix else None, force=True)
                published = PUBLISHED_LLAMA3_8B.get(name, (None,))[0]
                row = {"model": label, "type": name, "imatrix": "yes" if use_imatrix else "",
                       "llama3_8b_kld": published if published is not None else ""}
                row |= measure(out, base, name, max_eval_tokens)
                rows.append(row)
                log(row)
                out.unlink()
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| model | type | imatrix | size MiB | zh KLD | zh same top | zh PPL ratio | en KLD | en same top | "
            "en PPL ratio | verdict (default threshold) | Llama-3-8B KLD (llama.cpp) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['type']} | {r['imatrix']} | {r['size_mib']} | {r['zh_kld']:.5f} | "
            f"{r['zh_same_top']:.1%} | {r['zh_ppl_ratio']:.4f} | {r['en_kld']:.5f} | {r['en_same_top']:.1%} | "
            f"{r['en_ppl_ratio']:.4f} | {r['verdict']} | {r['llama3_8b_kld']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for model in dict.fromkeys(r["model"] for r in rows):
        for lang, marker in (("zh", "o"), ("en", "s")):
            pts = [r for r in rows if r["model"] == model and not r["imatrix"] and "vs HF" not in r["type"]]
            ax.plot([r["size_mib"] for r in pts], [r[f"{lang}_kld"] for r in pts], marker=marker,
                    label=f"{model} {lang}")
            for r in pts:
                ax.annotate(r["type"], (r["size_mib"], r[f"{lang}_kld"]), fontsize=7)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence vs 16-bit GGUF")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,tiny", help="demo, tiny, or HF folders, comma-separated")
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--max-eval-tokens", type=int, default=1024, help="held-out tokens per language")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    for name in types:
        default_threshold(name)  # fail early on a type without a threshold row
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="l3zh-quant-quality-") as tmp:
        rows = run(model_dirs(args.models.split(",")), types, args.max_eval_tokens, Path(tmp),
                   log=lambda r: print(f"{r['model']:<24} {r['type']:<18} {r['imatrix']:<4} {r['size_mib']:>8} MiB  "
                                       f"zh KLD {r['zh_kld']:.5f} top {r['zh_same_top']:.1%}  "
                                       f"en KLD {r['en_kld']:.5f} top {r['en_same_top']:.1%}  {r['verdict']}",
                                       flush=True))
    command = "python benchmarks/quant_quality.py " + " ".join(sys.argv[1:])
    table = markdown(rows)
    (args.out / "quant_quality.md").write_text(
        f"# Quant quality\n\nCommand: `{command}`\n\nReference: the 16-bit GGUF in the same runtime (first row per "
        f"model: the 16-bit GGUF against the HF model in fp32). Text: packaged held-out Chinese and English, up to "
        f"{args.max_eval_tokens} tokens each, context 512. The tiny model has random weights: its same-top share "
        f"is noise (near-tied logits) and is not judged.\n\n{table}", encoding="utf-8")
    with open(args.out / "quant_quality.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, args.out / "quant_quality.png")
    print(table)
    print(f"Wrote {args.out / 'quant_quality.md'}, quant_quality.csv" + (", quant_quality.png" if png else
                                                                             " (no matplotlib: no PNG)"))


if __name__ == "__main__":
    main()
