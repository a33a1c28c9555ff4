"""Speed of `l3zh-local chat` against plain llama-cpp-python on the same GGUF and threads.

Prints, side by side:
- prompt processing tokens/s (a ~400-token Chinese prompt, evaluated from an empty cache) and generation
  tokens/s, for the chat code (ChatSession) and for plain llama-cpp-python (Llama.eval / Llama.generate);
  target ratio >= 0.95;
- time to first token at turn 1 and turn 10 of a conversation (target: turn 10 within 1.2x of turn 1), and at turn
  10 with the cache dropped, which is what a chat without KV reuse would pay;
- generation speed as a share of this machine's memory bandwidth: bytes of weights read per token x tokens/s /
  bandwidth (measured here by summing a 1 GiB array in as many threads as the model uses).

    python benchmarks/chat_speed.py [--gguf FILE] [--threads N] [--out benchmarks/results]

Without --gguf it uses the demo model (SmolLM2-135M-Instruct) quantized to q4_k_m.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l3zh_local import evaltext, settings  # noqa: E402
from l3zh_local.chat import ChatSession, load_model  # noqa: E402
from l3zh_local.hardware import physical_cores  # noqa: E402
from l3zh_local.templates import Sampling  # noqa: E402

GEN_TOKENS = 128
REPEATS = 5
QUESTIONS = ["你好！", "What is the capital of France?", "请介绍一下长城。", "Tell me about tea.", "谢谢，还有吗？",
             "What is 12 times 12?", "请用一句话总结。", "Name three rivers.", "北京有什么好吃的？", "Thank you!"]


def demo_gguf() -> Path:
    from l3zh_local import hfmodel
    from l3zh_local.convert import convert_to_gguf
    from l3zh_local.demo import demo_model_dir
    from l3zh_local.quantize import get_quant_type, quantize

    work = settings.cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    base, q4 = work / "demo.f16.gguf", work / "demo.q4_k_m.gguf"
    if not q4.is_file():
        if not base.is_file():
            convert_to_gguf(hfmodel.inspect_model(demo_model_dir()), base, outtype="f16")
        quantize(base, q4, get_quant_type("q4_k_m"))
    return q4


def memory_bandwidth(threads: int, size: int = 2**30) -> float:
    """Read bandwidth in bytes/s: best of 5 sums of a `size`-byte array split over `threads` threads."""
    import numpy as np

    data = np.ones(size // 8, dtype=np.float64)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return size / best


def weight_bytes_per_token(gguf: Path) -> int:
    """Bytes of tensors a decode step reads: all but the token embedding (one row), unless it is also the output."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


def plain_speeds(llm, prompt_ids: list[int], story_ids: list[int]) -> tuple[float, float]:
    """Prompt tokens/s and generation tokens/s of plain llama-cpp-python (same prompts as the chat's)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_ids)
    pp = len(prompt_ids) / (time.perf_counter() - start)
    llm.reset()
    first, n = None, 0
    for _token in llm.generate(story_ids, temp=0.6, top_p=0.9, top_k=40, min_p=0.0, repeat_penalty=1.1):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == GEN_TOKENS:
            break
    return pp, (n - 1) / (time.perf_counter() - first)


def chat_speeds(llm, question: str, story: str) -> tuple[float, float, int]:
    """Prompt tokens/s (turn 1 from an empty cache) and generation tokens/s of the chat code."""
    llm.reset()
    session = ChatSession(llm, sampling=Sampling(max_tokens=1))
    session.reply(question)
    pp = session.last.prompt_tokens / session.last.time_to_first_token_s
    llm.reset()
    session = ChatSession(llm, sampling=Sampling(max_tokens=GEN_TOKENS))
    session.reply(story)
    last = session.last
    return pp, (last.generated_tokens - 1) / last.generation_s, last.generated_tokens


def turn_latency(llm) -> list[dict]:
    llm.reset()
    session = ChatSession(llm, sampling=Sampling(max_tokens=32), system="You are a helpful assistant.")
    turns = []
    for i, question in enumerate(QUESTIONS, 1):
        session.reply(question)
        turns.append({"turn": str(i), "prompt": session.last.prompt_tokens,
                      "evaluated": session.last.evaluated_tokens, "ttft_s": session.last.time_to_first_token_s})
    # The last turn once more with the cache dropped: what every turn would cost without KV reuse.
    del session.messages[-2:]
    llm.reset()
    session.reply(QUESTIONS[-1])
    turns.append({"turn": f"{len(QUESTIONS)} (cache dropped)", "prompt": session.last.prompt_tokens,
                  "evaluated": session.last.evaluated_tokens, "ttft_s": session.last.time_to_first_token_s})
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    gguf = args.gguf or demo_gguf()
    threads = args.threads or physical_cores()
    llm = load_model(gguf, n_ctx=2048, threads=threads, seed=1)
    question = "请把下面这段话概括成一句话：\n" + evaltext.heldout_text("zh")[:550]
    story = "Write a long story about a dragon who learns to cook. Make it at least three paragraphs."
    probe = ChatSession(llm)
    prompt_ids = probe.tokens(probe.conversation(question))

    story_ids = probe.tokens(probe.conversation(story))
    # Interleaved repeats, medians: the load of a shared machine drifts.
    runs = [(chat_speeds(llm, question, story), plain_speeds(llm, prompt_ids, story_ids)) for _ in range(REPEATS)]
    chat_pp = statistics.median(r[0][0] for r in runs)
    chat_tg = statistics.median(r[0][1] for r in runs)
    chat_n = min(r[0][2] for r in runs)
    plain_pp = statistics.median(r[1][0] for r in runs)
    plain_tg = statistics.median(r[1][1] for r in runs)
    turns = turn_latency(llm)
    bandwidth = memory_bandwidth(threads)
    per_token = weight_bytes_per_token(gguf)
    share = per_token * chat_tg / bandwidth

    t1 = next(t for t in turns if t["turn"] == "1")["ttft_s"]
    t10 = next(t for t in turns if t["turn"] == str(len(QUESTIONS)))["ttft_s"]
    lines = [
        f"GGUF: {gguf.name} ({gguf.stat().st_size / 2**20:.1f} MiB), threads {threads}",
        "",
        "| measure | chat (l3zh-local) | plain llama-cpp-python | ratio |",
        "|---|---|---|---|",
        f"| prompt processing, tokens/s ({len(prompt_ids)}-token prompt) | {chat_pp:.1f} | {plain_pp:.1f} | "
        f"{chat_pp / plain_pp:.3f} |",
        f"| generation, tokens/s ({GEN_TOKENS} tokens; chat made at least {chat_n}) | {chat_tg:.1f} | "
        f"{plain_tg:.1f} | "
        f"{chat_tg / plain_tg:.3f} |",
        "",
        "| turn | prompt tokens | evaluated | time to first token (s) |",
        "|---|---|---|---|",
        *[f"| {t['turn']} | {t['prompt']} | {t['evaluated']} | {t['ttft_s']:.3f} |" for t in turns],
        "",
        f"Time to first token, turn {len(QUESTIONS)} / turn 1: {t10 / t1:.2f}x (target <= 1.2x)",
        f"Memory read bandwidth (numpy sum, {threads} threads): {bandwidth / 1e9:.1f} GB/s; weights read per token: "
        f"{per_token / 2**20:.1f} MiB; generation at {chat_tg:.1f} tokens/s = {share:.0%} of the bandwidth",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/chat_speed.py " + " ".join(sys.argv[1:])
    (args.out / "chat_speed.md").write_text(f"# Chat speed\n\nCommand: `{command}`\n\n{text}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
