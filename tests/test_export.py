"""`l3zh-local export` and its siblings, run as a user runs them, on the tiny Llama-3 fixture."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from l3zh_local import ggufmeta
from l3zh_local.cli import main

LADDER = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k", "iq4_xs"]
# The tensor type that most of the fixture's weight matrices must carry for each quant type.
MAIN_TENSOR_TYPE = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K", "q3_k_m": "Q3_K",
                    "q2_k": "Q2_K", "iq4_xs": "IQ4_XS"}


def run_cli(*args: str, env: dict | None = None):
    result = CliRunner().invoke(main, list(args), env=env)
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def ladder_export(tiny_llama3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ladder")
    result = run_cli("export", str(tiny_llama3_dir), "--q", ",".join(LADDER), "--no-verify", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result


def test_export_writes_each_quant_with_the_type_its_manifest_says(ladder_export):
    out, _ = ladder_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["outtype"] == "bf16"
    assert manifest["toolchain"]["runtime_version"] == "0.3.36"
    assert manifest["source"]["kind"] == "local"
    for q in LADDER:
        path = out / f"tiny-llama3-v1-bfloat16.{q}.gguf"
        entry = manifest["files"][path.name]
        meta = ggufmeta.read_metadata(path)
        assert entry["type"] == ggufmeta.file_type_name(meta) == q
        assert entry["size"] == path.stat().st_size
        types = meta["l3zh.tensor_types"]
        assert max(types, key=types.get) == MAIN_TENSOR_TYPE[q], types
        assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert not list(out.glob("*.partial"))


def test_rerun_skips_finished_steps(ladder_export):
    out, _ = ladder_export
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    started = time.monotonic()
    result = run_cli("export", str(Path(json.loads((out / "manifest.json").read_text())["source"]["path"])),
                     "--q", ",".join(LADDER), "--no-verify", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.output.count("Reusing") == len(LADDER) + 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == before
    assert time.monotonic() - started < 30  # generous: nothing is converted or quantized again


def test_rerun_redoes_a_step_whose_output_changed(tiny_llama3_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("export", str(tiny_llama3_dir), "--q", "q4_0", "--no-verify", "--out", str(out)).exit_code == 0
    quant = out / "tiny-llama3-v1-bfloat16.q4_0.gguf"
    with open(quant, "ab") as fh:  # damaged after the fact: must not be reused, and must not be clobbered silently
        fh.write(b"junk")
    result = run_cli("export", str(tiny_llama3_dir), "--q", "q4_0", "--no-verify", "--out", str(out))
    assert_one_line_error(result, "--force")
    result = run_cli("export", str(tiny_llama3_dir), "--q", "q4_0", "--no-verify", "--out", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert "Reusing" not in result.output
    assert ggufmeta.file_type_name(ggufmeta.read_metadata(quant)) == "q4_0"


def test_existing_output_is_not_clobbered(tiny_llama3_dir, tmp_path):
    (tmp_path / "tiny-llama3-v1-bfloat16.bf16.gguf").write_bytes(b"someone else's file")
    result = run_cli("export", str(tiny_llama3_dir), "--q", "q8_0", "--no-verify", "--out", str(tmp_path))
    assert_one_line_error(result, "exists", "--force")
    assert (tmp_path / "tiny-llama3-v1-bfloat16.bf16.gguf").read_bytes() == b"someone else's file"


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------------------

def test_missing_path(tmp_path):
    assert_one_line_error(run_cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "does not exist")


def test_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("export", str(tmp_path / "empty"), "--out", str(tmp_path / "o")),
                          "config.json is missing")


def _copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def test_unsupported_architecture(tiny_llama3_dir, tmp_path):
    model = _copy_model(tiny_llama3_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("export", str(model), "--out", str(tmp_path / "o")),
                          "unsupported architecture Qwen2ForCausalLM")


def test_truncated_safetensors(tiny_llama3_dir, tmp_path):
    model = _copy_model(tiny_llama3_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    out = tmp_path / "o"
    assert_one_line_error(run_cli("export", str(model), "--out", str(out)), "truncated")
    # Refused before anything is written: no output folder, or one without a GGUF.
    assert not out.exists() or not list(out.glob("*.gguf*"))


def test_corrupt_safetensors_header(tiny_llama3_dir, tmp_path):
    model = _copy_model(tiny_llama3_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe not json")
    assert_one_line_error(run_cli("export", str(model), "--out", str(tmp_path / "o")), "not a valid safetensors")


def test_pickle_weights_are_refused(tiny_llama3_dir, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_llama3_dir / "config.json", model)
    (model / "pytorch_model.bin").write_bytes(b"not loaded: refusing comes first")
    assert_one_line_error(run_cli("export", str(model), "--out", str(tmp_path / "o")), "pickle", "--allow-pickle")


@pytest.mark.parametrize("spec, extra, fragment", [
    ("q4_k_x", [], "unknown quant type"),
    ("iq2_xs", ["--no-imatrix"], "importance matrix"),
    (",", [], "--q is empty"),
])
def test_bad_quant_types(tiny_llama3_dir, tmp_path, spec, extra, fragment):
    assert_one_line_error(run_cli("export", str(tiny_llama3_dir), "--q", spec, *extra, "--out", str(tmp_path / "o")),
                          fragment)
    assert not (tmp_path / "o").exists()


def test_imatrix_types_are_made_with_an_importance_matrix(tiny_llama3_dir, tmp_path):
    result = run_cli("export", str(tiny_llama3_dir), "--q", "iq2_xs", "--no-verify", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"]["tiny-llama3-v1-bfloat16.imatrix.gguf"]["tensors"] == 2 * 7 + 1
    meta = ggufmeta.read_metadata(tmp_path / "tiny-llama3-v1-bfloat16.iq2_xs.gguf")
    assert ggufmeta.file_type_name(meta) == "iq2_xs"
    assert "IQ2_XS" in meta["l3zh.tensor_types"]


def test_unwritable_output_folder(tiny_llama3_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(run_cli("export", str(tiny_llama3_dir), "--out", str(blocker / "sub")),
                          "cannot create output folder")


@pytest.mark.parametrize("env, fragments", [
    ({"HF_HUB_OFFLINE": "1"}, ("shareAI/llama3.1-8b-instruct-dpo-zh", "HF_HUB_OFFLINE is set")),
    # A closed port on loopback: the connection is refused at once, as on a machine without network.
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, ("cannot download shareAI/llama3.1-8b-instruct-dpo-zh", "hf-mirror.com")),
])
def test_unreachable_hub_fails_fast_with_one_line(tmp_path, env, fragments):
    started = time.monotonic()
    result = run_cli("export", "shareAI/llama3.1-8b-instruct-dpo-zh", "--out", str(tmp_path / "o"),
                     env={**env, "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(result, *fragments)
    assert time.monotonic() - started < 60


def test_not_enough_disk(tiny_llama3_dir, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 10**6, 10**6))
    assert_one_line_error(run_cli("export", str(tiny_llama3_dir), "--out", str(tmp_path / "o")),
                          "not enough disk", "free")
    assert not list((tmp_path / "o").glob("*.gguf"))


# -- interruption: nothing that looks finished ----------------------------------------------------------------------

def _start_export(model: Path, out: Path) -> subprocess.Popen:
    # Started as `cmd &` in a script or CI runner starts it, SIGINT ignored: Python then never turned Ctrl-C into
    # KeyboardInterrupt by itself, and the export ran to its end (see interrupts.py).
    return subprocess.Popen([sys.executable, "-m", "l3zh_local.cli", "export", str(model), "--q", "q4_k_m",
                             "--no-verify",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 600) -> Path:
    # Generous: on 2 busy cores the tiny model takes minutes to reach its quantization.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob(pattern)) if folder.exists() else []
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{pattern} never appeared")


@pytest.mark.parametrize("phase", ["*.bf16.gguf.partial", "*.q4_k_m.gguf.partial"])
def test_ctrl_c_leaves_no_finished_looking_file(tiny_llama3_dir, tmp_path, phase):
    out = tmp_path / "o"
    proc = _start_export(tiny_llama3_dir, out)
    partial = _wait_for(phase, out, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    final = partial.with_name(partial.name.removesuffix(".partial"))
    assert not final.exists()
    assert not list(out.glob("*.partial"))


def test_kill_then_rerun_finishes_cleanly(tiny_llama3_dir, tmp_path):
    out = tmp_path / "o"
    proc = _start_export(tiny_llama3_dir, out)
    partial = _wait_for("*.q4_k_m.gguf.partial", out, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not partial.with_name(partial.name.removesuffix(".partial")).exists()
    result = run_cli("export", str(tiny_llama3_dir), "--q", "q4_k_m", "--no-verify", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "Reusing tiny-llama3-v1-bfloat16.bf16.gguf" in result.output  # finished before the kill
    assert not list(out.glob("*.partial"))
    assert ggufmeta.file_type_name(ggufmeta.read_metadata(out / "tiny-llama3-v1-bfloat16.q4_k_m.gguf")) == "q4_k_m"


def test_export_verifies_each_gguf_and_records_the_verdict(tiny_llama3_dir, tmp_path):
    result = run_cli("export", str(tiny_llama3_dir), "--q", "q4_k_m", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    for name in ("tiny-llama3-v1-bfloat16.bf16.gguf", "tiny-llama3-v1-bfloat16.q4_k_m.gguf"):
        verdict = files[name]["verify"]
        assert verdict["passed"] is True
        assert verdict["ref"] == str(tiny_llama3_dir)  # small model: judged against the HF weights
        assert {c["name"] for c in verdict["checks"]} == {"tokenizer", "template", "eos", "quality", "stop"}
    again = run_cli("export", str(tiny_llama3_dir), "--q", "q4_k_m", "--out", str(tmp_path))
    assert again.exit_code == 0 and again.output.count("Reusing the verification") == 2


def test_export_fails_when_verification_fails(tiny_llama3_dir, tmp_path):
    from l3zh_local.templates import get_family

    # A custom template whose declared EOS is not the token that ends its assistant turns: a classic mistake.
    template = tmp_path / "wrong-eos.jinja"
    template.write_text('{# l3zh: {"eos_token": "<|end_of_text|>"} #}' + get_family("llama3").jinja)
    out = tmp_path / "o"
    result = run_cli("export", str(tiny_llama3_dir), "--q", "q8_0", "--template-file", str(template),
                     "--out", str(out))
    assert result.exit_code == 1, result.output
    assert "Error: verification failed for tiny-llama3-v1-bfloat16.bf16.gguf, tiny-llama3-v1-bfloat16.q8_0.gguf" \
        in result.output
    verdict = json.loads((out / "manifest.json").read_text())["files"]["tiny-llama3-v1-bfloat16.q8_0.gguf"]["verify"]
    assert [c["name"] for c in verdict["checks"] if c["status"] == "fail"] == ["eos"]
    assert (out / "tiny-llama3-v1-bfloat16.q8_0.gguf").is_file()  # kept for inspection, and the verdict says why


def test_convert_and_quantize_commands(tiny_llama3_dir, tmp_path):
    f16 = tmp_path / "tiny.f16.gguf"
    result = run_cli("convert", str(tiny_llama3_dir), "--out", str(f16), "--outtype", "f16")
    assert result.exit_code == 0, result.output
    assert ggufmeta.file_type_name(ggufmeta.read_metadata(f16)) == "f16"
    result = run_cli("quantize", str(f16), "--q", "q5_k_s")
    assert result.exit_code == 0, result.output
    assert ggufmeta.file_type_name(ggufmeta.read_metadata(tmp_path / "tiny.q5_k_s.gguf")) == "q5_k_s"
    assert_one_line_error(run_cli("convert", str(tiny_llama3_dir), "--out", str(f16)), "exists", "--force")


def test_quants_are_verified_against_the_q8_0_when_the_16bit_gguf_does_not_fit(tiny_llama3_dir, tmp_path,
                                                                               monkeypatch):
    import l3zh_local
    from l3zh_local import hardware

    export_module = sys.modules["l3zh_local.export"]  # the module: l3zh_local.export is the API function
    monkeypatch.setattr(export_module, "VERIFY_HF_MAX_PARAMS", 0)  # as for a model too large for an HF reference
    monkeypatch.setattr(hardware, "available_memory", lambda: 512 * 2**20)  # less than the bf16 GGUF + 1 GiB
    logs: list[str] = []
    result = l3zh_local.export(str(tiny_llama3_dir), quants=["q8_0", "q4_k_m"], out=tmp_path, imatrix=False,
                               log=logs.append)
    files = result.manifest.data["files"]
    q8, q4 = result.quant_ggufs["q8_0"], result.quant_ggufs["q4_k_m"]
    assert files[q4.name]["verify"]["ref"] == str(q8)
    assert files[q8.name]["verify"]["ref"] is None and files[result.base_gguf.name]["verify"]["ref"] is None
    assert any("does not fit" in line and q8.name in line for line in logs)
    assert not result.failed_verification
