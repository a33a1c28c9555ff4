"""The export pipeline: source -> (merge) -> 16-bit GGUF -> quants -> deploy files -> verify -> manifest.

Each step is a call into its own module; this one only decides the order, the file names, what can be reused
from an earlier run, and records everything in manifest.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import (
    context,
    convert,
    deploy,
    ggufmeta,
    hardware,
    hfmodel,
    imatrix,
    locks,
    memory,
    recipes,
    sources,
    templates,
    toolchain,
)
from .errors import InputError, OutputExists
from .files import PARTIAL_SUFFIX, ensure_free_space, ensure_writable_dir, human_size, sha256_file
from .manifest import Manifest, fingerprint_folder, step_key
from .quantize import QuantType, quantize
from .serve.bundles import vllm_source, write_bundles

# The temporary merged HF folder of `export --adapter`, under the output folder; removed once converted.
MERGED_SUFFIX = ".merged-hf.tmp"
# Held by the export writing into a folder (with the holder's pid beside it, in EXPORT_LOCK + ".pid").
EXPORT_LOCK = ".l3zh-export.lock"


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
    imatrix: str = "auto"  # "on", "off", or "auto" (the same as "on", at every model size)
    imatrix_file: Path | None = None  # a ready importance matrix (llama.cpp's GGUF or .dat) instead of computing one
    imatrix_tokens: int | None = None  # at most this many calibration tokens; default imatrix.DEFAULT_MAX_TOKENS
    calibration: Path | None = None  # text for the importance matrix; default: the packaged calibration text
    template: str | None = None  # a chat family name (templates.list_families)
    template_file: Path | None = None  # a custom Jinja chat template
    num_ctx: int | None = None  # context the deployment files ask for; default from the recipe or the model
    ctx: int | None = None  # context the GGUF declares (llama.context_length); see context.py
    rope_theta: float | None = None  # RoPE base the GGUF declares (llama.rope.freq_base): the seed's trick
    adapter: str | None = None  # a PEFT LoRA adapter (folder or hub id) merged into the source first
    verify: bool = True  # check every GGUF against its reference (verify.py) and record the verdicts
    wait: bool = True  # when another export holds the output folder: wait for it (else refuse with Busy)


@dataclass
class ExportResult:
    out_dir: Path
    source: sources.ModelSource
    base_gguf: Path
    quant_ggufs: dict[str, Path]
    reused: list[str]
    manifest: Manifest
    family: templates.ChatFamily
    deploy_files: dict[str, list[Path]]  # GGUF file name -> its Modelfile and presets
    adapter: sources.ModelSource | None = None
    failed_verification: list[str] = field(default_factory=list)  # GGUF file names whose verify failed


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


def export(
    model: str | Path | None = None,
    *,
    quants: Sequence[str] | str = ("q4_k_m",),
    out: str | Path = "dist",
    adapter: str | Path | None = None,
    template: str | None = None,
    template_file: str | Path | None = None,
    imatrix: bool = True,
    imatrix_file: str | Path | None = None,
    imatrix_tokens: int | None = None,
    calibration: str | Path | None = None,
    outtype: str = "auto",
    num_ctx: int | None = None,
    ctx: int | None = None,
    rope_theta: float | None = None,
    name: str | None = None,
    revision: str | None = None,
    threads: int = 0,
    verify: bool = True,
    force: bool = False,
    wait: bool = True,
    allow_pickle: bool = False,
    llama_cpp: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export `model` to GGUF quants with their deploy files, verified, recorded in `out`/manifest.json.

    model: a local HF folder, a Hugging Face id (HF_ENDPOINT applies), ``modelscope:<id>``, or None for the
    embedded demo model. quants: quant types (see `quant_types()`), a sequence or "q4_k_m,q8_0". adapter: a PEFT
    LoRA adapter merged into the model first. template / template_file: the chat family or a custom Jinja
    template (default: detected). imatrix: False to quantize without an importance matrix; imatrix_file: llama.cpp's
    `.imatrix.gguf` or legacy `.dat` to use instead of computing one (over at most imatrix_tokens calibration tokens
    of `calibration`, default the packaged text).
    verify: check every GGUF against its reference (`ExportResult.failed_verification` lists those that failed).
    ctx / rope_theta: the context length and RoPE base the GGUF declares instead of the model's (the seed's 32K
    trick: ctx=32768, rope_theta=1e6); ctx also becomes the deployment files' context unless num_ctx is given.
    force: redo every step and overwrite outputs. wait: when another export holds `out`, wait for it (False: raise
    `Busy` at once). Everything else as the CLI's ``l3zh-local export --help``.
    """
    from .quantize import parse_quant_list

    if not imatrix and (imatrix_file or imatrix_tokens):
        raise InputError("--no-imatrix contradicts --imatrix/--imatrix-tokens: give one or the other")
    spec = quants if isinstance(quants, str) else ",".join(quants)
    opts = ExportOptions(
        source=str(model) if model is not None else None, out=Path(out),
        quants=parse_quant_list(spec, have_imatrix=imatrix),
        outtype=outtype, revision=revision, allow_pickle=allow_pickle, force=force,
        llama_cpp=Path(llama_cpp) if llama_cpp else None, threads=threads, name=name,
        imatrix="on" if imatrix else "off", imatrix_file=Path(imatrix_file) if imatrix_file else None,
        imatrix_tokens=imatrix_tokens,
        calibration=Path(calibration) if calibration else None, template=template,
        template_file=Path(template_file) if template_file else None, num_ctx=num_ctx, ctx=ctx, rope_theta=rope_theta,
        adapter=str(adapter) if adapter else None, verify=verify, wait=wait,
    )
    return run_export(opts, log=log)


def run_export(opts: ExportOptions, log: Callable[[str], None] = print) -> ExportResult:
    """The pipeline on already-validated options (`export` builds them from plain arguments)."""
    with contextlib.ExitStack() as held:  # the output folder's lock, taken once the inputs are checked
        return _run_export(opts, log, held)


def _run_export(opts: ExportOptions, log: Callable[[str], None], held: contextlib.ExitStack) -> ExportResult:
    source = sources.resolve(opts.source, revision=opts.revision, allow_pickle=opts.allow_pickle)
    if source.is_demo:
        log("No model given: using the embedded demo model SmolLM2-135M-Instruct (English, 135M parameters).")
        log("  For a real model: l3zh-local export ./your-hf-folder  or  "
            "l3zh-local export shareAI/llama3.1-8b-instruct-dpo-zh")
    info = hfmodel.inspect_model(source.path, allow_pickle=opts.allow_pickle)
    adapter, adapter_record = _resolve_adapter(opts)
    tools = toolchain.llama_cpp(opts.llama_cpp)
    out = ensure_writable_dir(opts.out)
    # Another export into this folder would delete our *.partial files and race on the manifest: one at a time.
    # Everything below reads the folder and its manifest only once the lock is held.
    held.enter_context(locks.hold(out / EXPORT_LOCK, f"output folder {out}", wait=opts.wait, log=log))
    stem = file_stem(source, info, opts.name, adapter)
    outtype = convert.resolve_outtype(info, opts.outtype)
    recipe = _recipe_for(source)
    # A fine-tune's own chat template (saved beside the adapter) decides the family over the base's.
    family = choose_family(opts, info, recipe, adapter.path if adapter else None)
    ctx_plan = context.plan_context(info.config, opts.ctx or (recipe.ctx if recipe else None),
                                    opts.rope_theta or (recipe.rope_theta if recipe else None))
    for context_note in ctx_plan.notes:
        log(f"Note: {context_note}.")
    num_ctx = opts.num_ctx or ctx_plan.deploy_ctx or (
        recipe.num_ctx if recipe else min(info.config.get("max_position_embeddings") or 8192, 8192))
    if not ctx_plan.override.empty:
        log(f"Context: the GGUF declares {ctx_plan.gguf_context} positions"
            + (f", RoPE base {ctx_plan.override.rope_theta:g}" if ctx_plan.override.rope_theta else "")
            + f" (config.json says {info.config.get('max_position_embeddings')}, "
              f"{context.rope_info(info.config).rope_theta or 'no'} base; your files are left as they are).")
    log(f"Chat template: {family.name} (EOS {family.eos_token}, stops {', '.join(family.stop_tokens)}).")
    overrides = convert.TokenizerOverrides(chat_template=family.jinja, eos_token=family.eos_token)

    manifest = Manifest.load(out)
    manifest.set_run_info(
        source=source.describe() | {"files": fingerprint_folder(source.path)},
        model={"architecture": info.architecture, "n_params": info.n_params, "weight_dtype": info.weight_dtype,
               "context_length": info.config.get("max_position_embeddings"),
               "rope_theta": context.rope_info(info.config).rope_theta,
               "rope_scaling": context.rope_info(info.config).scaling_type},
        toolchain=tools.describe(),
        settings={"outtype": outtype, "quants": [q.name for q in opts.quants], "threads": opts.threads,
                  "num_ctx": num_ctx, "ctx": ctx_plan.override.ctx, "rope_theta": ctx_plan.override.rope_theta,
                  "gguf_context_length": ctx_plan.gguf_context},
        template={"family": family.name, "eos_token": family.eos_token, "stop_tokens": list(family.stop_tokens),
                  "default_system": family.default_system, "recipe": recipe.name if recipe else None,
                  "jinja_sha256": templates.template_hash(family.jinja)},
        adapter=adapter_record,
    )
    _clean_partials(out)

    base = out / f"{stem}.{outtype}.gguf"
    targets = {q.name: out / f"{stem}.{q.name}.gguf" for q in opts.quants if q.name != outtype}
    # With an adapter the weights also depend on the adapter's weights (its sha256) and config.
    adapter_parts = [adapter_record["sha256"], adapter_record["config_sha256"]] if adapter_record else []
    # The context override is part of the key only when there is one: earlier exports stay reusable.
    context_parts = [] if ctx_plan.override.empty else [ctx_plan.override.to_dict()]
    convert_key = step_key("convert", manifest.data["source"]["files"], outtype, tools.runtime_version,
                           family.jinja, family.eos_token, *adapter_parts, *context_parts)
    use_imatrix = _wants_imatrix(opts, info, targets)
    given_imatrix = _given_imatrix(opts, info) if use_imatrix and opts.imatrix_file else None
    calibration = _calibration_text(opts) if use_imatrix and given_imatrix is None else None
    imatrix_path = out / f"{stem}.imatrix.gguf"
    if given_imatrix is not None and opts.imatrix_file is not None:
        given_sha256 = sha256_file(opts.imatrix_file)
        imatrix_key = step_key("imatrix-file", given_sha256)
        manifest.record_step("imatrix", 0.0, file=str(opts.imatrix_file), sha256=given_sha256,
                             datasets=given_imatrix.datasets, chunks=given_imatrix.chunk_count)
    elif use_imatrix and calibration is not None:
        imatrix_key = step_key("imatrix", manifest.data["source"]["files"], calibration[0], _imatrix_tokens(opts),
                               *adapter_parts)
    else:
        imatrix_key = None
    quant_keys = {name: step_key("quantize", convert_key, name, imatrix_key) for name in targets}

    to_do = [p for p, k in [(base, convert_key), *((targets[n], quant_keys[n]) for n in targets)]
             if opts.force or not manifest.reusable(p, k)]
    for path in to_do:
        if path.exists() and not opts.force:
            raise OutputExists(f"{path} exists and was not made by this export with these settings; "
                               "pass --force to overwrite it or choose another --out")
    needed = sum(_expected_bytes(info, p, outtype, opts.quants) for p in to_do)
    if adapter is not None and to_do:
        needed += info.weight_bytes  # the merged HF folder, removed once converted (and the imatrix computed)
    ensure_free_space(out, needed, f"{len(to_do)} GGUF file(s) ({human_size(needed)})")
    _warn_if_too_big(info, [targets[n] for n in targets] or [base], outtype, opts.quants, num_ctx, log)

    reused: list[str] = []
    weights = _Weights(opts, source, info, adapter, out / f"{stem}{MERGED_SUFFIX}", manifest, log)
    try:
        if base in to_do:
            model_info = weights.info()  # merges the adapter first, when there is one
            log(f"Converting {source.ref} to {outtype} GGUF with llama.cpp's converter ({tools.source} "
                f"{tools.runtime_version})...")
            started = time.monotonic()
            convert.convert_to_gguf(model_info, base, outtype=outtype, overrides=overrides, context=ctx_plan.override,
                                    tools=tools, force=True)
            _record_gguf(manifest, base, convert_key, "base", time.monotonic() - started)
            manifest.save()
        else:
            reused.append(base.name)
            log(f"Reusing {base.name} (same source and settings as the last run).")

        importance = given_imatrix
        if calibration is not None and imatrix_key is not None and any(p in to_do for p in targets.values()):
            importance = _importance_matrix(manifest, weights, imatrix_path, imatrix_key, calibration,
                                            _imatrix_tokens(opts), log, reuse=not opts.force)
    finally:
        weights.cleanup()

    for name, path in targets.items():
        qtype = next(q for q in opts.quants if q.name == name)
        if path not in to_do:
            reused.append(path.name)
            log(f"Reusing {path.name}.")
            continue
        log(f"Quantizing to {name} ({qtype.note})...")
        started = time.monotonic()
        note = quantize(base, path, qtype, n_params=info.n_params, threads=opts.threads, imatrix=importance,
                        force=True)
        if note:
            log(f"  note: {note} (row sizes not a multiple of 256 cannot take k-quants)")
        _record_gguf(manifest, path, quant_keys[name], "quant", time.monotonic() - started, fallback=note)
        manifest.save()

    model_name = "smollm2-135m-instruct-demo" if source.is_demo else stem
    written: dict[str, list[Path]] = {}
    for gguf in (base, *targets.values()):
        written[gguf.name] = deploy.write_deploy_files(gguf, family, model_name, num_ctx)
        manifest.data["files"][gguf.name]["deploy_files"] = [p.name for p in written[gguf.name]]
        # To serve it elsewhere: llama-server command, LM Studio model.yaml; beside the 16-bit GGUF, vLLM's files.
        manifest.data["files"][gguf.name]["serve_files"] = [str(p.relative_to(out)) for p in write_bundles(
            gguf, family, model_name, num_ctx, vllm=vllm_source(source, opts.adapter) if gguf == base else None)]
    manifest.save()
    failed: list[str] = []
    if opts.verify:
        # The HF model is the reference where it runs comfortably in fp32 (and is still there: a merged
        # folder is gone by now); otherwise the 16-bit GGUF, in the same runtime.
        hf_ref = info.path if adapter is None and info.n_params <= VERIFY_HF_MAX_PARAMS else None
        gguf_ref = _gguf_reference(base, targets, log)
        for gguf in (base, *targets.values()):
            # The 16-bit GGUF and the reference GGUF have none (a 16-bit file too large to run beside is not run).
            ref = hf_ref or (None if gguf in (base, gguf_ref) else gguf_ref)
            if not _verified(manifest, gguf, ref, family, opts.threads, log):
                failed.append(gguf.name)
    from .plan import record_export

    record_export(manifest.data)  # this machine's step timings, for `l3zh-local plan`
    return ExportResult(out_dir=out, source=source, base_gguf=base, quant_ggufs=targets, reused=reused,
                        manifest=manifest, family=family, deploy_files=written, adapter=adapter,
                        failed_verification=failed)


VERIFY_HF_MAX_PARAMS = 1_000_000_000


def _gguf_reference(base: Path, targets: dict[str, Path], log: Callable[[str], None]) -> Path:
    """The GGUF the quants are checked against: the 16-bit one, or the q8_0 where the 16-bit one does not fit in
    memory (verify runs one model at a time: the larger file + about 1 GB must fit). llama.cpp's Llama-3-8B
    figures put q8_0 at a KLD of about 0.0004 against 16-bit, far below every other type's limit."""
    free = hardware.available_memory()
    q8 = targets.get("q8_0")
    if free is None or q8 is None or base.stat().st_size + 2**30 <= free:
        return base
    log(f"  {base.name} ({human_size(base.stat().st_size)}) does not fit in the {human_size(free)} of free memory: "
        f"the quants are verified against {q8.name}")
    return q8


def _verified(manifest: Manifest, gguf: Path, ref: Path | None, family: templates.ChatFamily, threads: int,
              log: Callable[[str], None]) -> bool:
    """Run verify on one GGUF (or reuse its recorded verdict); record it; return whether it passed."""
    from . import verify

    entry = manifest.data["files"][gguf.name]
    key = step_key("verify", entry["key"], str(ref), family.jinja, family.eos_token)
    if entry.get("verify", {}).get("key") == key:
        log(f"Reusing the verification of {gguf.name}: {'passed' if entry['verify']['passed'] else 'FAILED'}.")
        return entry["verify"]["passed"]
    log(f"Verifying {gguf.name} against {ref.name if ref else 'its own metadata'}...")
    started = time.monotonic()
    known = family.name in templates.FAMILIES
    report = verify.verify_gguf(gguf, ref=ref, quant_type=entry.get("type"), threads=threads or None,
                                family=family.name if known else None,
                                expected_template=None if known else family.jinja,
                                expected_eos=None if known else family.eos_token)
    entry["verify"] = {"key": key, "seconds": round(time.monotonic() - started, 1), **report.to_dict()}
    manifest.save()
    for line in report.table().splitlines():
        log(f"  {line}")
    return report.passed


def choose_family(opts: ExportOptions, info: hfmodel.ModelInfo, recipe: recipes.Recipe | None,
                  adapter_dir: Path | None = None) -> templates.ChatFamily:
    """--template-file, else --template, else the model's own template if known, else its recipe, else refuse.

    With an adapter, a chat template saved beside it (fine-tuning tools save the tokenizer there) comes first.
    """
    if opts.template_file is not None:
        return templates.family_from_file(opts.template_file)
    if opts.template is not None:
        return templates.get_family(opts.template)
    own = convert.existing_chat_template(adapter_dir) if adapter_dir is not None else None
    own = own or convert.existing_chat_template(info.path)
    return templates.detect_family(own, recipe.family_name if recipe else None)


def _recipe_for(source: sources.ModelSource) -> recipes.Recipe | None:
    names = [source.ref, source.path.name] + (["smollm2-135m-instruct"] if source.is_demo else [])
    return next((r for r in map(recipes.find_recipe, names) if r is not None), None)


# Types whose rounding does not use an importance matrix.
_NO_IMATRIX_EFFECT = {"q8_0", "f16", "bf16", "f32"}


def _wants_imatrix(opts: ExportOptions, info: hfmodel.ModelInfo, targets: dict[str, Path]) -> bool:
    needing = [q.name for q in opts.quants if q.needs_imatrix]
    if opts.imatrix == "off":
        if needing:
            raise InputError(f"{needing[0]} needs an importance matrix, but --no-imatrix was given")
        return False
    return any(name not in _NO_IMATRIX_EFFECT for name in targets)


def _imatrix_tokens(opts: ExportOptions) -> int:
    return opts.imatrix_tokens or imatrix.DEFAULT_MAX_TOKENS


def _given_imatrix(opts: ExportOptions, info: hfmodel.ModelInfo) -> imatrix.ImportanceMatrix:
    """--imatrix FILE: read and checked against the model before any work."""
    assert opts.imatrix_file is not None
    matrix = imatrix.load_imatrix(opts.imatrix_file)
    imatrix.check_fits(matrix, info.config, opts.imatrix_file)
    return matrix


def _calibration_text(opts: ExportOptions) -> tuple[str, str]:
    """The calibration text and where it came from."""
    if opts.calibration is None:
        return imatrix.default_calibration_text(), imatrix.PACKAGED_CALIBRATION
    try:
        return Path(opts.calibration).read_text(encoding="utf-8"), str(opts.calibration)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read calibration text {opts.calibration}: {exc}") from None


def _importance_matrix(manifest: Manifest, weights: _Weights, path: Path, key: str, calibration: tuple[str, str],
                       max_tokens: int, log: Callable[[str], None], *, reuse: bool) -> imatrix.ImportanceMatrix:
    if reuse and manifest.reusable(path, key):
        log(f"Reusing {path.name}.")
        return imatrix.load_imatrix(path)
    log("Computing an importance matrix with the HF weights over the calibration text, layer by layer "
        "(better low-bit quants; --no-imatrix skips it)...")
    text, source = calibration
    started = time.monotonic()
    # The quants name a user's text by file name only: a path would leak the user's folders into every quant.
    dataset = source if source == imatrix.PACKAGED_CALIBRATION else Path(source).name
    data = imatrix.compute_imatrix(weights.path(), text, max_tokens=max_tokens, dataset=dataset)
    from .files import atomic_output

    with atomic_output(path, force=True) as tmp:
        imatrix.save_imatrix(tmp, data)
    data.file_name = path.name
    seconds = time.monotonic() - started
    manifest.record_file(path, key, kind="imatrix", seconds=seconds, tensors=len(data.sums),
                         chunks=data.chunk_count, calibration={
                             "source": "packaged" if source == imatrix.PACKAGED_CALIBRATION else source,
                             "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "tokens": data.tokens})
    manifest.record_step("imatrix", seconds)
    manifest.save()
    return data


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


class _Weights:
    """The HF folder the GGUF and the importance matrix are made from: the source itself, or the source merged
    with the adapter into a temporary folder under the output folder (merged on first use, removed by cleanup)."""

    def __init__(self, opts: ExportOptions, source: sources.ModelSource, info: hfmodel.ModelInfo,
                 adapter: sources.ModelSource | None, merged_dir: Path, manifest: Manifest,
                 log: Callable[[str], None]):
        self.opts, self.source, self.base_info, self.adapter = opts, source, info, adapter
        self.merged_dir, self.manifest, self.log = merged_dir, manifest, log
        self._merged: hfmodel.ModelInfo | None = None

    def info(self) -> hfmodel.ModelInfo:
        if self.adapter is None:
            return self.base_info
        if self._merged is None:
            self._merged = self._merge()
        return self._merged

    def path(self) -> Path:
        return self.info().path

    def _merge(self) -> hfmodel.ModelInfo:
        from .merge import merge_lora

        assert self.adapter is not None  # info() merges only when there is an adapter
        shutil.rmtree(self.merged_dir, ignore_errors=True)
        self.log(f"Merging the LoRA adapter {self.adapter.ref} into {self.source.ref} (shard by shard)...")
        started = time.monotonic()
        report = merge_lora(self.source.path, self.adapter.path, self.merged_dir, force=self.opts.force,
                            allow_pickle=self.opts.allow_pickle)
        for warning in report.warnings:
            self.log(f"  warning: {warning}")
        self.manifest.record_step("merge", time.monotonic() - started, lora_pairs=report.lora_pairs_applied,
                                  tensors_changed=report.tensors_changed, tensors_replaced=report.tensors_replaced,
                                  warnings=report.warnings)
        self.log(f"  {report.tensors_changed} tensors changed.")
        return hfmodel.inspect_model(self.merged_dir)

    def cleanup(self) -> None:
        if self.adapter is not None:
            shutil.rmtree(self.merged_dir, ignore_errors=True)


def _bits(path: Path, outtype: str, quants: list[QuantType]) -> float:
    for q in quants:
        if path.name.endswith(f".{q.name}.gguf"):
            return q.bits_per_weight
    return convert.CONVERTER_OUTTYPES[outtype]


def _expected_bytes(info: hfmodel.ModelInfo, path: Path, outtype: str, quants: list[QuantType]) -> int:
    """The GGUF's size as `plan` figures it (memory.py: per tensor, from the safetensors headers)."""
    qtype = next((q.name for q in quants if path.name.endswith(f".{q.name}.gguf")), outtype)
    shapes = [t["shape"] for f in info.safetensors for t in f.tensors.values()] or None
    return memory.hf_weights_bytes(info.config, info.n_params, qtype, _bits(path, outtype, quants),
                                   shapes) + memory.GGUF_HEADER_BYTES


def _record_gguf(manifest: Manifest, path: Path, key: str, kind: str, seconds: float, **extra) -> None:
    meta = ggufmeta.read_metadata(path)
    arch = meta.get("general.architecture", "llama")
    manifest.record_file(path, key, kind=kind, seconds=seconds, type=ggufmeta.file_type_name(meta),
                         tensor_types=meta["l3zh.tensor_types"], context_length=meta.get(f"{arch}.context_length"),
                         rope_freq_base=meta.get(f"{arch}.rope.freq_base"), **extra)
    manifest.record_step(f"{kind}:{path.name}", seconds)


def _warn_if_too_big(info: hfmodel.ModelInfo, ggufs: list[Path], outtype: str, quants: list[QuantType],
                     num_ctx: int, log: Callable[[str], None]) -> None:
    """Say so when a GGUF will not run at num_ctx in this machine's memory (memory.py: weights + KV + compute)."""
    ram = memory.total_ram()
    if not ram:
        return
    try:
        shape = memory.ModelShape.from_hf_config(info.config, info.n_params)
    except InputError:
        return  # not a shape the estimate knows: nothing useful to say
    budget = memory.ram_budget(ram)
    for gguf in ggufs:
        need = memory.estimate(shape, _expected_bytes(info, gguf, outtype, quants) - memory.GGUF_HEADER_BYTES,
                               num_ctx)
        if need.total > budget:
            log(f"Warning: {gguf.name} needs about {memory.gib(need.total)} to run at num_ctx {num_ctx} "
                f"({need.line()}), more than the {memory.gib(budget)} usable of this machine's "
                f"{memory.gib(ram)}: choose a smaller quant or --num-ctx (see `l3zh-local plan`).")


def _clean_partials(out: Path) -> None:
    """Leftovers of a killed run are never finished files; remove them so they can't be mistaken for any."""
    for leftover in [*out.glob(f"*{PARTIAL_SUFFIX}"), *out.glob(f"*{MERGED_SUFFIX}")]:
        if leftover.is_dir():  # a merged HF folder (or its .partial) left by a killed run
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
