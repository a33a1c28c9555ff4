"""`l3zh-local serve` as a child process on a free loopback port, for the serve and page tests and the benchmark."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), LANG="C.UTF-8", PYTHONIOENCODING="utf-8")
_URL = re.compile(r" on (http://127\.0\.0\.1:\d+) ")


class ServeProcess:
    """Start `python -m l3zh_local serve GGUF --port 0 ARGS` and wait until it accepts requests."""

    def __init__(self, gguf: Path, *args: str, timeout_s: float = 180):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "l3zh_local", "serve", str(gguf), "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=str(ROOT), text=True, encoding="utf-8",
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stderr, self.errors), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        self.url = ""
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            found = _URL.search(line)
            if found:
                self.url = found.group(1)
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"serve did not start: {''.join(self.lines)} {''.join(self.errors)}")
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        self._wait_ready(deadline)

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("serve printed its address but does not answer /health")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as response:
            return json.loads(response.read())

    def terminate(self, timeout_s: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
