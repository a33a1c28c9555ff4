"""The streaming LoRA merge, checked against PEFT on real adapters saved by PEFT itself."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from l3zh_local import hfmodel
from l3zh_local.cli import main
from l3zh_local.errors import InputError, OutputExists
from l3zh_local.files import sha256_file
from l3zh_local.merge import merge_lora, pattern_key
from support.fixtures import build_llama3_tokenizer
from support.lora_fixture import SEED_MODULES_TO_SAVE, SEED_TARGETS, random_lora_adapter

pytestmark = pytest.mark.slow  # every test here builds and runs a model

CHINESE_CHAT = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "请用三句话介绍一下长城的历史。"},
]


# --- helpers ------------------------------------------------------------------------------------------------


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def peft_merged_model(base_dir: Path, adapter_dir: Path):
    """What users do today: the whole bf16 base in memory, PeftModel, merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in peft_merged_model(base_dir, adapter_dir).state_dict().items()}


def exact_merge(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """W + scale * B @ A in float64 from the raw files, unrounded: the ideal result."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = read_folder(base_dir)
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    out = {k: v.double() for k, v in base.items()}
    for name, value in adapter.items():
        name = name.removeprefix("base_model.model.")
        if ".lora_" not in name:
            out[name.replace(".base_layer.", ".")] = value.double()
    for name in adapter:
        if not name.endswith(("lora_A.weight", "lora_embedding_A")):
            continue
        module = name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        a = adapter[name].double()
        b = adapter[name.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")].double()
        r_key = pattern_key(config["rank_pattern"], module)
        a_key = pattern_key(config["alpha_pattern"], module)
        r = config["rank_pattern"][r_key] if r_key else config["r"]
        alpha = config["alpha_pattern"][a_key] if a_key else config["lora_alpha"]
        scale = alpha / r**0.5 if config["use_rslora"] else alpha / r
        delta = (b @ a) * scale
        out[f"{module}.weight"] += delta.T if "embedding" in name else delta
        bias = name.replace("lora_A.weight", "lora_B.bias")
        if bias != name and bias in adapter:
            out[f"{module}.bias"] += adapter[bias].double() * scale
    return out


def assert_matches_peft(mine: dict, peft: dict, base: dict) -> None:
    """Tensor by tensor, equal to PEFT's merge up to rounding to the base dtype.

    PEFT rounds the sum once for Linear layers, but for embeddings it rounds the delta to the base dtype before
    adding it: hence the bound eps * (|result| + |delta|), the sum of both rounding errors.
    """
    assert mine.keys() == peft.keys()
    for name, value in peft.items():
        assert mine[name].dtype == value.dtype, name
        eps = torch.finfo(value.dtype).eps
        delta = (mine[name].double() - base[name].double()).abs() if name in base else 0
        allowed = eps * (value.double().abs() + delta) + 1e-12
        excess = (mine[name].double() - value.double()).abs() - allowed
        assert excess.max() <= 0, f"{name} differs from PEFT's merge by more than rounding"


def assert_rounded_once(mine: dict, exact: dict) -> None:
    """Each value is the float64 result rounded once to its dtype: within half a unit in the last place.

    (A tiny allowance covers float32 arithmetic putting a value that lies right on a rounding boundary on the
    other side.)
    """
    assert mine.keys() == exact.keys()
    for name, value in exact.items():
        bits = 1 - math.frexp(torch.finfo(mine[name].dtype).eps)[1] + 1  # significand bits: 8 for bf16
        _, exponent = torch.frexp(value)
        half_ulp = torch.ldexp(torch.full_like(value, 0.5), exponent - bits)
        error = (mine[name].double() - value).abs()
        # float32 arithmetic error, far below a bf16 step: 2^-20 of the tensor's largest value.
        slack = 2.0**-20 * value.abs().max()
        assert (error <= half_ulp + slack).all(), f"{name} is not correctly rounded"


def changed_names(base: dict, merged: dict) -> set[str]:
    return {k for k in base if not torch.equal(base[k], merged[k])}


def chat_ids() -> list[int]:
    tok = build_llama3_tokenizer()
    return tok.apply_chat_template(CHINESE_CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def mean_kl(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(test_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def assert_same_top_token(reference: torch.Tensor, test: torch.Tensor, margin: float = 0.05) -> None:
    """Same top token wherever the reference's top two are further apart than weight rounding can move them."""
    top2 = reference.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > margin
    assert clear.float().mean() > 0.7  # most positions are decided, so this checks something
    assert torch.equal(reference.argmax(-1)[clear], test.argmax(-1)[clear])


def adapter_active_logits(base_dir: Path, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    """The reference: the float32 base with the (unmerged) adapter active, as PEFT runs it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return hf_logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)


def edit_adapter(src: Path, dst: Path, *, config: dict | None = None, tensors=None) -> Path:
    """Copy an adapter folder, changing config keys and/or its tensors (a function of the tensor dict)."""
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "adapter_config.json").read_text())
        data.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(data))
    if tensors:
        weights = dst / "adapter_model.safetensors"
        save_file(tensors(load_file(weights)), str(weights))
    return dst


def sharded_copy(base_dir: Path, dest: Path, max_shard_size: str) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    model.save_pretrained(dest, max_shard_size=max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base_dir / name, dest / name)
    return dest


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def seed_adapter(tiny_llama3_dir, tmp_path_factory) -> Path:
    """Like the seed's DPO adapter: rank 128, alpha 256, all projections, lm_head and the norms trained in full."""
    return random_lora_adapter(
        tiny_llama3_dir, tmp_path_factory.mktemp("seed-adapter") / "adapter",
        r=128, lora_alpha=256, target_modules=SEED_TARGETS, modules_to_save=SEED_MODULES_TO_SAVE, b_std=0.005,
    )


@pytest.fixture(scope="session")
def seed_merged(tiny_llama3_dir, seed_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("seed-merged") / "merged"
    report = merge_lora(tiny_llama3_dir, seed_adapter, out, progress=False)
    return out, report


@pytest.fixture(scope="session")
def small_adapter(tiny_llama3_dir, tmp_path_factory) -> Path:
    """A small r=8 adapter on q/v only, quick to copy and tamper with."""
    return random_lora_adapter(
        tiny_llama3_dir, tmp_path_factory.mktemp("small-adapter") / "adapter",
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=1,
    )


# --- the merge is right -------------------------------------------------------------------------------------


def test_seed_like_merge_matches_peft_tensor_by_tensor(tiny_llama3_dir, seed_adapter, seed_merged):
    out, report = seed_merged
    mine = read_folder(out)
    base = read_folder(tiny_llama3_dir)
    # 2 layers x 7 projections; lm_head, final norm and 2 x 2 layer norms replaced in full.
    assert report.lora_pairs_applied == 14
    assert report.tensors_replaced == 6
    assert report.tensors_changed == 20 == len(changed_names(base, mine))
    assert_matches_peft(mine, peft_merged(tiny_llama3_dir, seed_adapter), base)
    assert_rounded_once(mine, exact_merge(tiny_llama3_dir, seed_adapter))


def test_merged_folder_is_a_complete_model(tiny_llama3_dir, seed_merged):
    out, report = seed_merged
    copied = set(report.files_copied)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= copied
    assert (out / "config.json").read_bytes() == (tiny_llama3_dir / "config.json").read_bytes()
    assert report.output_shards == ["model.safetensors"]
    assert not list(out.parent.glob("*.partial"))
    info = hfmodel.inspect_model(out)
    assert info.n_params == hfmodel.inspect_model(tiny_llama3_dir).n_params and info.weight_dtype == "BF16"


def test_merged_logits_equal_adapter_active_logits(tiny_llama3_dir, seed_adapter, seed_merged):
    from transformers import AutoModelForCausalLM

    ids = chat_ids()
    reference = adapter_active_logits(tiny_llama3_dir, seed_adapter, ids)
    merged = hf_logits(AutoModelForCausalLM.from_pretrained(seed_merged[0], dtype=torch.float32), ids)
    base = hf_logits(AutoModelForCausalLM.from_pretrained(tiny_llama3_dir, dtype=torch.float32), ids)
    # The adapter matters (so this comparison means something), and the merged model reproduces it.
    assert mean_kl(reference, base) > 1e-2
    assert mean_kl(reference, merged) < 1e-4
    assert_same_top_token(reference, merged)
    # What is left is the rounding of the merged weights to bf16: PEFT's own merge has the same divergence.
    peft = hf_logits(peft_merged_model(tiny_llama3_dir, seed_adapter).float(), ids)
    assert mean_kl(reference, merged) <= 1.05 * mean_kl(reference, peft)


def test_rslora_patterns_and_embedding_lora_match_peft(tiny_llama3_dir, tmp_path):
    adapter = random_lora_adapter(
        tiny_llama3_dir, tmp_path / "adapter", seed=2, b_std=0.02,
        r=8, lora_alpha=16, use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        # PEFT matches these as suffixes of the module name; 'layers.1.self_attn.q_proj' hits one module only.
        rank_pattern={"layers.1.self_attn.q_proj": 4, "down_proj": 16},
        alpha_pattern={"v_proj": 3, "layers.0.mlp.down_proj": 40},
    )
    report = merge_lora(tiny_llama3_dir, adapter, tmp_path / "out", progress=False)
    mine = read_folder(tmp_path / "out")
    assert report.lora_pairs_applied == 7
    base = read_folder(tiny_llama3_dir)
    assert_matches_peft(mine, peft_merged(tiny_llama3_dir, adapter), base)
    assert_rounded_once(mine, exact_merge(tiny_llama3_dir, adapter))
    assert changed_names(base, mine) == {
        f"model.layers.{i}.{m}.weight"
        for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    } | {"model.embed_tokens.weight"}


def test_pattern_key_follows_peft():
    from peft.utils.other import get_pattern_key

    patterns = ["q_proj", "layers.1.self_attn.v_proj", r"layers\.[01]\.mlp\..*_proj", "proj"]
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                   "model.layers.0.self_attn.v_proj",
                   "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.k_proj", "lm_head"):
        theirs = get_pattern_key(patterns, module)
        assert pattern_key(patterns, module) == (theirs if theirs in patterns else None)


def test_lora_bias_and_fan_in_fan_out(tmp_path):
    """lora_B.bias is added to the base bias; fan_in_fan_out is ignored for nn.Linear exactly as PEFT does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    base = tmp_path / "base"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    adapter = random_lora_adapter(base, tmp_path / "adapter", seed=3, b_std=0.05, r=4, lora_alpha=8,
                                  target_modules=["q_proj", "up_proj"], lora_bias=True)
    merge_lora(base, adapter, tmp_path / "out", progress=False)
    mine = read_folder(tmp_path / "out")
    base_tensors = read_folder(base)
    changed = changed_names(base_tensors, mine)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.up_proj.bias"} <= changed
    assert_matches_peft(mine, peft_merged(base, adapter), base_tensors)
    assert_rounded_once(mine, exact_merge(base, adapter))

    flipped = edit_adapter(adapter, tmp_path / "fan", config={"fan_in_fan_out": True})
    merge_lora(base, flipped, tmp_path / "out-fan", progress=False)
    assert_matches_peft(read_folder(tmp_path / "out-fan"), peft_merged(base, flipped), base_tensors)


def test_multi_shard_base_gives_the_same_tensors_and_an_index(tiny_llama3_dir, seed_adapter, seed_merged, tmp_path):
    # Same folder name as the fixture, so the adapter's recorded base name still matches.
    base = sharded_copy(tiny_llama3_dir, tmp_path / tiny_llama3_dir.name, "40MB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3
    report = merge_lora(base, seed_adapter, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert report.output_shards == shards == sorted(p.name for p in out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="pt") as fh:
            assert name in fh.keys()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in read_folder(out).values())
    single = read_folder(seed_merged[0])
    sharded = read_folder(out)
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


@pytest.mark.slow
def test_export_with_adapter_gives_a_gguf_with_the_adapter_active_logits(tiny_llama3_dir, seed_adapter, tmp_path):
    """`export BASE --adapter A`: merge into a temporary folder, convert; the f16 GGUF behaves like base + adapter."""
    from llama_cpp import Llama

    out = tmp_path / "dist"
    args = ["export", str(tiny_llama3_dir), "--adapter", str(seed_adapter), "--q", "f16", "--outtype", "f16",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "tensors changed" in result.output
    ggufs = sorted(out.glob("*.gguf"))
    assert [p.name for p in ggufs] == [f"{tiny_llama3_dir.name}-adapter.f16.gguf"]
    # The merged HF folder is gone; the only folder left is the vLLM bundle beside the 16-bit GGUF.
    assert [p.name for p in out.iterdir() if p.is_dir()] == [f"{tiny_llama3_dir.name}-adapter.vllm"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter"]["sha256"] == sha256_file(seed_adapter / "adapter_model.safetensors")
    assert manifest["adapter"]["path"] == str(seed_adapter) and manifest["adapter"]["lora"]["r"] == 128
    assert manifest["steps"]["merge"]["tensors_changed"] == 20

    ids = chat_ids()
    reference = adapter_active_logits(tiny_llama3_dir, seed_adapter, ids)
    llm = Llama(model_path=str(ggufs[0]), logits_all=True, n_ctx=len(ids) + 8, verbose=False)
    llm.eval(ids)
    gguf_logits = torch.from_numpy(llm.scores[: len(ids)].copy())
    del llm
    assert mean_kl(reference, gguf_logits) < 1e-4
    assert_same_top_token(reference, gguf_logits)

    # A re-run reuses the GGUF without merging again; another adapter is another model and another file.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "Reusing" in again.output and "Merging" not in again.output
    # A quant with an importance matrix: the f16 GGUF is reused, the matrix is computed on the merged model.
    more = CliRunner().invoke(main, [*args[:5], "f16,q4_k_m", *args[6:]])
    assert more.exit_code == 0, more.output
    assert more.output.count("Merging") == 1 and "Reusing tiny" in more.output and "importance matrix" in more.output
    assert (out / f"{tiny_llama3_dir.name}-adapter.q4_k_m.gguf").is_file()
    assert not list(out.glob("*.tmp*")) and not list(out.glob("*.partial"))


def test_merge_command(tiny_llama3_dir, small_adapter, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(tiny_llama3_dir), str(small_adapter), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "merged 4 LoRA pairs and 0 saved modules" in result.output and "4 tensors changed" in result.output
    assert hfmodel.inspect_model(out).n_params > 0
    again = CliRunner().invoke(main, ["merge", str(tiny_llama3_dir), str(small_adapter), "--out", str(out)])
    assert again.exit_code == 2 and again.output.strip().startswith("Error: ") and "--force" in again.output
    assert len(again.output.strip().splitlines()) == 1
    as_json = CliRunner().invoke(main, ["merge", str(tiny_llama3_dir), str(small_adapter), "--out", str(out),
                                        "--force", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)["tensors_changed"] == 4


# --- refusals -----------------------------------------------------------------------------------------------


def refuse(base: Path, adapter: Path, out: Path, match: str, error=InputError, **kwargs) -> None:
    with pytest.raises(error, match=match) as caught:
        merge_lora(base, adapter, out, progress=False, **kwargs)
    assert "\n" not in str(caught.value)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_refuses_other_peft_types_and_variants(tiny_llama3_dir, small_adapter, tmp_path):
    out = tmp_path / "out"
    ia3 = edit_adapter(small_adapter, tmp_path / "ia3", config={"peft_type": "IA3"})
    refuse(tiny_llama3_dir, ia3, out, "IA3 adapter")
    refuse(tiny_llama3_dir, edit_adapter(small_adapter, tmp_path / "dora", config={"use_dora": True}), out, "DoRA")
    refuse(tiny_llama3_dir, edit_adapter(small_adapter, tmp_path / "pissa", config={"init_lora_weights": "pissa"}),
           out, "rewrites the base weights")


def test_refuses_quantized_base(tiny_llama3_dir, small_adapter, tmp_path):
    base = tmp_path / "quantized"
    base.mkdir()
    for entry in tiny_llama3_dir.iterdir():
        (base / entry.name).symlink_to(entry)
    config = json.loads((tiny_llama3_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").unlink()
    (base / "config.json").write_text(json.dumps(config))
    refuse(base, small_adapter, tmp_path / "out", "bitsandbytes-quantized", force=True)


def test_refuses_missing_modules_and_bad_shapes(tiny_llama3_dir, small_adapter, tmp_path):
    out = tmp_path / "out"

    def rename_layer(t):
        return {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}

    def widen_a(t):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        return {**t, key: torch.zeros(8, 300, dtype=t[key].dtype)}

    def rank_16(t):
        return {k: (torch.cat([v, v], 0) if "lora_A" in k else torch.cat([v, v], 1)) for k, v in t.items()}

    def drop_b(t):
        return {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k}

    refuse(tiny_llama3_dir, edit_adapter(small_adapter, tmp_path / "a1", tensors=rename_layer), out,
           "lacks .first: model.layers.7")
    refuse(tiny_llama3_dir, edit_adapter(small_adapter, tmp_path / "a2", tensors=widen_a), out,
           r"q_proj give a \[256, 300\] update but the base weight is \[256, 256\]")
    refuse(tiny_llama3_dir, edit_adapter(small_adapter, tmp_path / "a3", tensors=rank_16), out,
           "has rank 16 but adapter_config.json says 8")
    refuse(tiny_llama3_dir, edit_adapter(small_adapter, tmp_path / "a4", tensors=drop_b), out, "not its pair")


def test_refuses_resized_vocabulary(tiny_llama3_dir, small_adapter, tmp_path):
    def add_rows(t):
        return {**t, "base_model.model.lm_head.weight": torch.zeros(128264, 256, dtype=torch.bfloat16)}

    adapter = edit_adapter(small_adapter, tmp_path / "resized", tensors=add_rows,
                           config={"modules_to_save": ["lm_head"]})
    refuse(tiny_llama3_dir, adapter, tmp_path / "out", r"resized vocabulary \(128264 rows")


def test_base_name_mismatch_needs_force(tiny_llama3_dir, small_adapter, tmp_path):
    other = edit_adapter(small_adapter, tmp_path / "other", config={"base_model_name_or_path": "someone/another-llama"})
    refuse(tiny_llama3_dir, other, tmp_path / "out", "trained on someone/another-llama.*--force")
    report = merge_lora(tiny_llama3_dir, other, tmp_path / "out", progress=False, force=True)
    assert report.warnings and "someone/another-llama" in report.warnings[0]
    # A hub id whose name is the base folder's name is the same model.
    same = edit_adapter(small_adapter, tmp_path / "same",
                        config={"base_model_name_or_path": f"org/{tiny_llama3_dir.name}"})
    assert merge_lora(tiny_llama3_dir, same, tmp_path / "out2", progress=False).warnings == []


def test_refuses_an_adapter_that_changes_nothing(tiny_llama3_dir, small_adapter, tmp_path):
    def zero_b(t):
        return {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in t.items()}

    refuse(tiny_llama3_dir, edit_adapter(small_adapter, tmp_path / "zero", tensors=zero_b), tmp_path / "out",
           "every lora_B .* is zero")

    def tiny_b(t):  # non-zero, but far below bf16 resolution: nothing changes after rounding
        return {k: (torch.full_like(v, 1e-30) if "lora_B" in k else v) for k, v in t.items()}

    refuse(tiny_llama3_dir, edit_adapter(small_adapter, tmp_path / "tiny", tensors=tiny_b), tmp_path / "out",
           "changes nothing")

    def no_lora(t):
        return {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(256)}

    refuse(tiny_llama3_dir, edit_adapter(small_adapter, tmp_path / "none", tensors=no_lora), tmp_path / "out",
           "LoRA variant")


def test_refuses_pickles_and_existing_output(tiny_llama3_dir, small_adapter, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(small_adapter, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    refuse(tiny_llama3_dir, pickled, tmp_path / "out", "--allow-pickle")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists):
        merge_lora(tiny_llama3_dir, small_adapter, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # With --allow-pickle the weights-only loader reads it, and --force replaces the folder whole.
    report = merge_lora(tiny_llama3_dir, pickled, out, progress=False, allow_pickle=True, force=True)
    assert report.tensors_changed == 4 and not (out / "keep.txt").exists()
    refuse(tiny_llama3_dir, small_adapter, tiny_llama3_dir / "merged", "overlaps the input")
    refuse(tiny_llama3_dir, tmp_path / "nowhere", tmp_path / "out", "adapter .*nowhere is not a folder")


def test_refuses_lm_head_for_a_base_with_tied_embeddings(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).save_pretrained(tmp_path / "untied")
    adapter = random_lora_adapter(tmp_path / "untied", tmp_path / "adapter", r=4, lora_alpha=8,
                                  target_modules=["q_proj"], modules_to_save=["lm_head"])
    refuse(tmp_path / "tied", adapter, tmp_path / "out", "ties lm_head to embed_tokens", force=True)


def test_interrupted_merge_leaves_nothing_that_looks_finished(tiny_llama3_dir, small_adapter, tmp_path, monkeypatch):
    from l3zh_local import merge

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_copy_side_files", interrupt)  # after every shard is written, before the rename
    with pytest.raises(KeyboardInterrupt):
        merge_lora(tiny_llama3_dir, small_adapter, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_bad_adapter_before_any_work(tiny_llama3_dir, small_adapter, tmp_path):
    dora = edit_adapter(small_adapter, tmp_path / "dora", config={"use_dora": True})
    out = tmp_path / "dist"
    result = CliRunner().invoke(main, ["export", str(tiny_llama3_dir), "--adapter", str(dora), "--out", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("Error: DoRA")
    assert not out.exists() or not any(out.iterdir())
