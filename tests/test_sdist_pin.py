"""The converter fetched at first use runs as code: only the sdist whose sha256 is pinned in the source is unpacked."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from l3zh_local import toolchain
from l3zh_local.cli import main
from l3zh_local.errors import ToolchainError

VERSION = "0.3.36"


def fake_sdist(path: Path, converter: bytes = b"print('not the real converter')\n") -> Path:
    """A tarball laid out like llama-cpp-python's sdist, holding a converter: what a tampered mirror would serve."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [(f"llama_cpp_python-{VERSION}/vendor/llama.cpp/{toolchain.CONVERTER}", converter),
                           (f"llama_cpp_python-{VERSION}/vendor/llama.cpp/LICENSE", b"MIT\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_leftovers(cache: Path) -> list[str]:
    """What an attempt left in the cache, besides empty lock files."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                  if not (p.is_dir() or (p.name.endswith(".lock") and p.stat().st_size == 0)))


def test_the_pinned_version_has_a_pinned_hash():
    assert toolchain.runtime_version() == VERSION
    assert len(toolchain.pinned_sdist_sha256(VERSION)) == 64


def test_cli_refuses_a_tampered_sdist_with_both_hashes_and_leaves_nothing(tiny_llama3_dir, tmp_path):
    sdist = fake_sdist(tmp_path / f"llama_cpp_python-{VERSION}.tar.gz")
    cache = tmp_path / "cache"
    result = CliRunner().invoke(main, ["export", str(tiny_llama3_dir), "--q", "q8_0", "--out", str(tmp_path / "o")],
                                env={"L3ZH_CACHE": str(cache), "L3ZH_LLAMA_CPP_SDIST": str(sdist),
                                     "L3ZH_LLAMA_CPP": None})
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: L3ZH_LLAMA_CPP_SDIST="), result.output
    assert sha256(sdist) in lines[0] and toolchain.SDIST_SHA256[VERSION] in lines[0]
    assert "L3ZH_LLAMA_CPP" in lines[0]
    assert cache_leftovers(cache) == []
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.gguf"))


def test_one_byte_appended_is_refused_before_unpacking(tmp_path, monkeypatch):
    good = fake_sdist(tmp_path / "good.tar.gz")
    # Pretend the fake is the pinned file: the real one is 77 MB and the tests run offline.
    monkeypatch.setitem(toolchain.SDIST_SHA256, VERSION, sha256(good))
    tampered = tmp_path / f"llama_cpp_python-{VERSION}.tar.gz"
    tampered.write_bytes(good.read_bytes() + b"\0")
    cache = tmp_path / "cache"
    monkeypatch.setenv("L3ZH_CACHE", str(cache))
    monkeypatch.delenv("L3ZH_LLAMA_CPP", raising=False)
    monkeypatch.setenv("L3ZH_LLAMA_CPP_SDIST", str(tampered))
    unpacked = []
    monkeypatch.setattr(toolchain, "_unpack", lambda *args: unpacked.append(args))
    with pytest.raises(ToolchainError) as err:
        toolchain.llama_cpp()
    assert sha256(tampered) in str(err.value) and sha256(good) in str(err.value)
    assert unpacked == [] and cache_leftovers(cache) == []

    monkeypatch.undo()  # the untouched file is accepted, and the stamp records its hash
    monkeypatch.setitem(toolchain.SDIST_SHA256, VERSION, sha256(good))
    monkeypatch.setenv("L3ZH_CACHE", str(cache))
    monkeypatch.delenv("L3ZH_LLAMA_CPP", raising=False)
    monkeypatch.setenv("L3ZH_LLAMA_CPP_SDIST", str(good))
    tools = toolchain.llama_cpp()
    assert tools.source == "sdist" and tools.sdist_sha256 == sha256(good) and tools.converter.is_file()


def test_a_cached_tree_from_another_sdist_is_not_used(tmp_path, monkeypatch):
    """A cache filled before the pin (or by hand) from an sdist that is not the pinned one is replaced."""
    good = fake_sdist(tmp_path / "good.tar.gz", converter=b"# the pinned one\n")
    monkeypatch.setitem(toolchain.SDIST_SHA256, VERSION, sha256(good))
    cache = tmp_path / "cache"
    stale = cache / "llama.cpp" / VERSION
    stale.mkdir(parents=True)
    (stale / toolchain.CONVERTER).write_text("# from somewhere else\n")
    (stale / ".complete.json").write_text('{"sdist_sha256": "' + "0" * 64 + '"}')
    monkeypatch.setenv("L3ZH_CACHE", str(cache))
    monkeypatch.delenv("L3ZH_LLAMA_CPP", raising=False)
    monkeypatch.setenv("L3ZH_LLAMA_CPP_SDIST", str(good))
    tools = toolchain.llama_cpp()
    assert tools.converter.read_text() == "# the pinned one\n"


def test_a_version_without_a_pinned_hash_is_refused_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(toolchain, "runtime_version", lambda: "9.9.9")
    monkeypatch.setattr(toolchain, "_download_sdist", lambda *a: pytest.fail("downloaded an unpinned sdist"))
    monkeypatch.setenv("L3ZH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("L3ZH_LLAMA_CPP", raising=False)
    monkeypatch.delenv("L3ZH_LLAMA_CPP_SDIST", raising=False)
    with pytest.raises(ToolchainError) as err:
        toolchain.llama_cpp()
    assert "9.9.9" in str(err.value) and "L3ZH_LLAMA_CPP" in str(err.value) and VERSION in str(err.value)
    assert cache_leftovers(tmp_path / "cache") == []


def test_a_users_own_checkout_is_their_choice_and_recorded_as_such(tmp_path):
    (tmp_path / toolchain.CONVERTER).write_text("")
    tools = toolchain.llama_cpp(tmp_path)
    assert tools.describe() | {"root": None} == {"root": None, "source": "checkout", "runtime_version": VERSION,
                                                 "sdist_sha256": None}
