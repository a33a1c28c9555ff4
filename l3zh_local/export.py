"""The export pipeline: source -> (merge) -> 16-bit GGUF -> quants -> deploy files -> verify -> manifest.

Each step is a call into its own module; this one only decides the order, the file names, what can be reused
from an earlier run, and records everything in manifest.json.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import convert, ggufmeta, hfmodel, sources, toolchain
from .errors import OutputExists
from .files import PARTIAL_SUFFIX, ensure_free_space, ensure_writable_dir, human_size, sha256_file
from .hfmodel import estimate_gguf_bytes
from .manifest import Manifest, fingerprint_folder, step_key
from .quantize import QuantType, quantize

# The temporary merged HF folder of `export --adapter`, under the output folder; removed once converted.
MERGED_SUFFIX = ".merged-hf.tmp"


@dataclass
class ExportOptions:
    source: str | None  # None: the embedded demo model
    out: Path = Path("dist")
    quants: list[QuantType] = field(default_factory=list)
    outtype: str = "auto"  # the 16-bit (or q8_0) type the converter writes
    revision: str | None = None
    allow_pickle: bool = False
    force: bool = False
    llama_cpp: Path | None = None
    threads: int = 0
    name: str | None = None  # file stem; default from the source
    adapter: str | None = None  # a PEFT LoRA adapter (folder or hub id) merged into the source first


@dataclass
class ExportResult:
    out_dir: Path
    source: sources.ModelSource
    base_gguf: Path
    quant_ggufs: dict[str, Path]
    reused: list[str]
    manifest: Manifest
    adapter: sources.ModelSource | None = None


def file_stem(source: sources.ModelSource, info: hfmodel.ModelInfo, name: str | None,
              adapter: sources.ModelSource | None = None) -> str:
    if name:
        raw = name
    elif source.is_demo:
        raw = "smollm2-135m-instruct"
    elif source.kind == "local":
        raw = info.path.resolve().name
    else:
        raw = source.ref.split("/")[-1]
    if adapter is not None and not name:  # a merged model is another model: its files must not collide
        raw += "-" + (adapter.path.resolve().name if adapter.kind == "local" else adapter.ref.split("/")[-1])
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.").lower()
    return stem or "model"


def run_export(opts: ExportOptions, log: Callable[[str], None] = print) -> ExportResult:
    source = sources.resolve(opts.source, revision=opts.revision, allow_pickle=opts.allow_pickle)
    if source.is_demo:
        log("No model given: using the embedded demo model SmolLM2-135M-Instruct (English, 135M parameters).")
        log("  For a real model: l3zh-local export ./your-hf-folder  or  l3zh-local export shareAI/llama3.1-8b-instruct-dpo-zh")
    info = hfmodel.inspect_model(source.path, allow_pickle=opts.allow_pickle)
    adapter, adapter_record = _resolve_adapter(opts)
    tools = toolchain.llama_cpp(opts.llama_cpp)
    out = ensure_writable_dir(opts.out)
    stem = file_stem(source, info, opts.name, adapter)
    outtype = convert.resolve_outtype(info, opts.outtype)

    manifest = Manifest.load(out)
    manifest.set_run_info(
        source=source.describe() | {"files": fingerprint_folder(source.path)},
        model={"architecture": info.architecture, "n_params": info.n_params, "weight_dtype": info.weight_dtype,
               "context_length": info.config.get("max_position_embeddings")},
        toolchain=tools.describe(),
        settings={"outtype": outtype, "quants": [q.name for q in opts.quants], "threads": opts.threads},
        adapter=adapter_record,
    )
    _clean_partials(out)

    base = out / f"{stem}.{outtype}.gguf"
    targets = {q.name: out / f"{stem}.{q.name}.gguf" for q in opts.quants if q.name != outtype}
    # With an adapter the 16-bit GGUF also depends on the adapter's weights (its sha256) and config.
    adapter_parts = [adapter_record["sha256"], adapter_record["config_sha256"]] if adapter_record else []
    convert_key = step_key("convert", manifest.data["source"]["files"], outtype, tools.runtime_version, *adapter_parts)
    quant_keys = {name: step_key("quantize", convert_key, name) for name in targets}

    to_do = [p for p, k in [(base, convert_key), *((targets[n], quant_keys[n]) for n in targets)]
             if opts.force or not manifest.reusable(p, k)]
    for path in to_do:
        if path.exists() and not opts.force:
            raise OutputExists(f"{path} exists and was not made by this export with these settings; "
                               "pass --force to overwrite it or choose another --out")
    needed = sum(estimate_gguf_bytes(info, _bits(p, outtype, opts.quants)) for p in to_do)
    if adapter is not None and base in to_do:
        needed += info.weight_bytes  # the merged HF folder, removed once converted
    ensure_free_space(out, needed, f"{len(to_do)} GGUF file(s) ({human_size(needed)})")

    reused: list[str] = []
    if base in to_do:
        log(f"Converting {source.ref} to {outtype} GGUF with llama.cpp's converter ({tools.source} "
            f"{tools.runtime_version})...")
        started = time.monotonic()
        if adapter is None:
            convert.convert_to_gguf(info, base, outtype=outtype, tools=tools, force=True)
        else:
            _merge_and_convert(opts, source, adapter, out / f"{stem}{MERGED_SUFFIX}", base, outtype, tools,
                               manifest, log)
        _record_gguf(manifest, base, convert_key, "base", time.monotonic() - started)
        manifest.save()
    else:
        reused.append(base.name)
        log(f"Reusing {base.name} (same source and settings as the last run).")

    for name, path in targets.items():
        qtype = next(q for q in opts.quants if q.name == name)
        if path not in to_do:
            reused.append(path.name)
            log(f"Reusing {path.name}.")
            continue
        log(f"Quantizing to {name} ({qtype.note})...")
        started = time.monotonic()
        note = quantize(base, path, qtype, n_params=info.n_params, threads=opts.threads, force=True)
        if note:
            log(f"  note: {note} (row sizes not a multiple of 256 cannot take k-quants)")
        _record_gguf(manifest, path, quant_keys[name], "quant", time.monotonic() - started, fallback=note)
        manifest.save()

    manifest.save()
    return ExportResult(out_dir=out, source=source, base_gguf=base, quant_ggufs=targets, reused=reused,
                        manifest=manifest, adapter=adapter)


def _resolve_adapter(opts: ExportOptions) -> tuple[sources.ModelSource | None, dict | None]:
    """The adapter folder and what the manifest records of it: where from, and the hash of its weights."""
    if not opts.adapter:
        return None, None
    from .merge import ADAPTER_CONFIG, adapter_weights_file, read_adapter_config

    adapter = sources.resolve(opts.adapter, allow_pickle=opts.allow_pickle)
    config = read_adapter_config(adapter.path)  # refuses what cannot be merged, before any work
    weights = adapter_weights_file(adapter.path, allow_pickle=opts.allow_pickle)
    record = adapter.describe() | {
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "config_sha256": sha256_file(adapter.path / ADAPTER_CONFIG),
        "lora": {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save",
                                            "base_model_name_or_path")},
    }
    return adapter, record


def _merge_and_convert(opts, source, adapter, merged_dir: Path, gguf: Path, outtype: str, tools, manifest, log) -> None:
    """Merge the adapter into a temporary HF folder under the output folder, convert it, remove it."""
    from .merge import merge_lora

    shutil.rmtree(merged_dir, ignore_errors=True)
    log(f"Merging the LoRA adapter {adapter.ref} into {source.ref} (shard by shard)...")
    started = time.monotonic()
    try:
        report = merge_lora(source.path, adapter.path, merged_dir, force=opts.force, allow_pickle=opts.allow_pickle)
        for warning in report.warnings:
            log(f"  warning: {warning}")
        manifest.record_step("merge", time.monotonic() - started, lora_pairs=report.lora_pairs_applied,
                             tensors_changed=report.tensors_changed, tensors_replaced=report.tensors_replaced,
                             warnings=report.warnings)
        log(f"  {report.tensors_changed} tensors changed; converting the merged model to {outtype} GGUF...")
        convert.convert_to_gguf(hfmodel.inspect_model(merged_dir), gguf, outtype=outtype, tools=tools, force=True)
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)


def _bits(path: Path, outtype: str, quants: list[QuantType]) -> float:
    for q in quants:
        if path.name.endswith(f".{q.name}.gguf"):
            return q.bits_per_weight
    return convert.CONVERTER_OUTTYPES[outtype]


def _record_gguf(manifest: Manifest, path: Path, key: str, kind: str, seconds: float, **extra) -> None:
    meta = ggufmeta.read_metadata(path)
    manifest.record_file(path, key, kind=kind, seconds=seconds, type=ggufmeta.file_type_name(meta),
                         tensor_types=meta["l3zh.tensor_types"], **extra)
    manifest.record_step(f"{kind}:{path.name}", seconds)


def _clean_partials(out: Path) -> None:
    """Leftovers of a killed run are never finished files; remove them so they can't be mistaken for any."""
    for leftover in [*out.glob(f"*{PARTIAL_SUFFIX}"), *out.glob(f"*{MERGED_SUFFIX}")]:
        if leftover.is_dir():  # a merged HF folder (or its .partial) left by a killed run
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
