"""Importance matrices: the streamed computation against transformers with hooks, llama.cpp's file layouts, and
what the quantized GGUFs record."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from l3zh_local import ggufmeta, imatrix
from l3zh_local.cli import main
from l3zh_local.errors import InputError
from l3zh_local.imatrix import ImportanceMatrix
from l3zh_local.quantize import get_quant_type, quantize

STEM = "tiny-llama3-v1-bfloat16"
REL_TOL = 1e-3


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def hooked_imatrix(model_dir: Path, chunks: list[list[int]]) -> tuple[dict, dict]:
    """The baseline: the whole transformers model in fp32, forward pre-hooks on every linear layer."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums, counts = {}, {}

    def record(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    modules = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
    handles = []
    for name, module in model.named_modules():
        parts = name.split(".", 3)  # model.layers.N.rest
        if len(parts) == 4 and parts[1] == "layers" and parts[3] in modules:
            gguf_name = f"blk.{parts[2]}.{modules[parts[3]]}.weight"
            handles.append(module.register_forward_pre_hook(lambda _m, args, n=gguf_name: record(n, args[0])))
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for chunk in chunks:
            hidden = model.model(torch.tensor([chunk])).last_hidden_state
            if not tied:
                record("output.weight", hidden)
    for handle in handles:
        handle.remove()
    return {k: v.numpy() for k, v in sums.items()}, counts


def assert_matches_hooks(model_dir: Path, text: str, max_tokens: int = imatrix.DEFAULT_MAX_TOKENS) -> ImportanceMatrix:
    streamed = imatrix.compute_imatrix(model_dir, text, max_tokens=max_tokens, progress=False)
    sums, counts = hooked_imatrix(model_dir, imatrix.calibration_chunks(model_dir, text, max_tokens=max_tokens))
    assert streamed.counts == counts
    assert sorted(streamed.sums) == sorted(sums)
    worst = max(float(np.max(np.abs(streamed.sums[k] - sums[k]) / np.abs(sums[k]))) for k in sums)
    assert worst <= REL_TOL, worst
    return streamed


@pytest.fixture(scope="module")
def tiny_matrix(tiny_llama3_dir) -> ImportanceMatrix:
    return imatrix.compute_imatrix(tiny_llama3_dir, imatrix.default_calibration_text(), progress=False)


# -- the streamed computation ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_streamed_matches_the_full_model_with_hooks(tiny_llama3_dir):
    text = imatrix.default_calibration_text()
    chunks = imatrix.calibration_chunks(tiny_llama3_dir, text)
    assert len(chunks) >= 2 and all(c[0] == 128000 for c in chunks)  # every chunk starts with BOS
    matrix = assert_matches_hooks(tiny_llama3_dir, text)
    assert len(matrix.sums) == 2 * 7 + 1  # 7 linear layers per block, and output.weight
    assert matrix.chunk_count == len(chunks) and matrix.chunk_size == imatrix.CHUNK_TOKENS
    assert matrix.tokens == sum(map(len, chunks))


def llama31_config(model_dir: Path) -> dict:
    """The tiny fixture's config with Llama-3.1's rope settings, as its config.json writes them (older keys)."""
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("rope_parameters", None)
    config |= {"rope_theta": 500000.0, "max_position_embeddings": 131072,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    return config


@pytest.mark.parametrize("llama31", [False, True])
def test_rotary_tables_match_transformers(tiny_llama3_dir, llama31):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama31_config(tiny_llama3_dir) if llama31 else json.loads((tiny_llama3_dir / "config.json").read_text())
    cos, sin = LlamaRotaryEmbedding(LlamaConfig(**config))(torch.zeros(1, 512, 64), torch.arange(512)[None])
    ours = imatrix._rotary_tables(config, 512)
    # transformers multiplies positions by frequencies in fp32; we do it in fp64: ~3e-5 apart at position 511.
    torch.testing.assert_close(ours[0], cos[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1], sin[0], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_streamed_matches_with_llama31_rope_scaling(tiny_llama3_dir, tmp_path):
    model = tmp_path / "rope-scaled"
    shutil.copytree(tiny_llama3_dir, model)
    (model / "config.json").write_text(json.dumps(llama31_config(tiny_llama3_dir)))
    scaled = assert_matches_hooks(model, imatrix.default_calibration_text())
    plain = imatrix.compute_imatrix(tiny_llama3_dir, imatrix.default_calibration_text(), progress=False)
    name = "blk.1.attn_output.weight"  # downstream of the first layer's attention: the scaling shows there
    assert not np.allclose(scaled.sums[name], plain.sums[name], rtol=1e-4)


@pytest.mark.slow
def test_streamed_matches_on_the_demo_model_with_tied_embeddings():
    from l3zh_local.demo import demo_model_dir

    model = demo_model_dir()
    assert json.loads((model / "config.json").read_text()).get("tie_word_embeddings")
    # 600 tokens (a full chunk and a short one) keep this under a minute on two cores.
    matrix = assert_matches_hooks(model, imatrix.default_calibration_text(), max_tokens=600)
    assert matrix.counts["blk.29.ffn_down.weight"] == 600
    assert "output.weight" not in matrix.sums  # a tied model's GGUF has no output.weight


@pytest.mark.slow
def test_pickle_weights_give_the_same_matrix(tiny_llama3_dir, tiny_matrix, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    model.mkdir()
    for f in tiny_llama3_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, model)
    torch.save(load_file(tiny_llama3_dir / "model.safetensors"), model / "pytorch_model.bin")
    pickled = imatrix.compute_imatrix(model, imatrix.default_calibration_text(), progress=False)
    for name, values in tiny_matrix.sums.items():
        np.testing.assert_allclose(pickled.sums[name], values, rtol=1e-6)


def test_too_short_calibration_text_is_refused(tiny_llama3_dir):
    with pytest.raises(InputError, match="too short"):
        imatrix.compute_imatrix(tiny_llama3_dir, "你好", progress=False)


def test_max_tokens_caps_the_tokens(tiny_llama3_dir):
    chunks = imatrix.calibration_chunks(tiny_llama3_dir, imatrix.default_calibration_text(), max_tokens=600)
    assert [len(c) for c in chunks] == [512, 88]


# -- llama.cpp's files -----------------------------------------------------------------------------------------------

def synthetic_matrix() -> ImportanceMatrix:
    rng = np.random.default_rng(0)
    names = ["blk.0.attn_q.weight", "blk.10.ffn_down.weight", "blk.2.ffn_up.weight", "output.weight"]
    return ImportanceMatrix(sums={n: rng.uniform(1, 100, 32 + i).astype(np.float32) for i, n in enumerate(names)},
                            counts={n: 1536 for n in names}, datasets=["calib.txt"], chunk_count=3, chunk_size=512)


def write_legacy_dat(path: Path, entries: dict[str, tuple[int, np.ndarray]], chunk_count: int | None = None,
                     dataset: str | None = None) -> None:
    """llama.cpp's .dat layout, written by hand: int32 n_entries; per entry int32 name length, the name, int32 ncall,
    int32 nval, nval float32 (mean * ncall); then int32 last chunk and int32 length + dataset name."""
    blob = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        blob += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        blob += np.asarray(values, dtype="<f4").tobytes()
    if chunk_count is not None:
        blob += struct.pack("<i", chunk_count)
        blob += struct.pack("<i", len(dataset.encode())) + dataset.encode()
    path.write_bytes(blob)


def test_gguf_file_has_llama_cpps_layout_and_reads_back(tmp_path):
    import gguf

    matrix = synthetic_matrix()
    path = tmp_path / "m.imatrix.gguf"
    imatrix.save_imatrix(path, matrix)
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == {"general.type": "imatrix", "imatrix.datasets": ["calib.txt"], "imatrix.chunk_count": 3,
                      "imatrix.chunk_size": 512}
    assert reader.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert reader.fields["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    names = sorted(matrix.sums)  # byte order: blk.10 before blk.2, as llama.cpp's std::sort
    assert [t.name for t in reader.tensors] == [f"{n}{s}" for n in names for s in (".in_sum2", ".counts")]
    for t in reader.tensors:
        base = t.name.rsplit(".", 1)[0]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        if t.name.endswith(".in_sum2"):
            assert list(t.shape) == [matrix.sums[base].size, 1]  # ne: columns, one matrix
            np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), matrix.sums[base])  # sums, not means
        else:
            assert list(t.shape) == [1, 1]
            assert float(np.asarray(t.data).reshape(-1)[0]) == 1536.0
    back = imatrix.load_imatrix(path)
    assert back.counts == matrix.counts and back.datasets == ["calib.txt"]
    assert (back.chunk_count, back.chunk_size, back.file_name) == (3, 512, "m.imatrix.gguf")
    for name in names:
        np.testing.assert_array_equal(back.sums[name], matrix.sums[name])
        np.testing.assert_array_equal(back.means()[name], (matrix.sums[name] / 1536).astype(np.float32))


def test_llama_cpps_own_gguf_parser_reads_the_file(tmp_path):
    """libggml (shipped with llama-cpp-python) parses the file: the KV types and tensor order llama.cpp expects."""
    import ctypes

    import llama_cpp

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    for fn, res, args in [("gguf_find_key", ctypes.c_int64, [ctypes.c_char_p]),
                          ("gguf_get_kv_type", ctypes.c_int, [ctypes.c_int64]),
                          ("gguf_get_arr_type", ctypes.c_int, [ctypes.c_int64]),
                          ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_int64]),
                          ("gguf_get_n_tensors", ctypes.c_int64, []),
                          ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_int64]),
                          ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_int64]),
                          ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_int64])]:
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = [ctypes.c_void_p, *args]
    lib.gguf_free.argtypes = [ctypes.c_void_p]

    matrix = synthetic_matrix()
    path = tmp_path / "m.imatrix.gguf"
    imatrix.save_imatrix(path, matrix)
    ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(True, None))
    assert ctx
    try:
        string, array, uint32 = 8, 9, 4  # enum gguf_type
        assert lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.type")) == b"imatrix"
        datasets = lib.gguf_find_key(ctx, b"imatrix.datasets")
        assert (lib.gguf_get_kv_type(ctx, datasets), lib.gguf_get_arr_type(ctx, datasets)) == (array, string)
        for key in (b"imatrix.chunk_count", b"imatrix.chunk_size"):
            assert lib.gguf_get_kv_type(ctx, lib.gguf_find_key(ctx, key)) == uint32
        assert lib.gguf_find_key(ctx, b"general.architecture") == -1
        tensors = [(lib.gguf_get_tensor_name(ctx, i).decode(), lib.gguf_get_tensor_type(ctx, i),
                    lib.gguf_get_tensor_size(ctx, i)) for i in range(lib.gguf_get_n_tensors(ctx))]
    finally:
        lib.gguf_free(ctx)
    f32 = 0
    assert tensors == [(f"{n}{suffix}", f32, 4 * (matrix.sums[n].size if suffix == ".in_sum2" else 1))
                       for n in sorted(matrix.sums) for suffix in (".in_sum2", ".counts")]


def test_legacy_dat_reads_as_means(tmp_path):
    matrix = synthetic_matrix()
    means = matrix.means()
    path = tmp_path / "old.dat"
    write_legacy_dat(path, {n: (3, means[n] * 3) for n in means}, chunk_count=3, dataset="calib.txt")
    back = imatrix.load_imatrix(path)
    assert back.datasets == ["calib.txt"] and back.chunk_count == 3
    for name, values in means.items():
        np.testing.assert_allclose(back.means()[name], values, rtol=1e-6)
    write_legacy_dat(path, {n: (3, means[n] * 3) for n in means})  # the trailer is optional
    assert imatrix.load_imatrix(path).chunk_count == 0


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "damaged GGUF"),
    (lambda p: p.write_text("这不是重要性矩阵\n" * 20), "neither an importance matrix GGUF nor a legacy .dat"),
    (lambda p: p.write_bytes(b""), "neither"),
    (lambda p: p.write_bytes(struct.pack("<ii", 1, 12) + b"blk.0"), "ends too early"),
])
def test_damaged_files_are_refused_with_one_message(tmp_path, damage, fragment):
    path = tmp_path / "m.imatrix.gguf"
    imatrix.save_imatrix(path, synthetic_matrix())
    damage(path)
    with pytest.raises(InputError, match=fragment):
        imatrix.load_imatrix(path)


def test_model_gguf_is_not_an_importance_matrix(tiny_llama3_gguf):
    with pytest.raises(InputError, match="not an importance matrix"):
        imatrix.load_imatrix(tiny_llama3_gguf)


# -- export --imatrix FILE, and what the quants record -------------------------------------------------------------

@pytest.fixture(scope="module")
def computed_export(tiny_llama3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("computed")
    result = run_cli("export", str(tiny_llama3_dir), "--q", "q4_k_m", "--no-verify", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_export_writes_the_gguf_matrix_and_the_quant_records_it(computed_export):
    out = computed_export
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["files"][f"{STEM}.imatrix.gguf"]
    matrix = imatrix.load_imatrix(out / f"{STEM}.imatrix.gguf")
    assert entry["tensors"] == len(matrix.sums) == 15
    assert entry["calibration"]["source"] == "packaged"
    assert entry["calibration"]["tokens"] == matrix.tokens > 1000
    assert len(entry["calibration"]["sha256"]) == 64
    assert not list(out.glob("*.safetensors"))
    meta = ggufmeta.read_metadata(out / f"{STEM}.q4_k_m.gguf")
    assert meta["quantize.imatrix.file"] == f"{STEM}.imatrix.gguf"
    assert meta["quantize.imatrix.dataset"] == imatrix.PACKAGED_CALIBRATION
    assert meta["quantize.imatrix.entries_count"] == 15
    assert meta["quantize.imatrix.chunks_count"] == matrix.chunk_count


@pytest.mark.slow
def test_legacy_dat_and_gguf_give_identical_quants(computed_export, tmp_path):
    from l3zh_local.files import sha256_file

    matrix = imatrix.load_imatrix(computed_export / f"{STEM}.imatrix.gguf")
    means = matrix.means()
    # The same name in both forms, so that the quants' quantize.imatrix.file agree and whole files can be compared.
    (tmp_path / "gguf").mkdir()
    (tmp_path / "dat").mkdir()
    shutil.copy(computed_export / f"{STEM}.imatrix.gguf", tmp_path / "gguf" / "m.imatrix")
    # ncall 4: a power of two, so mean * 4 / 4 is the mean to the last bit.
    write_legacy_dat(tmp_path / "dat" / "m.imatrix", {n: (4, means[n] * np.float32(4)) for n in means},
                     chunk_count=matrix.chunk_count, dataset=matrix.datasets[0])
    quants = {}
    for label in ("dat", "gguf"):
        out = tmp_path / f"out-{label}"
        shutil.copytree(computed_export, out)  # the bf16 GGUF is reused; the quant is made again
        (out / f"{STEM}.q4_k_m.gguf").unlink()
        source = tmp_path / label / "m.imatrix"
        result = run_cli("export", str(json.loads((out / "manifest.json").read_text())["source"]["path"]),
                         "--q", "q4_k_m", "--imatrix", str(source), "--no-verify", "--out", str(out))
        assert result.exit_code == 0, result.output
        assert "Computing an importance matrix" not in result.output and f"Reusing {STEM}.bf16.gguf" in result.output
        quants[label] = out / f"{STEM}.q4_k_m.gguf"
        steps = json.loads((out / "manifest.json").read_text())["steps"]
        assert steps["imatrix"]["file"] == str(source) and len(steps["imatrix"]["sha256"]) == 64
    assert sha256_file(quants["dat"]) == sha256_file(quants["gguf"])
    meta = ggufmeta.read_metadata(quants["dat"])
    assert meta["quantize.imatrix.file"] == "m.imatrix"
    assert meta["quantize.imatrix.dataset"] == imatrix.PACKAGED_CALIBRATION
    assert meta["quantize.imatrix.entries_count"] == 15
    assert meta["quantize.imatrix.chunks_count"] == matrix.chunk_count
    # Only the file name differs from the quant of the export that computed the matrix: the tensor data at the end
    # (the last layers and the output matrix) is the same.
    tail = (computed_export / f"{STEM}.q4_k_m.gguf").read_bytes()[-4_000_000:]
    assert quants["gguf"].read_bytes()[-4_000_000:] == tail


@pytest.mark.slow
def test_iq_quant_with_the_streamed_matrix(tiny_llama3_gguf, tiny_matrix, tmp_path):
    out = tmp_path / "tiny.iq3_xxs.gguf"
    quantize(tiny_llama3_gguf, out, get_quant_type("iq3_xxs", have_imatrix=True), imatrix=tiny_matrix)
    meta = ggufmeta.read_metadata(out)
    assert ggufmeta.file_type_name(meta) == "iq3_xxs"
    assert "IQ3_XXS" in meta["l3zh.tensor_types"]
    assert meta["quantize.imatrix.entries_count"] == 15
    assert "quantize.imatrix.file" not in meta  # computed in memory, never saved: no file to name


def _matrix_for(config: dict, **changes) -> ImportanceMatrix:
    names = imatrix.layer_tensor_names(config)
    sums = {n: np.ones(cols, dtype=np.float32) for n, cols in names.items()}
    for name, value in changes.items():
        if value is None:
            sums.pop(name.replace("__", "."))
        else:
            sums[name.replace("__", ".")] = value
    return ImportanceMatrix(sums=sums, counts=dict.fromkeys(sums, 512), datasets=["x"], chunk_count=1,
                            chunk_size=512)


@pytest.mark.parametrize("changes, fragment", [
    ({"blk__7__attn_q__weight": np.ones(256, dtype=np.float32)}, "blk.7.attn_q.weight, which this model does not"),
    ({"blk__0__ffn_down__weight": np.ones(256, dtype=np.float32)}, "has 256 columns, this model's has 512"),
    ({"blk__1__ffn_up__weight": None}, "no entry for blk.1.ffn_up.weight"),
])
def test_export_refuses_a_matrix_for_another_model(tiny_llama3_dir, tmp_path, changes, fragment):
    config = json.loads((tiny_llama3_dir / "config.json").read_text())
    path = tmp_path / "other.imatrix.gguf"
    imatrix.save_imatrix(path, _matrix_for(config, **changes))
    out = tmp_path / "o"
    assert_one_line_error(run_cli("export", str(tiny_llama3_dir), "--q", "q4_k_m", "--imatrix", str(path),
                                  "--out", str(out)), fragment, "another model")
    assert not list(out.glob("*.gguf")) if out.exists() else True


@pytest.mark.parametrize("content, fragment", [
    (b"GGUF\x03\x00\x00\x00garbage", "damaged GGUF"),
    (b"\x00\x01", "neither an importance matrix GGUF nor a legacy .dat"),
])
def test_export_refuses_a_damaged_matrix_file(tiny_llama3_dir, tmp_path, content, fragment):
    path = tmp_path / "bad.imatrix"
    path.write_bytes(content)
    assert_one_line_error(run_cli("export", str(tiny_llama3_dir), "--imatrix", str(path), "--out", str(tmp_path / "o")),
                          fragment)


def test_export_refuses_a_missing_matrix_file(tiny_llama3_dir, tmp_path):
    assert_one_line_error(run_cli("export", str(tiny_llama3_dir), "--imatrix", str(tmp_path / "nope.gguf"),
                                  "--out", str(tmp_path / "o")), "cannot read the importance matrix")


def test_no_imatrix_contradicts_a_matrix_file(tiny_llama3_dir, tmp_path):
    assert_one_line_error(run_cli("export", str(tiny_llama3_dir), "--no-imatrix", "--imatrix", "x.gguf",
                                  "--out", str(tmp_path / "o")), "--no-imatrix contradicts")
