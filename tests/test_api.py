"""The public Python API: what `help(l3zh_local)` shows, the README's example run as written, errors that are also
builtins, and a wheel that carries the package's data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import l3zh_local
from l3zh_local import errors

ROOT = Path(__file__).resolve().parent.parent


def test_help_shows_the_api():
    proc = subprocess.run([sys.executable, "-c", "import l3zh_local; help(l3zh_local)"], capture_output=True,
                          text=True, env=dict(os.environ, PAGER="cat", MANPAGER="cat"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("export", "merge_lora", "verify_gguf", "chat", "ChatSession", "list_families", "quant_types",
                 "ChatPrompt"):
        assert name in l3zh_local.__all__
        assert re.search(rf"\b{name}\b", proc.stdout), f"help(l3zh_local) does not show {name}"
    assert all(hasattr(l3zh_local, name) for name in l3zh_local.__all__)


def test_errors_are_builtins_too():
    assert issubclass(errors.InputError, ValueError)
    assert issubclass(errors.OutputExists, FileExistsError)
    assert issubclass(errors.OfflineError, ConnectionError)
    assert issubclass(errors.DiskSpaceError, OSError)
    assert issubclass(errors.ToolchainError, RuntimeError)
    with pytest.raises(OSError, match="full"):
        raise errors.DiskSpaceError("full")
    assert errors.OutputExists("x").exit_code == 2


def test_api_defaults_are_the_cli_defaults():
    import inspect

    from click.testing import CliRunner

    from l3zh_local.cli import main

    export_params = inspect.signature(l3zh_local.export).parameters
    assert export_params["quants"].default == ("q4_k_m",) and export_params["out"].default == "dist"
    help_text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "[default: q4_k_m]" in help_text and "[default: dist]" in help_text


def test_quant_types_and_families():
    names = [q.name for q in l3zh_local.quant_types()]
    assert names[:4] == ["f32", "f16", "bf16", "q8_0"] and "q4_k_m" in names
    assert {f.name for f in l3zh_local.list_families()} >= {"llama3", "llama3.1", "chatml"}
    assert l3zh_local.get_family("llama3").sampling == l3zh_local.Sampling()


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1, "the README should have one Python example"
    return blocks[0]


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    proc = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "chatml smollm2-135m-instruct.q4_k_m.gguf []" in lines
    assert any(line.startswith("Sampling(temperature=0.6") for line in lines)
    assert "The capital of France is Paris." in lines, proc.stdout
    assert "no-such-folder" in lines[-1]
    assert (tmp_path / "dist" / "manifest.json").is_file()


def test_wheel_carries_recipes_and_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [wheel] = tmp_path.glob("l3zh_local-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {n for n in names if n.startswith("l3zh_local/recipes/") and n.endswith(".toml")}
    assert len(recipes) == len(list((ROOT / "l3zh_local" / "recipes").glob("*.toml"))) >= 5
    assert "l3zh_local/data/eval/tokenizer_cases.json" in names
    assert not any(n.startswith(("tests/", "l3zh_local/fixtures")) for n in names)
