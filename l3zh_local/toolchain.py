"""The pinned llama.cpp tooling: the converter of the very llama.cpp that the installed runtime was built from.

llama-cpp-python's sdist vendors llama.cpp whole. We fetch that sdist for the installed version (pip, so that
mirrors and proxies configured for pip apply), refuse it unless its sha256 is the one pinned here, unpack only the
Python conversion tooling into the cache, and run the converter in a subprocess. A user's own checkout can replace
it (``--llama-cpp DIR`` or ``L3ZH_LLAMA_CPP``): their choice, recorded as such in the manifest.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from . import locks, settings
from .errors import OfflineError, ToolchainError
from .files import sha256_file
from .interrupts import wait_or_kill

RUNTIME_PACKAGE = "llama-cpp-python"
CONVERTER = "convert_hf_to_gguf.py"
# What we keep from the vendored llama.cpp: the converter and what it imports, Meta's templates, test vectors.
_KEEP = (
    CONVERTER,
    "conversion/",
    "gguf-py/",
    "models/templates/",
    "models/ggml-vocab-llama-bpe.gguf.inp",
    "models/ggml-vocab-llama-bpe.gguf.out",
    "LICENSE",
)
_DOWNLOAD_TIMEOUT_S = 600
# sha256 of each llama-cpp-python sdist we trust, by version (the file PyPI serves). The converter runs as code on
# the user's machine: an sdist that does not match, from a mirror, a proxy or L3ZH_LLAMA_CPP_SDIST, is refused.
SDIST_SHA256 = {
    "0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}


@dataclass(frozen=True)
class LlamaCpp:
    """A usable llama.cpp tree: where it is and where it came from."""

    root: Path
    source: str  # "sdist" or "checkout"
    runtime_version: str
    sdist_sha256: str | None = None

    @property
    def converter(self) -> Path:
        return self.root / CONVERTER

    @property
    def vocab_test_vectors(self) -> tuple[Path, Path]:
        base = self.root / "models" / "ggml-vocab-llama-bpe.gguf"
        return base.with_name(base.name + ".inp"), base.with_name(base.name + ".out")

    def describe(self) -> dict:
        data = asdict(self)
        data["root"] = str(self.root)
        return data


def runtime_version() -> str:
    try:
        return importlib.metadata.version(RUNTIME_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ToolchainError(
            f"{RUNTIME_PACKAGE} is not installed; install l3zh-local with pip so that it comes along"
        ) from None


def llama_cpp(checkout: Path | None = None) -> LlamaCpp:
    """Return the llama.cpp tooling to use, fetching the pinned sdist on first use."""
    version = runtime_version()
    checkout = checkout or settings.llama_cpp_override()
    if checkout is not None:
        checkout = Path(checkout).expanduser()
        if not (checkout / CONVERTER).is_file():
            raise ToolchainError(f"{checkout} is not a llama.cpp checkout: {CONVERTER} is missing there")
        return LlamaCpp(root=checkout, source="checkout", runtime_version=version)

    expected = pinned_sdist_sha256(version)
    root = settings.cache_dir() / "llama.cpp" / version
    stamp = root / ".complete.json"
    if _installed_sha256(stamp) != expected:
        # One process fetches and unpacks; another one waits, then finds the tree complete.
        with locks.hold(locks.lock_path_for(root), f"the llama.cpp converter cache {root}"):
            if _installed_sha256(stamp) != expected:
                _install_from_sdist(version, root, expected)
    return LlamaCpp(root=root, source="sdist", runtime_version=version, sdist_sha256=expected)


def pinned_sdist_sha256(version: str) -> str:
    expected = SDIST_SHA256.get(version)
    if expected is None:
        raise ToolchainError(
            f"l3zh-local has no pinned sha256 for the {RUNTIME_PACKAGE} {version} sdist, so it will not run its "
            f"converter: install {RUNTIME_PACKAGE}=={' or =='.join(SDIST_SHA256)}, or set L3ZH_LLAMA_CPP to a "
            "llama.cpp checkout you trust"
        )
    return expected


def _installed_sha256(stamp: Path) -> str | None:
    """The sdist hash a cached tree was unpacked from (None: absent, unfinished or unreadable)."""
    try:
        return json.loads(stamp.read_text()).get("sdist_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _install_from_sdist(version: str, root: Path, expected_sha256: str) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        local = settings.sdist_override()
        sdist = local or _download_sdist(version, Path(tmp))
        if not sdist.is_file():
            raise ToolchainError(f"L3ZH_LLAMA_CPP_SDIST points at {sdist}, which does not exist")
        actual = sha256_file(sdist)
        if actual != expected_sha256:  # checked before a single file of it is unpacked
            what, fix = ((f"L3ZH_LLAMA_CPP_SDIST={sdist}", "use the file PyPI serves") if local else
                         (f"the downloaded {sdist.name}", "check pip's index or proxy settings"))
            raise ToolchainError(
                f"{what} is not the {RUNTIME_PACKAGE} {version} sdist l3zh-local trusts: sha256 {actual}, expected "
                f"{expected_sha256}; {fix}, or set L3ZH_LLAMA_CPP to a llama.cpp checkout you trust"
            )
        staging = Path(tmp) / "tree"
        _unpack(sdist, staging)
        (staging / ".complete.json").write_text(
            json.dumps({"runtime_version": version, "sdist": sdist.name, "sdist_sha256": actual})
        )
        if root.exists():  # a half-finished earlier attempt
            shutil.rmtree(root)
        os.replace(staging, root)


def _download_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{RUNTIME_PACKAGE}=={version}", "-d", str(dest), "--quiet"]
    print(f"Fetching the llama.cpp converter pinned to {RUNTIME_PACKAGE} {version} (once, ~77 MB)...",
          file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise OfflineError(
            f"downloading the {RUNTIME_PACKAGE} {version} sdist timed out; set L3ZH_LLAMA_CPP_SDIST to a local copy "
            "or L3ZH_LLAMA_CPP to a llama.cpp checkout"
        ) from None
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise OfflineError(
            f"could not download the {RUNTIME_PACKAGE} {version} sdist ({last}); set L3ZH_LLAMA_CPP_SDIST to a "
            "local copy or L3ZH_LLAMA_CPP to a llama.cpp checkout"
        )
    return found[0]


def _unpack(sdist: Path, dest: Path) -> None:
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/", 3)
                # llama_cpp_python-X/vendor/llama.cpp/<relative>
                if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                    continue
                relative = parts[3]
                if not any(relative == k or (k.endswith("/") and relative.startswith(k)) for k in _KEEP):
                    continue
                if not (member.isfile() or member.isdir()):
                    continue
                target = dest / relative
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    continue
                with source as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ToolchainError(f"could not unpack {sdist}: {exc}; delete it and run again") from None
    if not (dest / CONVERTER).is_file():
        raise ToolchainError(f"{sdist} holds no vendor/llama.cpp/{CONVERTER}; is it a llama-cpp-python sdist?")


def run_converter(
    tc: LlamaCpp,
    model_dir: Path,
    outfile: Path,
    outtype: str,
    *,
    expected_bytes: int | None = None,
    log_path: Path | None = None,
    extra_args: tuple[str, ...] = (),
) -> None:
    """Run llama.cpp's converter on an HF folder, showing progress from the growing output file."""
    cmd = [sys.executable, str(tc.converter), str(model_dir), "--outfile", str(outfile), "--outtype", outtype,
           *extra_args]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_path = log_path or outfile.with_name(outfile.name + ".log")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        stop = watch_file_growth(outfile, expected_bytes, f"convert to {outtype}")
        try:
            wait_or_kill(proc)  # Ctrl-C or SIGTERM: take the converter down with us
        finally:
            stop.set()
    if proc.returncode != 0:
        reason = _last_error_line(log_path)
        raise ToolchainError(f"llama.cpp's converter failed (exit {proc.returncode}): {reason} (log: {log_path})")
    log_path.unlink(missing_ok=True)


def watch_file_growth(outfile: Path, expected: int | None, label: str, stream: TextIO | None = None
                      ) -> threading.Event:
    """Show a progress bar for a file being written by native code or a child; set the event to stop it."""
    from tqdm import tqdm

    stop = threading.Event()

    def loop() -> None:
        with tqdm(total=expected, unit="B", unit_scale=True, desc=label, leave=False,
                  disable=None, file=stream or sys.stderr) as bar:
            while not stop.wait(0.5):
                size = outfile.stat().st_size if outfile.exists() else 0
                bar.update(max(0, size - bar.n))

    threading.Thread(target=loop, daemon=True).start()
    return stop


def quiet_libllama() -> None:
    """Keep libllama's per-tensor log off the terminal unless L3ZH_VERBOSE=1."""
    from llama_cpp import _logger

    _logger.set_verbose(os.environ.get("L3ZH_VERBOSE") == "1")


def _last_error_line(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"
