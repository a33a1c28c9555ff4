"""Two l3zh-local processes sharing an output folder or a cache entry: one waits for the other, or refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from l3zh_local import locks
from l3zh_local.cli import main
from l3zh_local.errors import Busy
from l3zh_local.export import EXPORT_LOCK
from l3zh_local.files import sha256_file, write_text_atomic

REPO = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def start_holder(lock_path: Path, seconds: float = 600) -> subprocess.Popen:
    """Another process holding `lock_path` (as a running export would) until killed or `seconds` pass."""
    code = ("import sys, time; from pathlib import Path; from l3zh_local import locks\n"
            "with locks.hold(Path(sys.argv[1]), 'x'):\n"
            "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_path), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env=child_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_busy_names_the_holder_and_a_killed_holder_never_blocks(tmp_path):
    lock = tmp_path / ".thing.lock"
    holder = start_holder(lock)
    try:
        with pytest.raises(Busy) as err:
            with locks.hold(lock, "the thing", wait=False):
                pass
        assert f"pid {holder.pid}" in str(err.value) and "the thing" in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel alone drops the lock
        holder.wait()
    started = time.monotonic()
    with locks.hold(lock, "the thing", wait=False):
        assert (tmp_path / ".thing.lock.pid").read_text().strip() == str(os.getpid())
    assert time.monotonic() - started < 1


def test_a_waiter_says_whom_it_waits_for_then_goes_on(tmp_path):
    lock = tmp_path / ".thing.lock"
    holder = start_holder(lock, seconds=1.5)
    said: list[str] = []
    started = time.monotonic()
    with locks.hold(lock, "the thing", log=said.append):
        assert time.monotonic() - started > 1  # got it only once the holder was done
    assert said == [f"Waiting for another l3zh-local (pid {holder.pid}), which is using the thing..."]
    holder.wait()


def test_no_wait_refuses_an_export_into_a_busy_folder_in_one_line(tiny_llama3_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    holder = start_holder(out / EXPORT_LOCK)
    try:
        result = CliRunner().invoke(main, ["export", str(tiny_llama3_dir), "--q", "q8_0", "--no-wait",
                                           "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: output folder"), result.output
    assert f"pid {holder.pid}" in lines[0] and "--no-wait" in lines[0]
    # Nothing touched: only the lock, and the pid file of the holder, killed without clean-up.
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_LOCK, EXPORT_LOCK + ".pid"]


def test_atomic_text_writes_from_many_writers_never_collide(tmp_path):
    target = tmp_path / "manifest.json"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(200):
                write_text_atomic(target, json.dumps({"writer": n, "i": i, "pad": "x" * 4096}))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def start_export(out: Path, quants: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "l3zh_local.cli", "export", "--q", quants, "--no-verify",
                             "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=child_env())


@pytest.mark.slow
def test_two_exports_into_one_folder_both_finish_and_share_the_work(demo_dir, tmp_path):
    out = tmp_path / "dist"
    first = start_export(out, "q4_k_m,q8_0")
    deadline = time.monotonic() + 300
    while not list(out.glob("*.f16.gguf.partial")):  # the first one is converting: it holds the folder
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = start_export(out, "q5_k_m,q8_0")
    refused = start_export(out, "q8_0", "--no-wait")
    refused_output = refused.communicate(timeout=120)[0]
    first_output = first.communicate(timeout=600)[0]
    second_output = second.communicate(timeout=600)[0]

    assert refused.returncode == 2, refused_output
    assert [ln for ln in refused_output.splitlines() if ln.startswith("Error: ")] == [
        f"Error: output folder {out} is in use by another l3zh-local (pid {first.pid}); wait for it to finish, "
        "or run again without --no-wait to wait for it"], refused_output
    assert "Traceback" not in refused_output
    assert first.returncode == 0, first_output
    assert second.returncode == 0, second_output
    assert "Traceback" not in first_output + second_output
    assert f"Waiting for another l3zh-local (pid {first.pid}), which is using output folder {out}" in second_output
    # The second run re-read the manifest after the wait: what the first made is reused, not redone.
    assert "Reusing smollm2-135m-instruct.f16.gguf" in second_output
    assert "Reusing smollm2-135m-instruct.q8_0.gguf." in second_output
    assert "Reusing smollm2-135m-instruct.imatrix.gguf." in second_output

    files = json.loads((out / "manifest.json").read_text())["files"]
    ggufs = sorted(name for name in files if name.endswith(".gguf") and files[name]["kind"] != "imatrix")
    assert ggufs == [f"smollm2-135m-instruct.{t}.gguf" for t in ("f16", "q4_k_m", "q5_k_m", "q8_0")]
    for name in ggufs:
        assert sha256_file(out / name) == files[name]["sha256"], name
    assert not list(out.glob("*.partial")) and not list(out.glob("*.log"))
    assert not (out / (EXPORT_LOCK + ".pid")).exists()


def test_the_converter_cache_waits_for_another_process_filling_it(tmp_path, monkeypatch, capsys):
    from test_sdist_pin import VERSION, fake_sdist, sha256

    from l3zh_local import toolchain

    sdist = fake_sdist(tmp_path / "sdist.tar.gz")
    monkeypatch.setitem(toolchain.SDIST_SHA256, VERSION, sha256(sdist))  # the tests run offline
    monkeypatch.setenv("L3ZH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("L3ZH_LLAMA_CPP", raising=False)
    monkeypatch.setenv("L3ZH_LLAMA_CPP_SDIST", str(sdist))
    root = tmp_path / "cache" / "llama.cpp" / VERSION
    holder = start_holder(locks.lock_path_for(root), seconds=1.5)
    tools = toolchain.llama_cpp()
    assert (f"Waiting for another l3zh-local (pid {holder.pid}), which is using the llama.cpp converter cache "
            f"{root}...") in capsys.readouterr().err
    assert tools.converter.is_file()
    holder.wait()
