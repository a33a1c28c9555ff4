"""Long context: export --ctx/--rope-theta (the seed's trick) and Llama-3.1's native scaling, checked at positions
past the trained 8192 against the HF model under the same config; chat's context, KV cache type and trimming."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

from l3zh_local import context, ggufmeta, hfmodel
from l3zh_local.cli import main
from l3zh_local.context import ContextOverride, plan_context
from l3zh_local.convert import convert_to_gguf
from l3zh_local.errors import InputError
from l3zh_local.verify import longctx
from l3zh_local.verify.thresholds import default_threshold

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), LANG="C.UTF-8", PYTHONIOENCODING="utf-8")
LLAMA3_CONFIG = {"max_position_embeddings": 8192, "rope_theta": 500000.0}
LLAMA3_CONFIG_V5 = {"max_position_embeddings": 8192, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
LLAMA31_CONFIG = {"max_position_embeddings": 131072, "rope_theta": 500000.0,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
LONG_TOKENS = 12288 - 64  # at least 12K tokens, inside a 12288-token context
F16_LIMIT = default_threshold("f16").max_kld


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# -- what --ctx / --rope-theta mean, per config layout (pure) -----------------------------------------------------

@pytest.mark.parametrize("config", [LLAMA3_CONFIG, LLAMA3_CONFIG_V5])
def test_seed_trick_is_staged_in_either_config_layout(config):
    plan = plan_context(config, 32768, 1e6)
    assert plan.override == ContextOverride(32768, 1e6) and plan.gguf_context == plan.deploy_ctx == 32768
    staged = context.apply_override(config, plan.override)
    assert staged["max_position_embeddings"] == 32768
    assert context.rope_info(staged).rope_theta == 1e6
    assert config["max_position_embeddings"] == 8192  # the caller's dict is untouched
    assert context.rope_info(config).rope_theta == 5e5


def test_ctx_past_training_without_a_new_base_is_noted():
    plan = plan_context(LLAMA3_CONFIG, 32768)
    assert plan.override == ContextOverride(32768, None)
    assert any("--rope-theta 1000000" in note for note in plan.notes)
    assert plan_context(LLAMA3_CONFIG, 4096).notes == ()


def test_rope_scaling_models_refuse_a_new_base_and_only_deploy_a_context():
    with pytest.raises(InputError, match="rope_scaling of type llama3"):
        plan_context(LLAMA31_CONFIG, None, 1e6)
    with pytest.raises(InputError, match="beyond this model's 131072"):
        plan_context(LLAMA31_CONFIG, 262144)
    plan = plan_context(LLAMA31_CONFIG, 32768)
    assert plan.override.empty and plan.gguf_context == 131072 and plan.deploy_ctx == 32768


def test_bad_values_are_refused():
    with pytest.raises(InputError, match="too small"):
        plan_context(LLAMA3_CONFIG, 100)
    with pytest.raises(InputError, match="not a usable RoPE base"):
        plan_context(LLAMA3_CONFIG, None, -1.0)


def test_hf_reference_follows_the_gguf():
    meta = {"general.architecture": "llama", "llama.context_length": "32768", "llama.rope.freq_base": "1000000.0"}
    assert context.override_for_gguf(LLAMA3_CONFIG_V5, meta) == ContextOverride(32768, 1e6)
    same = {"general.architecture": "llama", "llama.context_length": 8192, "llama.rope.freq_base": 500000.0}
    assert context.override_for_gguf(LLAMA3_CONFIG, same).empty


def test_recipes_take_ctx_and_rope_theta(tmp_path, monkeypatch):
    from l3zh_local import recipes

    (tmp_path / "long.toml").write_text('name = "long"\nfamily = "llama3"\ncontext_length = 8192\nnum_ctx = 8192\n'
                                        'ctx = 32768\nrope_theta = 1000000\n', encoding="utf-8")
    monkeypatch.setenv(recipes.RECIPES_ENV, str(tmp_path))
    recipe = recipes.load_recipe("long")
    assert (recipe.ctx, recipe.rope_theta) == (32768, 1e6)


# -- export writes it everywhere ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_export(tiny_llama3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("long-export")
    result = CliRunner().invoke(main, ["export", str(tiny_llama3_dir), "--q", "q8_0", "--ctx", "32768",
                                       "--rope-theta", "1000000", "--out", str(out)])
    return out, result


@pytest.mark.slow
def test_export_ctx_and_rope_theta_reach_every_file(long_export):
    out, result = long_export
    # Verified against the HF model given the same config change: quality passes at the new base.
    assert result.exit_code == 0, result.output
    assert "Context: the GGUF declares 32768 positions, RoPE base 1e+06" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["ctx"] == 32768 and manifest["settings"]["rope_theta"] == 1e6
    assert manifest["settings"]["num_ctx"] == manifest["settings"]["gguf_context_length"] == 32768
    assert manifest["model"]["context_length"] == 8192 and manifest["model"]["rope_theta"] == 5e5
    ggufs = sorted(out.glob("*.gguf"))
    assert [p.name.split(".")[1] for p in ggufs] == ["bf16", "q8_0"]
    for gguf in ggufs:
        meta = ggufmeta.read_metadata(gguf)
        assert meta["llama.context_length"] == 32768
        assert meta["llama.rope.freq_base"] == pytest.approx(1e6)
        entry = manifest["files"][gguf.name]
        assert entry["context_length"] == 32768 and entry["rope_freq_base"] == pytest.approx(1e6)
        assert entry["verify"]["passed"], entry["verify"]
        stem = gguf.name[:-len(".gguf")]
        assert "PARAMETER num_ctx 32768\n" in (out / f"{stem}.Modelfile").read_text()
        preset = json.loads((out / f"{stem}.preset.json").read_text())
        assert {"key": "llm.load.contextLength", "value": 32768} in preset["load"]["fields"]
        assert json.loads((out / f"{stem}.legacy.preset.json").read_text())["load_params"]["n_ctx"] == 32768
    # The user's files are as they were.
    config = json.loads((Path(manifest["source"]["path"]) / "config.json").read_text())
    assert config["max_position_embeddings"] == 8192 and context.rope_info(config).rope_theta == 5e5


@pytest.mark.slow
def test_llama31_refuses_rope_theta_and_deploys_its_ctx(tiny_llama31_dir, tmp_path):
    one_line_error(CliRunner().invoke(main, ["export", str(tiny_llama31_dir), "--rope-theta", "1000000",
                                             "--out", str(tmp_path)]), "--rope-theta cannot be used", "llama3")
    one_line_error(CliRunner().invoke(main, ["export", str(tiny_llama31_dir), "--ctx", "262144",
                                             "--out", str(tmp_path)]), "beyond this model's 131072")
    # Refused before any work: nothing in the folder but the export's lock file.
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".l3zh-export.lock")] == []
    result = CliRunner().invoke(main, ["export", str(tiny_llama31_dir), "--q", "q8_0", "--ctx", "32768",
                                       "--no-verify", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    gguf = next(tmp_path.glob("*.q8_0.gguf"))
    assert ggufmeta.read_metadata(gguf)["llama.context_length"] == 131072  # native, untouched
    assert "PARAMETER num_ctx 32768\n" in gguf.with_name(gguf.name.replace(".gguf", ".Modelfile")).read_text()


# -- long positions: GGUF against HF with the same config ----------------------------------------------------------

@pytest.mark.slow
def test_rope_theta_gguf_matches_hf_past_8k(tiny_llama3_dir, tools, tmp_path):
    gguf = tmp_path / "tiny-32k.f16.gguf"
    convert_to_gguf(hfmodel.inspect_model(tiny_llama3_dir), gguf, outtype="f16",
                    context=ContextOverride(32768, 1e6), tools=tools)
    runner = longctx.GgufRunner(str(gguf), 12288, threads=2)
    ids = longctx.random_ids(LONG_TOKENS, bos=128000)
    hf = longctx.HfRunner(str(tiny_llama3_dir), runner.meta, threads=2)
    assert hf.override == ContextOverride(32768, 1e6)
    found = longctx.long_parity(runner, hf, ids, 8192, most=1024)
    assert found["positions"] >= 1000 and found["start"] == 8192
    assert found["kld_mean"] < F16_LIMIT, found
    assert found["same_top"] > 0.98, found
    # The comparison can tell: the HF model at its own base (500000) is far from this GGUF.
    stock = longctx.HfRunner(str(tiny_llama3_dir), {"general.architecture": "llama"}, threads=2)
    assert stock.override.empty
    wrong = longctx.long_parity(runner, stock, ids, 8192, most=128)
    assert wrong["kld_mean"] > 50 * F16_LIMIT, wrong


@pytest.mark.slow
def test_llama31_rope_freqs_gguf_matches_hf_past_8k(tiny_llama31_dir, tools, tmp_path):
    import gguf as gguf_py

    gguf = tmp_path / "tiny31.f16.gguf"
    convert_to_gguf(hfmodel.inspect_model(tiny_llama31_dir), gguf, outtype="f16", tools=tools)
    names = {t.name for t in gguf_py.GGUFReader(gguf).tensors}
    assert "rope_freqs.weight" in names  # llama.cpp's form of rope_scaling llama3
    runner = longctx.GgufRunner(str(gguf), 12288, threads=2)
    assert int(runner.meta["llama.context_length"]) == 131072
    hf = longctx.HfRunner(str(tiny_llama31_dir), runner.meta, threads=2)
    assert hf.override.empty  # the GGUF says what config.json says
    found = longctx.long_parity(runner, hf, longctx.random_ids(LONG_TOKENS, seed=1, bos=128000), 8192, most=1024)
    assert found["kld_mean"] < F16_LIMIT, found
    assert found["same_top"] > 0.98, found


@pytest.mark.slow
def test_verify_long_reports_parity_and_pass_key(long_export, tiny_llama3_dir):
    out, _ = long_export
    gguf = next(out.glob("*.q8_0.gguf"))
    result = CliRunner().invoke(main, ["verify", str(gguf), "--ref", str(tiny_llama3_dir), "--checks", "eos",
                                       "--long", "4096", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    long = next(c for c in report["checks"] if c["name"] == "long")
    assert long["status"] == "pass", long
    figures = long["figures"]
    assert figures["override"] == {"ctx": 32768, "rope_theta": 1e6}
    assert figures["parity"]["start"] == 2048 and figures["parity"]["kld_mean"] < figures["max_kld"]
    # A random model finds no pass key, and neither does its reference: reported, not failed.
    assert figures["passkey_gguf"]["retrieved"] is False and figures["passkey_ref"]["retrieved"] is False
    assert "reference missed it too" in long["message"]


# -- chat: context, KV cache type, prompts longer than the context --------------------------------------------------

def spawn_chat(gguf: Path, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "l3zh_local", "chat", str(gguf), "--max-tokens", "8", *args],
                          encoding="utf-8", timeout=180, env=ENV, cwd=str(ROOT))
    child.expect_exact(">>> ")
    return child


@pytest.mark.slow
def test_chat_drops_old_turns_says_so_and_survives_a_too_long_message(tiny_llama3_gguf):
    child = spawn_chat(tiny_llama3_gguf, "--ctx", "128", "--system", "你是一个助手。")
    said = []
    for i in range(6):
        child.sendline(f"第{i}个问题：请详细解释一下量化是什么意思。")
        child.expect_exact(">>> ")
        said.append(child.before)
    assert any("oldest messages dropped to fit the context of 128 tokens; the system prompt is kept" in s
               for s in said), said
    child.sendline("长" * 400)  # one message longer than the whole context
    child.expect_exact(">>> ")
    assert "the message is too long" in child.before and "the conversation so far is kept" in child.before
    child.sendline("你好")
    child.expect_exact(">>> ")
    assert "too long" not in child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)


@pytest.mark.slow
@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_chat_with_a_quantized_kv_cache(tiny_llama3_gguf, kv_type):
    from l3zh_local.chat import load_model

    llm = load_model(tiny_llama3_gguf, n_ctx=1024, kv_type=kv_type)
    assert llm.context_params.flash_attn_type == 1  # llama.cpp reads a quantized V cache only this way
    ids = llm.tokenize("你好，世界".encode(), add_bos=True)
    assert len(list(itertools.islice(llm.generate(ids, temp=0.0), 4))) == 4


def test_kv_type_refusal_is_one_clear_line(tmp_path, monkeypatch):
    import importlib

    import llama_cpp

    chat = importlib.import_module("l3zh_local.chat")  # the package's `chat` is the function
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def refuse(**kwargs):
        chat._LAST_ERRORS.append("V cache type q4_0 with block size 32 does not divide n_embd_head_v=48")
        raise ValueError("Failed to create llama_context")

    monkeypatch.setattr(llama_cpp, "Llama", refuse)
    monkeypatch.setattr(chat, "_silence_llama_log", lambda: None)
    with pytest.raises(InputError, match=r"cannot run a q4_0 KV cache .*does not divide.*use --kv-type f16"):
        chat.load_model(gguf, n_ctx=512, kv_type="q4_0")
    with pytest.raises(InputError, match="unknown KV cache type"):
        chat.load_model(gguf, n_ctx=512, kv_type="q5_0")


@pytest.mark.slow
def test_chat_ctx_auto_takes_the_largest_fitting_context(tiny_llama3_gguf):
    from l3zh_local import memory
    from l3zh_local.chat import ChatSession

    session = ChatSession.open(tiny_llama3_gguf, n_ctx="auto")
    choice = session.context_choice
    assert choice is not None and choice.limit == 8192
    expected = memory.choose_context(tiny_llama3_gguf, ram=choice.ram)
    assert choice.n_ctx == expected.n_ctx == session.llm.n_ctx()
    # Room for half the KV cache of 8192 tokens beside everything else (1 GiB is kept back for the system).
    est = choice.estimate
    small = memory.choose_context(tiny_llama3_gguf, ram=memory.GIB + est.total - est.kv_cache // 2)
    assert small.n_ctx == 4096 and small.estimate.total <= memory.ram_budget(small.ram)
    with pytest.raises(InputError, match="does not fit"):
        memory.choose_context(tiny_llama3_gguf, ram=512 * 1024 * 1024)
