"""manifest.json: what an export made, from what, with which tools, how long each step took, how it scored.

It is also what lets a re-run skip finished work: each output records the key of the inputs that made it (source
fingerprint, step settings, toolchain), and its size and mtime. An output whose key and file still match is reused.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._version import __version__
from .files import sha256_file, write_text_atomic

MANIFEST_NAME = "manifest.json"
SCHEMA = 1
# Small files are hashed; weight files are fingerprinted by size and mtime (hashing 16 GB on every run is too slow).
_HASHED_MAX_BYTES = 64 * 1024**2


def fingerprint_folder(folder: Path) -> dict[str, dict]:
    """A cheap identity of a model folder: sha256 of small files, size and mtime of the weights."""
    result = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        stat = path.stat()
        entry: dict = {"size": stat.st_size}
        if stat.st_size <= _HASHED_MAX_BYTES:
            entry["sha256"] = sha256_file(path)
        else:
            entry["mtime_ns"] = stat.st_mtime_ns
        result[path.name] = entry
    return result


def step_key(*parts) -> str:
    """A stable hash of whatever decides an output's content."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Manifest:
    out_dir: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def load(cls, out_dir: Path) -> Manifest:
        path = Path(out_dir) / MANIFEST_NAME
        data: dict = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                data = {}  # a damaged manifest only means nothing can be skipped
        if data.get("schema") != SCHEMA:
            data = {}
        data.setdefault("schema", SCHEMA)
        data.setdefault("files", {})
        data.setdefault("steps", {})
        return cls(Path(out_dir), data)

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    def set_run_info(self, **info) -> None:
        self.data.update(info)
        self.data["tool"] = {"l3zh_local": __version__, "python": platform.python_version(),
                             "platform": platform.platform()}
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def reusable(self, path: Path, key: str) -> bool:
        """True when `path` is the output this manifest recorded for inputs with this `key`."""
        entry = self.data["files"].get(Path(path).name)
        if not entry or entry.get("key") != key or not Path(path).is_file():
            return False
        stat = Path(path).stat()
        return entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns

    def record_file(self, path: Path, key: str, *, kind: str, seconds: float | None, **extra) -> dict:
        path = Path(path)
        stat = path.stat()
        entry = {"kind": kind, "key": key, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                 "sha256": sha256_file(path), **extra}
        if seconds is not None:
            entry["seconds"] = round(seconds, 2)
        self.data["files"][path.name] = entry
        return entry

    def record_step(self, name: str, seconds: float, **extra) -> None:
        self.data["steps"][name] = {"seconds": round(seconds, 2), **extra}

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, ensure_ascii=False, indent=2) + "\n")
