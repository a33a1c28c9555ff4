"""The family registry, detection, custom templates, Modelfiles, presets, recipes and the CLI commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from l3zh_local.cli import main
from l3zh_local.deploy import modelfile_text, ollama_create, read_modelfile, write_deploy_files
from l3zh_local.deploy.ollama import parse_modelfile
from l3zh_local.errors import InputError
from l3zh_local.recipes import all_recipes, load_recipe, regenerate_modelfiles
from l3zh_local.templates import (
    detect_family,
    family_from_file,
    get_family,
    list_families,
    normalise_template,
    template_hash,
)
from l3zh_local.templates.registry import META_LLAMA3_TEMPLATE

REPO = Path(__file__).resolve().parent.parent


def smollm2_gguf_template() -> str:
    from l3zh_local import demo, ggufmeta

    return ggufmeta.read_metadata(demo.packaged_gguf())["tokenizer.chat_template"]


def run_cli(*args):
    return CliRunner().invoke(main, list(args))


# ----- registry and detection -----

def test_get_family_unknown_lists_names():
    with pytest.raises(InputError, match="llama3, llama3.1, shareai-instruct-sft, shareai-base-sft, chatml"):
        get_family("vicuna")


def test_every_family_detects_itself_and_its_reformatted_self():
    for family in list_families():
        assert detect_family(family.jinja) is family
        # Whitespace changes and Jinja whitespace control do not matter.
        loose = family.jinja.replace("-%}", " %}\n    ").replace("{{-", "{{ ")
        assert detect_family(loose) is family


@pytest.mark.parametrize("file_name",
                         ["meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama-Llama-3.3-70B-Instruct.jinja"])
def test_meta_llama31_templates_from_the_pinned_tree_are_llama31(tools, file_name):
    text = (tools.root / "models" / "templates" / file_name).read_text(encoding="utf-8")
    assert detect_family(text).name == "llama3.1"


def test_meta_llama3_and_smollm2_templates_are_recognised():
    assert detect_family(META_LLAMA3_TEMPLATE).name == "llama3"
    assert detect_family(smollm2_gguf_template()).name == "chatml"


def test_detection_falls_back_to_the_recipe_then_refuses():
    assert detect_family("{{ something unknown }}", "shareai-base-sft").name == "shareai-base-sft"
    assert detect_family(None, "llama3").name == "llama3"
    with pytest.raises(InputError, match="--template NAME .* or --template-file FILE.jinja"):
        detect_family("{{ something unknown }}")
    with pytest.raises(InputError, match="has no chat template"):
        detect_family(None)


def test_normalise_ignores_only_whitespace():
    assert normalise_template("{%- if x -%}\n  a\\n{% endif %}") == normalise_template("{% if x %}a{% endif %}")
    assert template_hash("{{ a }}") != template_hash("{{ b }}")


def test_llama31_date_is_fixed_and_meta_compatible(tools):
    """Our 3.1 rendering equals Meta's own template (default date) wherever Meta's does not trim or merge."""
    from l3zh_local.prompt import render as render_jinja

    meta = (tools.root / "models" / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    ours = get_family("llama3.1")
    for conversation in (
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "你好"}],
    ):
        assert ours.render(conversation) == render_jinja(
            meta, conversation, bos_token=ours.bos_token, eos_token=ours.eos_token)


def test_seed_formats_render_as_the_seed_builds_them():
    """The seed's Python demo: system block with BOS, user turns end <|eot_id|>, base-SFT replies <|end_of_text|>\\n."""
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    seed_system = "<|begin_of_text|><<SYS>>\n{content}\n<</SYS>>\n\n"
    seed_user = "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
    seed_assistant = "<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|end_of_text|>\n"
    expected = (seed_system.format(content="S") + seed_user.format(content="Q1") + seed_assistant.format(content="A1")
                + seed_user.format(content="Q2") + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert get_family("shareai-base-sft").render(chat) == expected


def test_unsupported_role_is_refused():
    with pytest.raises(ValueError, match="unsupported role tool"):
        get_family("llama3").render([{"role": "tool", "content": "x"}])


# ----- custom template files -----

def test_family_from_file_with_front_matter(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text('{# l3zh: {"eos_token": "<|end_of_text|>", "stop_tokens": ["<|end_of_text|>", "###"]} #}'
                    "{{ bos_token }}{% for m in messages %}### {{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    family = family_from_file(path)
    assert family.eos_token == "<|end_of_text|>" and family.stop_tokens == ("<|end_of_text|>", "###")
    assert family.ollama_template() is None
    text = modelfile_text("m.gguf", family, 4096)
    assert "TEMPLATE" not in "".join(line for line in text.splitlines() if not line.startswith("#"))
    assert read_modelfile(text).parameters["stop"] == ["<|end_of_text|>", "###"]


def test_family_from_file_without_front_matter_uses_llama3_eos(tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert family_from_file(path).eos_token == "<|eot_id|>"


@pytest.mark.parametrize("text, message", [
    ("{% for m in messages %}", "not a valid Jinja template"),
    ('{# l3zh: {"eos": 1} #}x', "unknown front matter keys"),
    ("{# l3zh: {oops} #}x", "not valid JSON"),
])
def test_family_from_file_bad_input(tmp_path, text, message):
    path = tmp_path / "bad.jinja"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        family_from_file(path)
    with pytest.raises(InputError, match="cannot read template file"):
        family_from_file(tmp_path / "missing.jinja")


# ----- Modelfile and presets -----

@pytest.mark.parametrize("name", [f.name for f in list_families()])
def test_modelfile_round_trips(name, tmp_path):
    family = get_family(name)
    paths = write_deploy_files(tmp_path / "model.q4_k_m.gguf", family, "my-model", 8192)
    assert [p.name for p in paths] == ["model.q4_k_m.Modelfile", "model.q4_k_m.preset.json",
                                       "model.q4_k_m.legacy.preset.json"]
    assert not list(tmp_path.glob("*.partial"))
    parsed = read_modelfile(paths[0].read_text(encoding="utf-8"))
    assert parsed.from_ == "./model.q4_k_m.gguf"
    assert parsed.template == family.ollama_template()
    assert parsed.system == family.default_system
    params = parsed.parameters
    assert params["stop"] == list(family.stop_tokens)
    assert params["num_ctx"] == 8192 and isinstance(params["num_ctx"], int)
    assert params["num_predict"] == 500 and isinstance(params["num_predict"], int)
    assert (params["temperature"], params["top_p"], params["repeat_penalty"]) == (0.6, 0.9, 1.1)
    assert "<|begin_of_text|>" not in parsed.template  # Ollama adds the BOS itself
    preset = json.loads(paths[1].read_text(encoding="utf-8"))
    fields = {f["key"]: f["value"] for f in preset["operation"]["fields"]}
    assert fields["llm.prediction.promptTemplate"]["jinjaPromptTemplate"]["template"] == family.jinja
    assert fields["llm.prediction.stopStrings"] == list(family.stop_tokens)
    assert fields["llm.prediction.systemPrompt"] == (family.default_system or "")
    assert preset["load"]["fields"] == [{"key": "llm.load.contextLength", "value": 8192}]
    legacy = json.loads(paths[2].read_text(encoding="utf-8"))["inference_params"]
    assert legacy["antiprompt"] == list(family.stop_tokens) and "<|begin_of_text|>" not in legacy["pre_prompt_prefix"]


def test_modelfile_parser_follows_ollama_rules():
    text = ('FROM ./a b.gguf\n# comment\nPARAMETER stop "<|x|>"\n'
            'TEMPLATE """line1\n\n  "quoted" \n"""\nSYSTEM hi there\n')
    assert parse_modelfile(text) == [("from", "./a b.gguf"), ("stop", "<|x|>"),
                                     ("template", 'line1\n\n  "quoted" \n'), ("system", "hi there")]
    with pytest.raises(InputError, match="no FROM"):
        parse_modelfile("SYSTEM x\n")
    with pytest.raises(InputError, match="unterminated"):
        parse_modelfile('FROM x\nTEMPLATE """abc\n')
    with pytest.raises(InputError, match="expected a command"):
        parse_modelfile("FROM x\nBOGUS y\n")
    with pytest.raises(InputError, match="must be an integer"):
        read_modelfile("FROM x\nPARAMETER num_ctx 8k\n")


def test_ollama_create_without_ollama_prints_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ollama executable
    import builtins

    real_import = builtins.__import__

    def no_ollama(name, *args, **kwargs):
        if name == "ollama":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ollama)
    paths = write_deploy_files(tmp_path / "m.gguf", get_family("llama3"), "m", 4096)
    result = ollama_create("my-llama", paths[0])
    assert not result.ran
    assert result.command == f"cd {tmp_path} && ollama create my-llama -f m.Modelfile"
    with pytest.raises(InputError, match="no Modelfile"):
        ollama_create("x", tmp_path / "missing.Modelfile")


def test_ollama_create_runs_the_cli_when_present(tmp_path, monkeypatch):
    """A stand-in `ollama` executable records how it was called (the real one is not installed here)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.txt"
    (bindir / "ollama").write_text(f'#!/bin/sh\necho "$PWD $@" > {log}\necho created\n')
    (bindir / "ollama").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    paths = write_deploy_files(tmp_path / "m.gguf", get_family("chatml"), "m", 2048)
    result = ollama_create("demo", paths[0])
    assert result.ran and "created" in result.output
    assert log.read_text().split() == [str(tmp_path), "create", "demo", "-f", "m.Modelfile"]


# ----- recipes and modelfiles/ -----

def test_recipes_load_by_name_and_ids():
    recipe = load_recipe("shareAI/llama3.1-8b-instruct-dpo-zh")
    assert recipe.family.name == "llama3.1" and recipe.name == "llama3.1-8b-instruct-dpo-zh"
    assert load_recipe("baicai003/Llama3-Chinese_v2").family.eos_token == "<|end_of_text|>"
    assert {r.family_name for r in all_recipes()} == {f.name for f in list_families()}
    with pytest.raises(InputError, match="no recipe for 'nobody/model': known models are"):
        load_recipe("nobody/model")


def test_committed_modelfiles_are_up_to_date(tmp_path):
    fresh = tmp_path / "modelfiles"
    regenerate_modelfiles(fresh)
    committed = REPO / "modelfiles"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated, "no recipe publishes a GGUF"
    on_disk = sorted(p.name for p in committed.iterdir() if p.name != "README.md")
    assert on_disk == generated, "modelfiles/ is stale: run `l3zh-local modelfiles`"
    for name in generated:
        assert (committed / name).read_bytes() == (fresh / name).read_bytes(), (
            f"modelfiles/{name} is stale: run `l3zh-local modelfiles`")


def test_regenerate_removes_files_no_recipe_makes(tmp_path):
    (tmp_path / "gone.Modelfile").write_text("FROM x\n")
    regenerate_modelfiles(tmp_path)
    assert not (tmp_path / "gone.Modelfile").exists()


# ----- CLI -----

def test_cli_templates_list_and_show():
    result = run_cli("templates")
    assert result.exit_code == 0
    for family in list_families():
        assert family.name in result.output
    shown = run_cli("templates", "show", "llama3.1", "--ollama")
    assert shown.exit_code == 0
    assert "Today Date: 26 Jul 2024" in shown.output and "{{ range $i, $m := .Messages }}" in shown.output
    bad = run_cli("templates", "show", "nope")
    assert bad.exit_code == 2 and "Error: unknown chat template 'nope'" in bad.output


def test_cli_modelfiles_and_ollama_create(tmp_path, monkeypatch):
    out = tmp_path / "mf"
    result = run_cli("modelfiles", "--out", str(out))
    assert result.exit_code == 0 and "Wrote" in result.output
    monkeypatch.setenv("PATH", str(tmp_path))
    gguf = out / "llama3.1_8b_chinese_chat_q4_k_m-shareAI.gguf"
    result = run_cli("ollama-create", "zh", str(gguf))
    if "Run:" in result.output:  # no ollama Python client installed either
        assert "ollama create zh -f llama3.1_8b_chinese_chat_q4_k_m-shareAI.Modelfile" in result.output
    assert result.exit_code == 0
    missing = run_cli("ollama-create", "zh", str(tmp_path / "none.Modelfile"))
    assert missing.exit_code == 2 and "no Modelfile" in missing.output


def test_ollama_create_through_the_python_client(tmp_path, monkeypatch):
    """Without the CLI, the `ollama` Python client (>= 0.4 API: create_blob, then create(files=...)) gets the
    Modelfile's fields. A recording stand-in module replaces the client, which is not installed here."""
    import sys
    import types

    calls = {}

    class Client:
        def create_blob(self, path):
            calls["blob"] = Path(path)
            return "sha256:abc"

        def create(self, **kwargs):
            calls["create"] = kwargs

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "ollama", types.SimpleNamespace(Client=Client))
    family = get_family("shareai-base-sft")
    gguf = tmp_path / "m.q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    paths = write_deploy_files(gguf, family, "m", 4096)
    assert ollama_create("zh-base", paths[0]).ran
    assert calls["blob"] == gguf
    sent = calls["create"]
    assert sent["model"] == "zh-base" and sent["files"] == {"m.q4_k_m.gguf": "sha256:abc"}
    assert sent["template"] == family.ollama_template() and sent["system"] == family.default_system
    assert sent["parameters"]["stop"] == list(family.stop_tokens) and sent["parameters"]["num_ctx"] == 4096
