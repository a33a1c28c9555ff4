"""Peak memory and time of `l3zh-local merge` beside PEFT's load + merge_and_unload + save_pretrained.

Builds, offline and once (cached), a random bf16 Llama model large enough to have several shards, and a LoRA
adapter shaped like the seed's recipe (all seven projections; lm_head and the norms in modules_to_save). Each
contender runs in its own child process; its peak RSS is the child's ru_maxrss (os.wait4), its time the wall
clock of the child, imports included. A floor row shows what merely importing torch costs.

    python3 benchmarks/merge_memory.py                 # ~4 min on 2 cores
    python3 benchmarks/merge_memory.py --layers 4      # quicker, smaller model

Target: peak RSS of the merge <= 1.5 x (largest shard + adapter), and no slower than PEFT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from l3zh_local import settings  # noqa: E402
from l3zh_local.files import human_size  # noqa: E402
from support.lora_fixture import SEED_MODULES_TO_SAVE, SEED_TARGETS, random_lora_adapter  # noqa: E402

PEFT_CHILD = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
"""
FLOOR_CHILD = "import torch, safetensors"


def build_base(dest: Path, *, hidden: int, ffn: int, layers: int, vocab: int, shard: str) -> Path:
    """A random bf16 LlamaForCausalLM saved in shards of at most `shard` (cached by its shape)."""
    if (dest / "model.safetensors.index.json").is_file():
        return dest
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # skip the slow default init: fill directly
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard)
    os.replace(tmp, dest)
    return dest


def run_child(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"child failed ({proc.returncode}): {' '.join(argv[:4])}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def warm(folder: Path) -> None:
    """Read every file once so both contenders start with the same (warm) page cache."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(64 * 1024**2):
                    pass


def compare(ours: Path, theirs: Path) -> tuple[int, int, float]:
    """(tensors, elements differing, largest difference in units of the bf16 step at that value)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        data = json.loads((folder / "model.safetensors.index.json").read_text())
        return {name: folder / shard for name, shard in data["weight_map"].items()}

    mine, peft = index(ours), index(theirs)
    assert mine.keys() == peft.keys(), "different tensor names"
    differing, worst = 0, 0.0
    for name in mine:
        with safe_open(str(mine[name]), "pt") as a, safe_open(str(peft[name]), "pt") as b:
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
        diff = (x - y).abs()
        differing += int((diff > 0).sum())
        step = torch.finfo(torch.bfloat16).eps * torch.maximum(x.abs(), y.abs()).clamp_min(1e-30)
        worst = max(worst, float((diff / step).max()))
    return len(mine), differing, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard", default="400MB", help="max_shard_size of the base (and of PEFT's output)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    shape = f"h{args.hidden}-f{args.ffn}-l{args.layers}-v{args.vocab}-s{args.shard}"
    cache = settings.cache_dir() / "bench" / f"merge-{shape}"
    base, adapter = cache / "base", cache / f"adapter-r{args.rank}"
    if args.build_only:
        build_base(base, hidden=args.hidden, ffn=args.ffn, layers=args.layers, vocab=args.vocab, shard=args.shard)
        if not (adapter / "adapter_model.safetensors").is_file():
            shutil.rmtree(adapter, ignore_errors=True)
            random_lora_adapter(base, adapter, r=args.rank, lora_alpha=2 * args.rank, target_modules=SEED_TARGETS,
                                modules_to_save=SEED_MODULES_TO_SAVE, b_std=0.002)
        return
    # Build in a child too: a child's ru_maxrss starts from its parent's RSS at fork, so this process stays small.
    t0 = time.monotonic()
    run_child([sys.executable, __file__, "--build-only", *sys.argv[1:]])
    built = time.monotonic() - t0

    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    budget = 1.5 * (largest + adapter_bytes)

    work = Path(tempfile.mkdtemp(prefix="l3zh-bench-", dir=args.work))
    try:
        warm(base)
        warm(adapter)
        floor = run_child([sys.executable, "-c", FLOOR_CHILD])
        ours = run_child([sys.executable, "-m", "l3zh_local.cli", "merge", str(base), str(adapter),
                          "--out", str(work / "ours"), "--force"])
        warm(base)
        theirs = run_child([sys.executable, "-c", PEFT_CHILD, str(base), str(adapter), str(work / "peft"), args.shard])
        n_tensors, differing, worst = compare(work / "ours", work / "peft")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import peft
    import torch
    import transformers

    model_bytes = sum(p.stat().st_size for p in shards)
    print("# LoRA merge: peak memory and time\n")
    print(f"Command: `{' '.join(['python3 benchmarks/merge_memory.py', *sys.argv[1:]])}`  ")
    print(f"Machine: {os.cpu_count()} logical cores; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, "
          f"peft {peft.__version__}; page cache warm for both; cores shared with other jobs, so times are "
          f"indicative. Building the model and adapter took {built:.0f} s (cached after the first run).\n")
    print(f"Base: random bf16 Llama, hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, vocab {args.vocab}: "
          f"{human_size(model_bytes)} in {len(shards)} shards, largest {human_size(largest)}.  ")
    print(f"Adapter: r={args.rank}, alpha={2 * args.rank}, q/k/v/o/gate/up/down, modules_to_save "
          f"{', '.join(SEED_MODULES_TO_SAVE)}: {human_size(adapter_bytes)}.  ")
    print(f"Target: peak <= 1.5 x (largest shard + adapter) = {human_size(budget)}; time <= PEFT's.\n")
    print("| run | peak RSS | time | peak / (largest shard + adapter) |")
    print("|---|---:|---:|---:|")
    for label, (seconds, rss) in [("`l3zh-local merge`", ours),
                                  ("PEFT load + merge_and_unload + save_pretrained", theirs),
                                  ("floor: python + import torch, safetensors", floor)]:
        print(f"| {label} | {human_size(rss)} | {seconds:.1f} s | {rss / (largest + adapter_bytes):.2f} |")
    print()
    memory_met = "met" if ours[1] <= budget else "MISSED"
    time_met = "met" if ours[0] <= theirs[0] else "MISSED"
    print(f"Memory: l3zh-local {ours[1] / theirs[1]:.2f} x PEFT's peak; target {memory_met}. "
          f"Time: l3zh-local {ours[0] / theirs[0]:.2f} x PEFT's; target {time_met}.  ")
    print(f"Outputs compared tensor by tensor: {n_tensors} tensors, {differing} elements differ between the two "
          f"merges (largest difference {worst:.2f} bf16 steps).")


if __name__ == "__main__":
    main()
