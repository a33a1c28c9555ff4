"""verify_gguf on real GGUFs of the tiny Llama-3 fixture: good exports pass, each kind of damage fails its check."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import pytest

from l3zh_local import hfmodel
from l3zh_local.convert import TokenizerOverrides, convert_to_gguf
from l3zh_local.errors import InputError
from l3zh_local.templates.registry import META_LLAMA3_TEMPLATE
from l3zh_local.verify import FAIL, PASS, WARN, QualityThreshold, default_threshold, verify_gguf
from l3zh_local.verify.thresholds import UNTRAINED_KLD_FACTOR

pytestmark = pytest.mark.slow  # every test here runs a model

EOT = "<|eot_id|>"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STATIC = ("tokenizer", "template", "eos")


def quantize(src: Path, dst: Path, qtype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def linked_copy(src: Path, dst: Path, *, except_: tuple[str, ...]) -> Path:
    """`dst` with every file of `src` symlinked, except those the caller will write."""
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name not in except_:
            os.symlink(entry.resolve(), dst / entry.name)
    return dst


def convert(model_dir: Path, out: Path, **overrides) -> Path:
    convert_to_gguf(hfmodel.inspect_model(model_dir), out, overrides=TokenizerOverrides(**overrides))
    return out


def verify(gguf, ref, **kwargs):
    kwargs.setdefault("expected_template", META_LLAMA3_TEMPLATE)
    kwargs.setdefault("expected_eos", EOT)
    kwargs.setdefault("max_eval_tokens", 300)  # one context of each language: enough to see damage, quick
    return verify_gguf(gguf, ref=ref, **kwargs)


def only_failure(report, name):
    """The report failed, on check `name` only, and the table names it."""
    assert not report.passed
    assert [c.name for c in report.failures()] == [name], report.table()
    assert f"FAILED: {name}" in report.table()
    return report.check(name)


@pytest.fixture(scope="module")
def tiny_q8(tiny_llama3_gguf, tmp_path_factory):
    return quantize(tiny_llama3_gguf, tmp_path_factory.mktemp("q8") / "tiny.q8_0.gguf", "q8_0")


# -- good exports -------------------------------------------------------------------------------------------------


def test_good_bf16_export_passes_every_check(tiny_llama3_gguf, tiny_llama3_dir):
    report = verify(tiny_llama3_gguf, tiny_llama3_dir)
    assert report.passed, report.table()
    assert [c.name for c in report.checks] == ["tokenizer", "template", "eos", "quality", "stop"]
    assert all(c.status == PASS for c in report.checks)
    assert report.quant_type == "bf16"  # read from the GGUF's file type
    quality = report.check("quality").figures
    assert set(quality["languages"]) == {"zh", "en"}
    for figures in quality["languages"].values():
        assert figures["positions"] > 250
        assert figures["kld_mean"] < 1e-3
    # The random fixture cannot stop by itself: the report says the stop was forced, and why.
    assert "untrained" in report.check("stop").message and report.check("stop").figures["mode"] == "forced"
    # The report serialises for the manifest.
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["passed"] is True and as_dict["checks"][3]["name"] == "quality"


def test_good_q8_0_export_passes_against_hf_and_against_16bit_gguf(tiny_q8, tiny_llama3_dir, tiny_llama3_gguf):
    against_hf = verify(tiny_q8, tiny_llama3_dir, checks=("tokenizer", "quality"))
    assert against_hf.passed, against_hf.table()
    assert against_hf.quant_type == "q8_0"
    against_gguf = verify(tiny_q8, tiny_llama3_gguf, checks=("tokenizer", "quality"))
    assert against_gguf.passed, against_gguf.table()
    kld_hf = against_hf.check("quality").figures["languages"]["zh"]["kld_mean"]
    kld_gguf = against_gguf.check("quality").figures["languages"]["zh"]["kld_mean"]
    # q8_0 loses something measurable, and the bf16 GGUF is numerically the HF model: both references agree.
    assert 1e-5 < kld_gguf < default_threshold("q8_0").max_kld
    assert kld_hf == pytest.approx(kld_gguf, rel=0.2)


# -- broken exports fail, naming the check ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chatml_gguf(tiny_llama3_dir, tmp_path_factory):
    """The tiny model exported with ChatML instead of its Llama-3 template."""
    out = tmp_path_factory.mktemp("chatml") / "chatml.gguf"
    return convert(tiny_llama3_dir, out, chat_template=CHATML, eos_token=EOT)


def test_swapped_template_fails_template_check(chatml_gguf, tiny_llama3_dir):
    check = only_failure(verify(chatml_gguf, tiny_llama3_dir, checks=STATIC), "template")
    assert "differs from the given template at token 0" in check.message


def test_verify_command_exit_status(chatml_gguf, tiny_llama3_gguf, tiny_llama3_dir):
    from click.testing import CliRunner

    from l3zh_local.cli import main

    runner = CliRunner()
    good = runner.invoke(main, ["verify", str(tiny_llama3_gguf), "--ref", str(tiny_llama3_dir),
                                "--template", "llama3", "--checks", "tokenizer,eos"])
    assert good.exit_code == 0, good.output
    assert "verify PASSED" in good.output
    bad = runner.invoke(main, ["verify", str(chatml_gguf), "--template", "llama3", "--checks", "template,eos",
                               "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    assert report["passed"] is False and report["checks"][0]["status"] == FAIL


def test_wrong_eos_fails_eos_check(tiny_llama3_dir, tmp_path):
    gguf = convert(tiny_llama3_dir, tmp_path / "eos.gguf", eos_token="<|end_of_text|>")
    check = only_failure(verify(gguf, tiny_llama3_dir, checks=STATIC), "eos")
    assert "EOS is 128001" in check.message and "expected 128009" in check.message
    # Told nothing but the reference: its template (Meta's, the llama3 family) expects <|eot_id|>.
    report = verify_gguf(gguf, ref=tiny_llama3_dir, checks=STATIC)
    assert "EOS is 128001" in only_failure(report, "eos").message
    # With no reference at all, the template alone shows the mistake: turns end with <|eot_id|>, EOS is another.
    report = verify_gguf(gguf, checks=STATIC)
    assert "the template ends an assistant turn with 128009" in only_failure(report, "eos").message


def test_altered_tokenizer_fails_tokenizer_check(tiny_llama3_dir, tmp_path):
    # Drop the BPE merge that makes 道 one token: the GGUF then splits it in two, the HF tokenizer does not.
    altered = linked_copy(tiny_llama3_dir, tmp_path / "altered", except_=("tokenizer.json",))
    tokenizer = json.loads((tiny_llama3_dir / "tokenizer.json").read_text(encoding="utf-8"))
    merges = tokenizer["model"]["merges"]
    tokenizer["model"]["merges"] = [m for m in merges if "".join(m) != "éģĵ"]
    assert len(tokenizer["model"]["merges"]) == len(merges) - 1
    (altered / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    gguf = convert(altered, tmp_path / "altered.gguf")
    check = only_failure(verify(gguf, tiny_llama3_dir, checks=STATIC), "tokenizer")
    assert check.figures["mismatches"] > 0 and "classical" in check.message


def test_noised_weights_fail_quality_check(tiny_llama3_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    damaged = linked_copy(tiny_llama3_dir, tmp_path / "damaged", except_=("model.safetensors",))
    weights = load_file(tiny_llama3_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name, tensor in weights.items():
        if name.endswith("proj.weight"):
            noise = torch.randn(tensor.shape, generator=generator) * tensor.float().std() * 0.3
            weights[name] = (tensor.float() + noise).to(tensor.dtype)
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    gguf = convert(damaged, tmp_path / "damaged.gguf")
    check = only_failure(verify(gguf, tiny_llama3_dir, checks=STATIC + ("quality",)), "quality")
    assert "mean KLD" in check.message and "> 0.001" in check.message


def test_q2_k_fails_a_q4_k_m_threshold(tiny_llama3_gguf, tiny_llama3_dir, tmp_path):
    q2 = quantize(tiny_llama3_gguf, tmp_path / "tiny.q2_k.gguf", "q2_k")
    report = verify(q2, tiny_llama3_gguf, quant_type="q4_k_m", checks=("quality",))
    check = only_failure(report, "quality")
    # The fixture's weights are random: the limit is the q4_k_m one widened for untrained models.
    limit = round(default_threshold("q4_k_m").max_kld * UNTRAINED_KLD_FACTOR, 6)
    assert "zh mean KLD" in check.message and f"> {limit}" in check.message
    # Thresholds given directly decide too.
    tight = QualityThreshold(max_kld=0.05, min_same_top=0.0, max_ppl_ratio=10.0)
    assert not verify(q2, tiny_llama3_gguf, thresholds=tight, checks=("quality",)).passed


def test_truncated_gguf_is_a_failed_check_not_a_crash(tiny_llama3_gguf, tiny_llama3_dir, tmp_path):
    broken = tmp_path / "truncated.gguf"
    with open(tiny_llama3_gguf, "rb") as src:
        broken.write_bytes(src.read(3_000_000))
    report = verify(broken, tiny_llama3_dir)
    assert not report.passed
    assert {c.name for c in report.failures()} == {"tokenizer", "template", "eos", "quality", "stop"}
    assert "could not be loaded" in report.check("tokenizer").message


def test_bad_arguments_are_input_errors(tiny_llama3_gguf, tmp_path):
    with pytest.raises(InputError, match="no GGUF file"):
        verify_gguf(tmp_path / "missing.gguf")
    with pytest.raises(InputError, match="unknown check"):
        verify_gguf(tiny_llama3_gguf, checks=("speed",))
    with pytest.raises(InputError, match="no quality threshold"):
        default_threshold("q9_z")


def test_hf_reference_too_big_for_memory_points_to_the_gguf(tiny_llama3_gguf, tiny_llama3_dir, monkeypatch):
    from l3zh_local.verify import checks

    monkeypatch.setattr(checks, "available_memory", lambda: 100 * 2**20)  # 100 MiB free
    with pytest.raises(InputError, match="pass its 16-bit GGUF as --ref"):
        verify_gguf(tiny_llama3_gguf, ref=tiny_llama3_dir, checks=("quality",))


# -- the real demo model: the stop check is natural there -----------------------------------------------------------


@pytest.fixture(scope="module")
def demo_f16(tmp_path_factory):
    from l3zh_local.demo import demo_model_dir

    model_dir = demo_model_dir()
    out = tmp_path_factory.mktemp("demo") / "demo.f16.gguf"
    convert_to_gguf(hfmodel.inspect_model(model_dir), out, outtype="f16")
    return model_dir, out


def test_demo_model_stops_by_itself(demo_f16):
    model_dir, gguf = demo_f16
    report = verify_gguf(gguf, ref=model_dir, expected_eos="<|im_end|>", checks=("eos", "stop"))
    assert report.passed, report.table()
    stop = report.check("stop")
    assert stop.figures["mode"] == "natural" and "forced" not in stop.message
    assert stop.figures["stop_id"] == 2 and "Paris" in stop.figures["text"]


def rewrite_gguf(src: Path, dst: Path, changes: dict) -> Path:
    """Copy a GGUF with gguf-py, replacing the metadata values named in `changes`."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by GGUFWriter itself
        sub_type = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, changes.get(name, f.contents()), f.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_native_abort_is_a_failed_check_naming_the_signal(tiny_q8, tmp_path):
    # A byte-level BPE vocabulary declared as SentencePiece ("llama"): llama.cpp looks for <0x..> byte tokens
    # that are not there and aborts the process (std::out_of_range, SIGABRT).
    broken = rewrite_gguf(tiny_q8, tmp_path / "spm.gguf", {"tokenizer.ggml.model": "llama"})
    report = verify_gguf(broken, checks=("tokenizer", "template", "eos", "stop"))
    assert {c.name for c in report.failures()} == {"tokenizer", "template", "eos", "stop"}
    assert "SIGABRT" in report.check("tokenizer").message


# -- what is expected comes from the reference when nothing else is given ---------------------------------------

CONTENT_ONLY = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_reference_gives_the_expected_template_and_eos(tiny_q8, tiny_llama3_dir, tiny_llama3_gguf, tmp_path):
    # The good export carries the reference's own template (Meta's): it passes against the HF folder alone.
    good = verify_gguf(tiny_q8, ref=tiny_llama3_dir, checks=STATIC)
    assert good.passed and good.check("template").status == PASS, good.table()
    assert "family llama3" in good.check("template").message
    # The template replaced after conversion: caught with an HF reference and with a 16-bit GGUF reference.
    swapped = rewrite_gguf(tiny_q8, tmp_path / "swapped.gguf", {"tokenizer.chat_template": CONTENT_ONLY})
    for ref in (tiny_llama3_dir, tiny_llama3_gguf):
        check = only_failure(verify_gguf(swapped, ref=ref, checks=STATIC), "template")
        assert "differs from the reference" in check.message
    # With nothing to compare against, the table says so as a warning, not as a plain pass.
    alone = verify_gguf(swapped, checks=("template",))
    assert alone.check("template").status == WARN and "WARN" in alone.table()
    # The EOS set to <|end_of_text|> where the reference ends turns with <|eot_id|>: caught the same way.
    wrong_eos = rewrite_gguf(tiny_q8, tmp_path / "eos.gguf", {"tokenizer.ggml.eos_token_id": 128001})
    for ref in (tiny_llama3_dir, tiny_llama3_gguf):
        report = verify_gguf(wrong_eos, ref=ref, checks=("eos",))
        assert report.check("eos").status == FAIL and "EOS is 128001" in report.check("eos").message
