"""Safe writing: outputs appear under their final name only when complete, and only if there is room."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskSpaceError, InputError, OutputExists

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under; never mistaken for a finished output."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block finishes.

    On any exception (Ctrl-C included) the temporary file is removed, so an interrupted run leaves
    nothing that looks finished. A kill -9 can leave a `*.partial` file, which is ignored and
    overwritten by the next run.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExists(f"{path} already exists: pass --force to overwrite it")
    tmp = partial_path(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"internal error: {tmp} was not written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict:
    """A JSON file the user supplied (config, tokenizer config, index); bad JSON is their error, said in one line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); is the download complete?") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` whole. The temporary name is unique to this call (two processes writing the same file never
    share it) and still ends in PARTIAL_SUFFIX, so a killed writer's leftover is recognised as unfinished."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask, as for any file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_writable_dir(path: Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {path}: {exc.strerror}; choose another --out") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"output folder {path} is not writable; choose another --out")
    return path


def ensure_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Fail early, with the numbers, when `folder`'s disk cannot hold `needed_bytes` more."""
    free = shutil.disk_usage(folder).free
    # Keep a margin: file systems misbehave when completely full.
    margin = 256 * 1024**2
    if free < needed_bytes + margin:
        raise DiskSpaceError(
            f"not enough disk in {folder} for {what}: needs {human_size(needed_bytes + margin)}, "
            f"{human_size(free)} free; free some space or choose another --out"
        )


def sha256_file(path: Path, chunk: int = 8 * 1024**2) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
