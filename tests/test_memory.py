"""memory.py's estimate (weights + KV cache + compute buffer) against llama.cpp's own allocation, and `plan`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from l3zh_local import memory, plan
from l3zh_local.cli import main
from l3zh_local.errors import InputError
from l3zh_local.quantize import QUANT_TYPES

GIB, MIB = memory.GIB, memory.MIB
ROOT = Path(__file__).resolve().parent.parent


# -- the 8B figures the README quotes --------------------------------------------------------------------------------

def test_llama3_8b_kv_cache():
    shape = memory.llama3_8b()
    assert memory.kv_bytes_per_token(shape) == 128 * 1024  # 2 x 32 layers x 8 KV heads x 128 x 2 bytes
    assert memory.kv_cache_bytes(shape, 8192) == 1 * GIB
    assert memory.kv_cache_bytes(shape, 32768) == 4 * GIB
    assert memory.kv_cache_bytes(shape, 131072) == 16 * GIB
    assert memory.kv_cache_bytes(shape, 32768, "q8_0") == 4 * GIB * 17 // 32
    assert memory.kv_cache_bytes(shape, 32768, "q4_0") == 4 * GIB * 9 // 32
    assert memory.kv_cache_bytes(shape, 1000) == memory.kv_cache_bytes(shape, 1024)  # cells come in 256s


def test_compute_buffer_follows_attention_or_logits():
    shape = memory.llama3_8b()
    # Without flash attention the batch's scores grow with the context; with it the logits stage dominates.
    assert memory.compute_buffer_bytes(shape, 32768, flash_attn=False) > 4 * memory.compute_buffer_bytes(
        shape, 4096, flash_attn=False)
    fa = memory.compute_buffer_bytes(shape, 131072, flash_attn=True)
    assert fa == memory.compute_buffer_bytes(shape, 4096, flash_attn=True) == 4 * 512 * (128256 + 3 * 4096)
    assert memory.estimate(shape, 0, 8192, "q8_0").flash_attn and not memory.estimate(shape, 0, 8192).flash_attn


def test_largest_context_fits_its_budget():
    shape, weights = memory.llama3_8b(), 4_900_000_000
    for budget in (6 * GIB, 8 * GIB, 12 * GIB):
        for kv in memory.KV_TYPES:
            n = memory.largest_context(shape, weights, budget, kv, limit=131072)
            assert n is not None and n % 256 == 0
            assert memory.estimate(shape, weights, n, kv).total <= budget
            if n < 131072:
                assert memory.estimate(shape, weights, n + 256, kv).total > budget
    assert memory.largest_context(shape, weights, 4 * GIB) is None


@pytest.mark.parametrize("text, expected", [("16G", 16 * GIB), ("16GiB", 16 * GIB), ("16 gb", 16 * GIB),
                                            ("512M", 512 * MIB), ("1.5T", int(1.5 * 1024**4)), ("8", 8 * GIB)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


def test_parse_size_refuses_nonsense():
    with pytest.raises(InputError, match="like 16G"):
        memory.parse_size("lots")


# -- plan on a Llama-3-8B shape: config.json and safetensors headers only ---------------------------------------

LLAMA3_8B_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                    "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def llama3_8b_tensors() -> dict[str, list[int]]:
    tensors = {"model.embed_tokens.weight": [128256, 4096], "model.norm.weight": [4096],
               "lm_head.weight": [128256, 4096]}
    for i in range(32):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": [4096, 4096], p + "self_attn.k_proj.weight": [1024, 4096],
                    p + "self_attn.v_proj.weight": [1024, 4096], p + "self_attn.o_proj.weight": [4096, 4096],
                    p + "mlp.gate_proj.weight": [14336, 4096], p + "mlp.up_proj.weight": [14336, 4096],
                    p + "mlp.down_proj.weight": [4096, 14336], p + "input_layernorm.weight": [4096],
                    p + "post_attention_layernorm.weight": [4096]}
    return tensors


@pytest.fixture(scope="module")
def llama3_8b_dir(tmp_path_factory):
    """config.json and a safetensors file whose header is Llama-3-8B's (bf16); the data is a sparse hole."""
    folder = tmp_path_factory.mktemp("llama3-8b")
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    header, offset = {}, 0
    for name, shape in llama3_8b_tensors().items():
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return folder


def test_plan_figures_for_llama3_8b(llama3_8b_dir):
    facts = plan.model_facts(str(llama3_8b_dir))
    assert facts.n_params == memory.LLAMA3_8B_PARAMS == 8_030_261_248
    assert facts.outtype == "bf16"
    result = plan.make_plan(facts, n_ctx=8192, ram=16 * GIB, throughput={})
    rows = {r.quant: r for r in result.rows}
    assert list(rows)[0] == "bf16"  # the export's base comes first
    q4 = rows["q4_k_m"]
    assert 4.85e9 < q4.file_bytes < 4.95e9  # llama.cpp's Meta-Llama-3-8B Q4_K_M: 4.92 GB
    assert q4.run.kv_cache == GIB and q4.run.n_ctx == 8192
    assert q4.run.total == q4.run.weights + GIB + q4.run.compute + q4.run.output
    assert q4.fits is True and rows["bf16"].fits is False
    assert 16.0e9 < rows["bf16"].file_bytes < 16.2e9
    assert q4.disk_bytes == rows["bf16"].file_bytes + q4.file_bytes  # local: nothing to download
    assert plan.make_plan(facts, n_ctx=8192, ram=4 * GIB, throughput={}).rows[-3].fits is False
    at_32k = plan.make_plan(facts, n_ctx=32768, ram=16 * GIB, throughput={})
    assert {r.quant: r for r in at_32k.rows}["q4_k_m"].run.kv_cache == 4 * GIB


def test_plan_cli_text_and_json(llama3_8b_dir):
    result = CliRunner().invoke(main, ["plan", str(llama3_8b_dir), "--ram", "16G", "--ctx", "32768"])
    assert result.exit_code == 0, result.output
    assert "8.03B parameters" in result.output and "128 KiB per token" in result.output
    assert "q4_k_m" in result.output and "memory by context and KV cache type" in result.output
    as_json = CliRunner().invoke(main, ["plan", str(llama3_8b_dir), "--ram", "16G", "--json", "--q", "q4_k_m"])
    data = json.loads(as_json.output)
    assert [q["quant"] for q in data["quants"]] == ["bf16", "q4_k_m"]
    assert data["kv_bytes_per_token"] == 131072 and data["budget_bytes"] == memory.ram_budget(16 * GIB)


@pytest.mark.parametrize("env, fragment", [({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach"),
                                           ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set")])
def test_plan_offline_fails_fast_with_one_line(env, fragment):
    proc = subprocess.run([sys.executable, "-m", "l3zh_local", "plan", "meta-llama/Meta-Llama-3-8B"],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ") and fragment in proc.stderr


def test_step_times_come_from_recorded_exports(llama3_8b_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("L3ZH_CACHE", str(tmp_path))
    manifest = {"model": {"n_params": 135_000_000}, "source": {"ref": "demo"},
                "steps": {"base:x.f16.gguf": {"seconds": 13.5}, "quant:x.q4_k_m.gguf": {"seconds": 6.75},
                          "imatrix": {"seconds": 27.0}},
                "files": {"x.q4_k_m.gguf": {"verify": {"seconds": 40.5}}}}
    assert set(plan.record_export(manifest)) == {"convert", "quantize", "imatrix", "verify"}
    facts = plan.model_facts(str(llama3_8b_dir))
    result = plan.make_plan(facts)
    # One model size: in proportion to the parameter count.
    assert result.steps["convert"] == pytest.approx(13.5 / 135e6 * facts.n_params, rel=1e-3)
    # On at every size now: it scales with the parameters too (the same default token count).
    assert result.steps["imatrix"] == pytest.approx(27.0 / 135e6 * facts.n_params, rel=1e-3)
    assert result.rows[1].quantize_s == pytest.approx(6.75 / 135e6 * facts.n_params, rel=1e-3)
    text = plan.format_plan(result)
    assert "export steps on this machine: convert 13 min" in text and "demo (0.14B" in text
    # A second size: a start-up cost (here 5 s) plus a cost per parameter.
    bigger = {**manifest, "model": {"n_params": 540_000_000}, "source": {"ref": "bigger"},
              "steps": {"base:y.f16.gguf": {"seconds": 5 + (13.5 - 5) * 4}}, "files": {}}
    assert set(plan.record_export(bigger)) == {"convert"}
    fitted = plan.make_plan(facts).steps["convert"]
    assert fitted == pytest.approx(5 + 8.5 / 135e6 * facts.n_params, rel=1e-3)
    assert len(plan.load_throughput()["convert"]) == 2


def test_export_warns_when_a_quant_will_not_fit(tiny_llama3_dir, monkeypatch):
    import importlib

    from l3zh_local import hfmodel

    export = importlib.import_module("l3zh_local.export")  # the package's `export` is the function
    info = hfmodel.inspect_model(tiny_llama3_dir)
    said: list[str] = []
    monkeypatch.setattr(memory, "total_ram", lambda: 1536 * MIB)
    export._warn_if_too_big(info, [Path("t.q8_0.gguf")], "bf16", [QUANT_TYPES["q8_0"]], 8192, said.append)
    assert said == []
    monkeypatch.setattr(memory, "total_ram", lambda: 1024 * MIB)
    export._warn_if_too_big(info, [Path("t.q8_0.gguf")], "bf16", [QUANT_TYPES["q8_0"]], 8192, said.append)
    assert len(said) == 1 and said[0].startswith("Warning: t.q8_0.gguf needs about") and "num_ctx 8192" in said[0]


def test_doctor_prints_the_table():
    result = CliRunner().invoke(main, ["doctor"])
    assert "to run Llama-3-8B q4_k_m" in result.output, result.output
    assert "KV f16" in result.output and "131072+" in result.output


# -- the estimate against llama.cpp's own allocation ------------------------------------------------------------

MEASURE = r"""
import ctypes, json, re, sys
import llama_cpp
lines = []
cb = llama_cpp.llama_log_callback(lambda level, text, ud: lines.append(text.decode(errors="replace")))
llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
path, n_ctx, kv = sys.argv[1], int(sys.argv[2]), sys.argv[3]
kwargs = {} if kv == "f16" else {"type_k": getattr(llama_cpp, "GGML_TYPE_" + kv.upper()),
                                 "type_v": getattr(llama_cpp, "GGML_TYPE_" + kv.upper()), "flash_attn": True}
llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=1, verbose=True, **kwargs)
found = {}
for kind, mib in re.findall(r"\S+\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB", "".join(lines)):
    found.setdefault(kind, []).append(float(mib))
print(json.dumps(found))
"""


def measured(gguf: Path, n_ctx: int, kv: str) -> dict:
    """llama.cpp's logged buffers for `gguf` at `n_ctx`: model (each buffer), KV, compute, output, in bytes."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(gguf), str(n_ctx), kv], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: [int(v * MIB) for v in vs] for k, vs in found.items()}


@pytest.fixture(scope="module")
def demo_q4_k_m(tmp_path_factory, tools):
    from l3zh_local import demo, hfmodel
    from l3zh_local.convert import convert_to_gguf
    from l3zh_local.quantize import quantize

    out = tmp_path_factory.mktemp("demo-memory")
    convert_to_gguf(hfmodel.inspect_model(demo.demo_model_dir()), out / "demo.f16.gguf", outtype="f16", tools=tools)
    quantize(out / "demo.f16.gguf", out / "demo.q4_k_m.gguf", QUANT_TYPES["q4_k_m"])
    return out / "demo.q4_k_m.gguf"


def check_against_llama_cpp(gguf: Path, n_ctx: int, kv: str) -> None:
    shape, weights = memory.gguf_model(gguf)
    est = memory.estimate(shape, weights, n_ctx, kv)
    got = measured(gguf, n_ctx, kv)
    # The memory-mapped weights are the first model buffer; a repacked copy of some tensors (CPU_REPACK on AVX2)
    # replaces their mapped pages rather than adding to them, so it is not counted.
    mapped, kv_cache, compute, output = got["model"][0], sum(got["KV"]), sum(got["compute"]), sum(got["output"])
    total = mapped + kv_cache + compute + output
    print(f"{gguf.name} n_ctx {n_ctx} {kv}: estimate {est.total / MIB:.1f} MiB, llama.cpp {total / MIB:.1f} MiB "
          f"({est.total / total - 1:+.2%}); KV {est.kv_cache / MIB:.2f}/{kv_cache / MIB:.2f}, compute "
          f"{est.compute / MIB:.2f}/{compute / MIB:.2f}, weights {est.weights / MIB:.2f}/{mapped / MIB:.2f}")
    assert abs(est.kv_cache - kv_cache) <= 0.01 * MIB + 0.001 * kv_cache
    assert abs(est.compute - compute) <= 0.10 * compute
    assert abs(est.weights - mapped) <= 0.01 * mapped
    assert abs(est.total - total) <= 0.10 * total


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx, kv", [(2048, "f16"), (8192, "f16"), (8192, "q8_0"), (32768, "f16"),
                                       (32768, "q4_0")])
def test_estimate_matches_llama_cpp_on_the_demo(demo_q4_k_m, n_ctx, kv):
    check_against_llama_cpp(demo_q4_k_m, n_ctx, kv)


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx, kv", [(4096, "f16"), (12288, "f16"), (32768, "f16"), (16384, "q8_0")])
def test_estimate_matches_llama_cpp_on_the_tiny_fixture(tiny_llama3_gguf, n_ctx, kv):
    check_against_llama_cpp(tiny_llama3_gguf, n_ctx, kv)


def test_readme_memory_table_is_the_estimate():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- memory-table: Llama-3-8B q4_k_m -->")[1].split("<!-- /memory-table -->")[0]
    rows = [line.strip("|").split("|") for line in block.strip().splitlines()[2:]]
    shape = memory.llama3_8b()
    weights = memory.weights_bytes(memory.LLAMA3_8B_PARAMS, QUANT_TYPES["q4_k_m"].bits_per_weight)
    assert [int(r[0]) for r in rows] == list(memory.TABLE_CONTEXTS)
    for row in rows:
        for kv, cell in zip(memory.KV_TYPES, row[1:], strict=True):
            e = memory.estimate(shape, weights, int(row[0]), kv)
            assert cell.strip() == f"{memory.gib(e.kv_cache)} / {memory.gib(e.total)}"


def test_a_throughput_record_this_version_cannot_read_is_dropped_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("L3ZH_CACHE", str(tmp_path))
    path = plan._throughput_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"convert": [[135_000_000, 13.5]], "verify": {"odd": 1},
                                "quantize": [{"n_params": 10, "seconds": 2.0}]}))
    manifest = {"model": {"n_params": 135_000_000}, "steps": {"base:x.f16.gguf": {"seconds": 13.5}}, "files": {}}
    assert set(plan.record_export(manifest)) == {"convert"}  # after every export: must never raise
    kept = json.loads(path.read_text())
    assert kept["convert"][0]["n_params"] == 135_000_000 and kept["quantize"] == [{"n_params": 10, "seconds": 2.0}]
