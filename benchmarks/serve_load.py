"""Load on `l3zh-local serve` next to llama-cpp-python's own server, same GGUF, same threads, in one run.

N concurrent clients (1, 4, 8) each send R streaming chat requests (loopback only; every request generates exactly
--max-tokens tokens: the end-of-turn and other control tokens are banned with logit_bias on both servers, so both
do the same work). For each server and client count: generated tokens per second over the phase, p50 and p95 time
to first token (request sent -> first text received), failed requests. Phases alternate A B B A between the two
servers so that a change of load on a shared machine does not favour either (--rounds times); tokens/s is the median
over a server's phases. CPU time per generated token (the server process, all threads) is also reported: on a busy
machine it varies far less than wall-clock speed.

    python benchmarks/serve_load.py [--gguf FILE] [--threads 1] [--clients 1,4,8] [--requests 2] [--max-tokens 64]
                                    [--rounds 2]

Without --gguf it uses the demo model (SmolLM2-135M-Instruct) quantized to q4_k_m. Needs llama-cpp-python's
server extra for the baseline (pip install "llama-cpp-python[server]" fastapi sse-starlette starlette-context
pydantic-settings). Target: throughput >= 0.95x llama-cpp-python's server at every client count, no failed request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PHASE_LIMIT_S = 600  # a phase that takes longer is stopped and its unfinished requests count as failed
QUESTIONS = ["请介绍一下长城。", "What is the capital of France?", "北京有什么好吃的？", "Tell me about tea.",
             "请用三句话介绍上海。", "Name three rivers.", "谢谢，还有吗？", "What is 12 times 12?"]


@dataclass
class Phase:
    server: str
    clients: int
    wall_s: float = 0.0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # CPU time the server process used during the phase (all its threads)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"server on port {port} not ready after {timeout_s} s")


def one_request(port: int, body: dict, phase: Phase, lock: threading.Lock, deadline: float) -> None:
    started = time.perf_counter()
    first = None
    pieces = 0
    finish = None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(1.0, deadline - time.monotonic()))
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        while True:
            line = response.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    pieces += 1
                    if first is None:
                        first = time.perf_counter()
                finish = choice.get("finish_reason") or finish
        conn.close()
        if finish != "length":
            raise RuntimeError(f"finish_reason {finish} (expected length after {body['max_tokens']} tokens)")
        with lock:
            phase.tokens += body["max_tokens"]
            phase.ttft.append((first or time.perf_counter()) - started)
    except Exception as err:  # noqa: BLE001 - counted as a failed request
        with lock:
            phase.failed.append(f"{type(err).__name__}: {err}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): a measure of work that a busy machine's other
    jobs do not inflate the way they inflate wall-clock time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phase(name: str, port: int, clients: int, requests: int, max_tokens: int, bias: dict,
              pid: int | None = None) -> Phase:
    phase = Phase(name, clients)
    cpu_before = cpu_seconds(pid) if pid else 0.0
    lock = threading.Lock()
    deadline = time.monotonic() + PHASE_LIMIT_S

    def client(i: int) -> None:
        for r in range(requests):
            if time.monotonic() > deadline:
                with lock:
                    phase.failed.append("phase time limit")
                continue
            question = QUESTIONS[(i + r) % len(QUESTIONS)]
            body = {"model": "m", "messages": [{"role": "user", "content": question}], "stream": True,
                    "max_tokens": max_tokens, "temperature": 0.6, "top_p": 0.9, "logit_bias": bias, "seed": i * 100 + r}
            one_request(port, body, phase, lock, deadline)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=PHASE_LIMIT_S + 30)
    phase.wall_s = time.perf_counter() - started
    phase.cpu_s = cpu_seconds(pid) - cpu_before if pid else 0.0
    return phase


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per phase")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="A B B A rounds per client count")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if max(levels) > 16 or args.requests > 8 or args.rounds > 4:
        parser.error("at most 16 clients, 8 requests each and 4 rounds: this benchmark stays small")

    from llama_cpp import Llama

    from l3zh_local.prompt import llama_control_tokens

    if args.gguf is None:
        from support.serve_models import demo_gguf

        args.gguf = demo_gguf("q4_k_m")
    vocab = Llama(str(args.gguf), vocab_only=True, verbose=False)
    # Ban every control token (end of turn included) on both servers: every request generates max_tokens tokens.
    bias = {str(t): -100.0 for t in llama_control_tokens(vocab).values()}
    del vocab

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ours_port, theirs_port = free_port(), free_port()
    t = str(args.threads)
    # The servers' logs go to files (llama-cpp-python's server logs every load line; a full pipe would stall it).
    logs = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    servers = {
        "l3zh-local serve": (ours_port, subprocess.Popen(
            [sys.executable, "-m", "l3zh_local", "serve", str(args.gguf), "--port", str(ours_port), "--ctx",
             str(args.ctx), "--threads", t, "--parallel", "1", "--quiet"],
            env=env, stdout=subprocess.DEVNULL, stderr=logs[0])),
        "llama-cpp-python server": (theirs_port, subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(args.gguf), "--port", str(theirs_port),
             "--host", "127.0.0.1", "--n_ctx", str(args.ctx), "--n_threads", t, "--n_threads_batch", t,
             "--interrupt_requests", "False"],  # by default a new request cuts the one running short
            env=env, stdout=subprocess.DEVNULL, stderr=logs[1])),
    }
    results: dict[tuple[str, int], list[Phase]] = {}
    try:
        for port, proc in servers.values():
            wait_ready(port, proc)
        names = list(servers)
        for name in names:  # warm-up: page in the weights, first allocations
            run_phase(name, servers[name][0], 1, 1, 8, bias)
        for clients in levels:
            for name in (names[0], names[1], names[1], names[0]) * args.rounds:  # A B B A
                port, proc = servers[name]
                phase = run_phase(name, port, clients, args.requests, args.max_tokens, bias, proc.pid)
                results.setdefault((name, clients), []).append(phase)
                print(f"{name:<24} {clients} clients: {phase.throughput:6.1f} tokens/s, "
                      f"p50 TTFT {percentile(phase.ttft, .5):.2f} s, failed {len(phase.failed)}", flush=True)
    finally:
        for _, proc in servers.values():
            proc.terminate()
        for _, proc in servers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    load = os.getloadavg()
    lines = ["# Serving under load", "",
             f"Command: `python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`".replace("  ", " ").rstrip(), "",
             f"GGUF: {args.gguf.name} ({args.gguf.stat().st_size / 2**20:.1f} MiB), {args.threads} thread(s) per "
             f"server, context {args.ctx}, one slot each (l3zh-local serve --parallel 1; llama-cpp-python's server "
             f"has one model behind a lock). Each client sends {args.requests} streaming chat requests of "
             f"{args.max_tokens} generated tokens; phases ran A B B A ({args.rounds} round(s)); tokens/s is the "
             "median over a server's phases, TTFT percentiles over all its requests, CPU time per token over all "
             "its phases (the server process, all threads).", "",
             "| clients | server | tokens/s | ratio | p50 TTFT (s) | p95 TTFT (s) | CPU ms/token | requests | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for clients in levels:
        base = statistics.median(p.throughput for p in results[(names[1], clients)])
        for name in names:
            phases = results[(name, clients)]
            tput = statistics.median(p.throughput for p in phases)
            ttft = [x for p in phases for x in p.ttft]
            failed = sum(len(p.failed) for p in phases)
            total = len(phases) * clients * args.requests
            ratio = tput / base if base else float("nan")
            cpu_ms = 1000 * sum(p.cpu_s for p in phases) / max(1, sum(p.tokens for p in phases))
            lines.append(f"| {clients} | {name} | {tput:.1f} | {ratio:.3f} | {percentile(ttft, .5):.2f} | "
                         f"{percentile(ttft, .95):.2f} | {cpu_ms:.1f} | {total} | {failed} |")
            if name == names[0]:
                verdicts.append((clients, ratio, failed))
    ok = all(r >= 0.95 and f == 0 for _, r, f in verdicts)
    lines += ["", "Throughput ratio (l3zh-local / llama-cpp-python): "
              + ", ".join(f"{c} clients {r:.3f}" for c, r, _ in verdicts)
              + f"; target >= 0.95 and no failed request: {'met' if ok else 'NOT met'}.",
              f"Load average at the end: {load[0]:.1f} (this machine has {os.cpu_count()} cores and is shared).", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
