"""Ctrl-C and SIGTERM stop `l3zh-local export` in every phase, within seconds, leaving nothing that looks finished.

Each case starts the export (demo model) in a child process the way a script or CI runner does (`cmd &`): with
SIGINT ignored, inherited. That is how the Ctrl-C of the issue was swallowed (interrupts.py says why). It waits
until the phase has started, sends the signal, checks the exit code and the time it took, that the interrupted
step left no finished-looking file, and that a re-run reuses what was finished before the signal.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from l3zh_local.files import sha256_file

REPO = Path(__file__).resolve().parent.parent
STEM = "smollm2-135m-instruct"
# From the signal to the exit of the whole process tree, on 2 busy cores (it takes about a second when idle).
STOP_WITHIN_S = 10
PHASE_TIMEOUT_S = 300

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")]


def _as_background_job() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a non-interactive shell does


class Export:
    """`l3zh-local export ...` in a child process, its output collected line by line."""

    def __init__(self, *args: str, env: dict | None = None):
        full_env = dict(env or os.environ, PYTHONUNBUFFERED="1")
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "l3zh_local.cli", "export", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                     preexec_fn=_as_background_job)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while not ready():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what}:\n{self.output}"
            assert time.monotonic() < deadline, f"{what} never happened:\n{self.output}"
            time.sleep(0.02)

    def says(self, text: str) -> Callable[[], bool]:
        return lambda: any(text in line for line in list(self.lines))

    def has_child(self) -> bool:
        return bool(_children(self.proc.pid))

    def stop(self, signum: int) -> float:
        """Send `signum` to the export alone; return the seconds until it and all its children were gone."""
        children = _children(self.proc.pid)
        started = time.monotonic()
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=120)
        finally:
            self.proc.kill()
        while any(_alive(pid) for pid in children) and time.monotonic() - started < 120:
            time.sleep(0.02)
        self._reader.join(timeout=10)
        return time.monotonic() - started

    def finish(self) -> int:
        rc = self.proc.wait(timeout=900)
        self._reader.join(timeout=10)
        return rc


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _copy_finished(finished: Path, out: Path, names: list[str]) -> None:
    """Lay out `out` as a run that had finished these files (manifest included) would have left it."""
    out.mkdir(parents=True)
    shutil.copy2(finished / "manifest.json", out)
    for name in names:
        shutil.copy2(finished / name, out / name)  # copy2 keeps mtime_ns, which the manifest checks


@pytest.fixture(scope="module")
def finished(demo_dir, tmp_path_factory) -> Path:
    """A complete demo export (without verification), to start the later phases from."""
    out = tmp_path_factory.mktemp("finished")
    run = Export("--q", "q4_k_m", "--no-verify", "--out", str(out))
    assert run.finish() == 0, run.output
    return out


@pytest.fixture(scope="module")
def adapter(demo_dir, tmp_path_factory) -> Path:
    from support.lora_fixture import random_lora_adapter

    return random_lora_adapter(demo_dir, tmp_path_factory.mktemp("adapter") / "demo-lora", r=8, lora_alpha=16,
                               target_modules=["q_proj", "v_proj", "gate_proj"], dtype="float16")


class _HangingIndex(http.server.BaseHTTPRequestHandler):
    """A package index that accepts pip's request and never answers: the download is under way, and slow."""

    requests: list[str] = []
    release = threading.Event()

    def do_GET(self):  # noqa: N802 - the http.server API
        self.requests.append(self.path)
        self.release.wait(PHASE_TIMEOUT_S)

    def log_message(self, *args):
        pass


@pytest.fixture
def hanging_index():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangingIndex)
    server.daemon_threads = True
    _HangingIndex.requests, _HangingIndex.release = [], threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/", _HangingIndex.requests
    _HangingIndex.release.set()
    server.shutdown()


# Each case: the phase, the signal, what the run is started from (finished files), how to tell that the phase is
# under way, the files the interrupted step must not leave, and the files a re-run must reuse.
F16, IMATRIX, Q4 = f"{STEM}.f16.gguf", f"{STEM}.imatrix.gguf", f"{STEM}.q4_k_m.gguf"
CASES = {
    "download": (signal.SIGINT, [], None, [], []),
    "merge": (signal.SIGINT, [], "merge", [], []),
    "convert": (signal.SIGINT, [], ("glob", "*.f16.gguf.partial"), [F16], []),
    "convert-sigterm": (signal.SIGTERM, [], ("glob", "*.f16.gguf.partial"), [F16], []),
    "imatrix": (signal.SIGINT, [F16], ("says", "Computing an importance matrix"), [IMATRIX, Q4], [F16]),
    "quantize": (signal.SIGINT, [F16, IMATRIX], ("glob", "*.q4_k_m.gguf.partial"), [Q4], [F16, IMATRIX]),
    "quantize-sigterm": (signal.SIGTERM, [F16, IMATRIX], ("glob", "*.q4_k_m.gguf.partial"), [Q4], [F16, IMATRIX]),
    "verify": (signal.SIGINT, [F16, IMATRIX, Q4], ("verify", f"Verifying {F16}"), [], [F16, Q4]),
}


@pytest.mark.parametrize("phase", list(CASES))
def test_signal_stops_the_export_in_every_phase(phase, demo_dir, tmp_path, request):
    signum, start_from, under_way, not_left, reused = CASES[phase]
    out = tmp_path / "o"
    args = ["--q", "q4_k_m", "--out", str(out)] + ([] if phase == "verify" else ["--no-verify"])
    env = dict(os.environ)
    if start_from:  # the module's finished export is made only for the cases that start from it
        _copy_finished(request.getfixturevalue("finished"), out, start_from)

    if phase == "download":
        # An empty cache and a package index that hangs: the export is fetching the converter's sdist.
        index_url, requests = request.getfixturevalue("hanging_index")
        env = {k: v for k, v in env.items() if not k.startswith(("PIP_", "L3ZH_LLAMA_CPP"))}
        env.update(L3ZH_CACHE=str(tmp_path / "cache"), PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=index_url)
        run = Export(str(demo_dir), *args, env=env)  # the demo's folder: its cached build stays where it is
        run.wait_until(lambda: bool(requests), "the sdist download")
    elif phase == "merge":
        run = Export("--adapter", str(request.getfixturevalue("adapter")), *args, env=env)
        run.wait_until(lambda: bool(list(out.glob("*.merged-hf.tmp.partial"))), "the merge")
    else:
        run = Export(*args, env=env)
        kind, what = under_way
        if kind == "glob":
            run.wait_until(lambda: bool(list(out.glob(what))), what)
        else:
            run.wait_until(run.says(what), what)
            if kind == "verify":  # the checks run in child processes: interrupt one of those
                run.wait_until(run.has_child, "a verification child process")

    seconds = run.stop(signum)
    expected_rc = {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    assert run.proc.returncode == expected_rc, run.output
    assert seconds < STOP_WITHIN_S, f"took {seconds:.1f} s to stop"
    assert "Traceback" not in run.output, run.output
    assert run.output.rstrip().endswith("Interrupted: nothing half-written was left under a final name."), run.output

    # Nothing that looks finished: no partial, no temporary merge, every output file is one the manifest vouches for.
    leftovers = sorted(p.name for p in out.glob("*") if p.name.endswith((".partial", ".tmp")) or ".merged-hf" in p.name)
    assert leftovers == []
    for name in not_left:
        assert not (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {"files": {}}
    for path in [*out.glob("*.gguf"), *out.glob("*.safetensors")]:
        assert sha256_file(path) == manifest["files"][path.name]["sha256"], path.name
    if phase == "verify":
        assert "verify" not in manifest["files"][F16]  # the check that was stopped recorded no verdict
    if phase == "download":
        cache = tmp_path / "cache" / "llama.cpp"
        assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == []

    if reused:  # a re-run takes up what was finished before the signal
        rerun = Export("--q", "q4_k_m", "--no-verify", "--out", str(out))
        assert rerun.finish() == 0, rerun.output
        for name in reused:
            assert f"Reusing {name}" in rerun.output, rerun.output
        assert (out / Q4).is_file()
