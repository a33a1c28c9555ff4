"""`l3zh-local plan`: what exporting and running a model will cost here, before any weights are downloaded.

From config.json and the safetensors headers alone (a local folder, or a hub model's metadata: config.json and the
headers through huggingface_hub, no weights), for each quant type: the GGUF's size, the memory to run it at a
context (memory.py: weights + KV cache + compute buffer) and whether that fits, the disk an export needs, and each
export step's time.

Step times come from timings measured on this machine: every export records how long its steps took for its model
size (`record_export`, into the cache's throughput.json); `plan --measure` exports the demo model once to get some.
With two model sizes a start-up cost plus a cost per parameter is fitted; with one, times scale with the parameter
count, and a small model's start-up cost then makes a large model's figures come out on the long side.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import memory, settings, sources
from .errors import InputError, OfflineError
from .files import read_json, write_text_atomic
from .quantize import QUANT_TYPES, QuantType

DEFAULT_QUANTS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
THROUGHPUT_FILE = "throughput.json"
STEPS = ("convert", "imatrix", "quantize", "verify")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class ModelFacts:
    """What plan knows of a model without its weights."""

    name: str
    config: dict
    n_params: int
    weight_bytes: int  # the safetensors data, as stored
    weight_dtype: str
    where: str  # "local" or the hub endpoint
    download_bytes: int = 0  # what an export would fetch first
    shapes: list[list[int]] | None = None  # every tensor's shape, for per-tensor size estimates

    def weights(self, qtype: QuantType) -> int:
        """Tensor data of a GGUF of this model at `qtype` (memory.hf_weights_bytes)."""
        return memory.hf_weights_bytes(self.config, self.n_params, qtype.name, qtype.bits_per_weight, self.shapes)

    @property
    def outtype(self) -> str:
        return "bf16" if self.weight_dtype == "BF16" else "f16"


def model_facts(model: str | None, *, revision: str | None = None) -> ModelFacts:
    """The facts of a local HF folder, a Hugging Face id (metadata only) or, for None, the demo model."""
    from . import hfmodel, sources

    if model is None:
        from .demo import demo_model_dir

        folder = demo_model_dir()
        info = hfmodel.inspect_model(folder)
        return ModelFacts("smollm2-135m-instruct (demo)", info.config, info.n_params, info.weight_bytes,
                          info.weight_dtype, "local", shapes=_shapes(info))
    if model.startswith(sources.MODELSCOPE_PREFIX):
        raise InputError("plan reads model metadata from Hugging Face only; for a ModelScope model, download the "
                         "folder first and give its path")
    spec = model[len(sources.HF_PREFIX):] if model.startswith(sources.HF_PREFIX) else model
    local = Path(spec).expanduser()
    if local.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        info = hfmodel.inspect_model(local)
        return ModelFacts(local.resolve().name, info.config, info.n_params, info.weight_bytes, info.weight_dtype,
                          "local", shapes=_shapes(info))
    return _hub_facts(spec, revision)


_OFFLINE_HINT = ("plan needs its config.json and safetensors headers: check the network (HF_ENDPOINT="
                 "https://hf-mirror.com in China) or give a local folder")


def _reachable(endpoint: str) -> None:
    """One request with a short timeout, so that an offline machine fails at once (the hub client retries for
    half a minute)."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise OfflineError(f"HF_HUB_OFFLINE is set; {_OFFLINE_HINT}")
    try:
        huggingface_hub.get_session().head(endpoint, timeout=5)
    except Exception as exc:  # noqa: BLE001 - the client's connection and timeout errors
        reason = (str(exc).strip().splitlines() or [""])[0][:120] or type(exc).__name__
        raise OfflineError(f"cannot reach {endpoint} ({reason}); {_OFFLINE_HINT}") from None


def _shapes(info) -> list[list[int]] | None:
    return [t["shape"] for f in info.safetensors for t in f.tensors.values()] or None


def _hub_facts(repo_id: str, revision: str | None) -> ModelFacts:
    """config.json and the safetensors headers of a hub model (HF_ENDPOINT applies); one line when unreachable."""
    import huggingface_hub
    from huggingface_hub import errors

    endpoint = sources.hub_endpoint()
    _reachable(endpoint)
    try:
        with sources.hub_lookup_errors(repo_id, revision):
            config_path = huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision,
                                                          etag_timeout=10)
            meta = huggingface_hub.get_safetensors_metadata(repo_id, revision=revision, timeout=10)
    except InputError:
        raise
    except errors.NotASafetensorsRepoError:
        raise InputError(f"{repo_id} has no safetensors weights: plan needs their headers") from None
    except Exception as exc:  # noqa: BLE001 - offline, DNS, timeouts, proxies: all mean "cannot reach the hub"
        raise OfflineError(f"cannot read {repo_id}'s metadata from {endpoint} ({type(exc).__name__}); "
                           f"{_OFFLINE_HINT}") from None
    config = read_json(Path(config_path))
    counts: dict[str, int] = {str(k): int(v) for k, v in meta.parameter_count.items()}
    n_params = sum(counts.values())
    stored = sum(count * _DTYPE_BYTES.get(dtype, 2) for dtype, count in counts.items())
    floats = {k: v for k, v in counts.items() if k in ("BF16", "F16", "F32")}
    dtype = max(floats, key=lambda k: floats[k]) if floats else "F16"
    shapes = [list(t.shape) for f in meta.files_metadata.values() for t in f.tensors.values()]
    return ModelFacts(repo_id, config, n_params, stored, dtype, endpoint, download_bytes=stored, shapes=shapes or None)


# -- measured throughput -----------------------------------------------------------------------------------------

def _throughput_path() -> Path:
    return settings.cache_dir() / THROUGHPUT_FILE


def load_throughput() -> dict[str, list[dict]]:
    """step -> the timings recorded on this machine, one per model size: {"n_params", "seconds", "model", "when"}."""
    path = _throughput_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # a damaged record only means no estimate
    if not isinstance(data, dict):
        return {}
    # Records this version cannot read (an older layout, a hand edit) are dropped, never a crash after an export.
    return {step: [e for e in entries if isinstance(e, dict) and isinstance(e.get("n_params"), int)
                   and isinstance(e.get("seconds"), (int, float))]
            for step, entries in data.items() if isinstance(entries, list)}


def record_export(manifest_data: dict) -> dict:
    """Keep this export's step timings as this machine's throughput, one record per step and model size (the
    newest wins). Returns what was recorded."""
    model = manifest_data.get("model", {})
    n_params = int(model.get("n_params") or 0)
    if n_params <= 0:
        return {}
    seconds: dict[str, list[float]] = {step: [] for step in STEPS}
    for name, entry in manifest_data.get("steps", {}).items():
        kind = name.split(":", 1)[0]
        step = {"base": "convert", "quant": "quantize", "imatrix": "imatrix"}.get(kind)
        if step:
            seconds[step].append(float(entry["seconds"]))
    for entry in manifest_data.get("files", {}).values():
        if isinstance(entry.get("verify"), dict) and "seconds" in entry["verify"]:
            seconds["verify"].append(float(entry["verify"]["seconds"]))
    record = load_throughput()
    name = manifest_data.get("source", {}).get("ref", "?")
    changed = {}
    for step, values in seconds.items():
        if not values:
            continue
        entry = {"n_params": n_params, "seconds": round(sum(values) / len(values), 2), "model": name,
                 "when": time.strftime("%Y-%m-%d")}
        others = [e for e in record.get(step, []) if e.get("n_params") != n_params]
        record[step] = sorted(others + [entry], key=lambda e: e["n_params"])[-_KEPT_SIZES:]
        changed[step] = entry
    if changed:
        try:
            write_text_atomic(_throughput_path(), json.dumps(record, indent=2) + "\n")
        except OSError:
            return {}  # a read-only cache costs only the time estimates
    return changed


_KEPT_SIZES = 6  # model sizes remembered per step (the largest ones)


def measure(log: Callable[[str], None] = print) -> dict:
    """Export the demo model (q4_k_m, verified) into a temporary folder to measure this machine's throughput."""
    from .export import export

    with tempfile.TemporaryDirectory(prefix="l3zh-measure-") as tmp:
        result = export(None, quants=["q4_k_m"], out=tmp, log=lambda _msg: None)
        recorded = record_export(result.manifest.data)
    log(f"Measured on the demo model: {', '.join(recorded) or 'nothing'}.")
    return recorded


def step_seconds(step: str, n_params: int, throughput: dict) -> float | None:
    """Seconds for `step` on a model of `n_params`, from this machine's records.

    With records of two model sizes at least 1.5x apart, a fixed start-up cost plus a cost per parameter is fitted
    (least squares); with one, the time is scaled in proportion, which overstates a large model's time by the
    small one's start-up share.
    """
    points = [(float(e["n_params"]), float(e["seconds"])) for e in throughput.get(step, [])]
    if not points:
        return None
    sizes = [n for n, _ in points]
    if len(points) >= 2 and max(sizes) >= 1.5 * min(sizes):
        mean_n = sum(sizes) / len(points)
        mean_s = sum(s for _, s in points) / len(points)
        slope = (sum((n - mean_n) * (s - mean_s) for n, s in points)
                 / sum((n - mean_n) ** 2 for n in sizes))
        fixed = mean_s - slope * mean_n
        if slope > 0 and fixed >= 0:
            return fixed + slope * n_params
    n_big, s_big = max(points)
    return s_big * n_params / n_big


def measured_on(throughput: dict) -> list[str]:
    """The exports the step times come from, for the plan's footnote."""
    seen = {(e["model"], e["n_params"], e["when"]) for entries in throughput.values() for e in entries}
    return [f"{model} ({n / 1e9:.2f}B, {when})" for model, n, when in sorted(seen, key=lambda x: x[1])]


# -- the plan ----------------------------------------------------------------------------------------------------

@dataclass
class PlanRow:
    quant: str
    file_bytes: int
    run: memory.MemoryEstimate
    fits: bool | None
    disk_bytes: int  # for an export of this quant: download + 16-bit GGUF + this file
    quantize_s: float | None

    def to_dict(self) -> dict:
        return {"quant": self.quant, "file_bytes": self.file_bytes, "ram_bytes": self.run.total,
                "memory": self.run.to_dict(), "fits": self.fits, "export_disk_bytes": self.disk_bytes,
                "quantize_seconds": self.quantize_s}


@dataclass
class Plan:
    facts: ModelFacts
    shape: memory.ModelShape
    n_ctx: int
    kv_type: str
    ram: int | None
    ram_given: bool
    rows: list[PlanRow]
    steps: dict[str, float | None]  # convert, imatrix, verify (per GGUF) seconds
    throughput: dict[str, list[dict]]
    table: list[memory.MemoryEstimate] = field(default_factory=list)
    table_quant: str = "q4_k_m"

    def to_dict(self) -> dict:
        return {
            "model": self.facts.name, "where": self.facts.where, "n_params": self.facts.n_params,
            "weight_dtype": self.facts.weight_dtype, "download_bytes": self.facts.download_bytes,
            "context_length": self.shape.context_length, "n_ctx": self.n_ctx, "kv_type": self.kv_type,
            "ram_bytes": self.ram, "budget_bytes": memory.ram_budget(self.ram) if self.ram else None,
            "kv_bytes_per_token": memory.kv_bytes_per_token(self.shape, self.kv_type),
            "quants": [r.to_dict() for r in self.rows], "step_seconds": self.steps,
            "measured_on": measured_on(self.throughput),
            "memory_table": {"quant": self.table_quant, "rows": [e.to_dict() for e in self.table]},
        }


def make_plan(facts: ModelFacts, *, n_ctx: int | None = None, ram: int | None = None, kv_type: str = "f16",
              quants: list[QuantType] | None = None, throughput: dict | None = None) -> Plan:
    shape = memory.ModelShape.from_hf_config(facts.config, facts.n_params)
    n_ctx = n_ctx or min(shape.context_length or 8192, 8192)
    ram_given = ram is not None
    ram = ram if ram is not None else memory.total_ram()
    budget = memory.ram_budget(ram) if ram else None
    throughput = load_throughput() if throughput is None else throughput
    base = QUANT_TYPES[facts.outtype]
    quants = [base] + [q for q in (quants or [QUANT_TYPES[n] for n in DEFAULT_QUANTS]) if q.name != base.name]
    base_file = facts.weights(base) + memory.GGUF_HEADER_BYTES
    rows = []
    for q in quants:
        file_bytes = facts.weights(q) + memory.GGUF_HEADER_BYTES
        run = memory.estimate(shape, facts.weights(q), n_ctx, kv_type)
        disk = facts.download_bytes + base_file + (file_bytes if q is not base else 0)
        rows.append(PlanRow(q.name, file_bytes, run, run.total <= budget if budget is not None else None, disk,
                            None if q is base else step_seconds("quantize", facts.n_params, throughput)))
    steps = {"convert": step_seconds("convert", facts.n_params, throughput),
             "imatrix": step_seconds("imatrix", facts.n_params, throughput),
             "verify": step_seconds("verify", facts.n_params, throughput)}
    table_quant = "q4_k_m" if any(r.quant == "q4_k_m" for r in rows) else rows[-1].quant
    table = memory.table(shape, facts.weights(QUANT_TYPES[table_quant]))
    return Plan(facts, shape, n_ctx, kv_type, ram, ram_given, rows, steps, throughput, table, table_quant)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    f, gib = plan.facts, memory.gib
    lines = [f"{f.name}: {f.n_params / 1e9:.2f}B parameters ({f.weight_dtype}, {gib(f.weight_bytes)}), "
             f"{plan.shape.n_layers} layers, {plan.shape.n_kv_heads} KV heads of {plan.shape.head_dim_k}, "
             f"context {plan.shape.context_length}"]
    if f.download_bytes:
        lines.append(f"download first: {gib(f.download_bytes)} of safetensors from {f.where}")
    per_token = memory.kv_bytes_per_token(plan.shape, plan.kv_type)
    where = "given" if plan.ram_given else "this machine"
    budget = memory.ram_budget(plan.ram) if plan.ram else None
    ram_line = (f"RAM {gib(plan.ram)} ({where}), {gib(budget)} usable" if plan.ram and budget is not None
                else "RAM unknown")
    lines.append(f"at context {plan.n_ctx} with a {plan.kv_type} KV cache ({per_token / 1024:.0f} KiB per token); "
                 f"{ram_line}")
    lines.append("")
    head = f"{'quant':<8} {'file':>10} {'RAM to run':>11} {'fits':>5} {'export disk':>12} {'quantize':>9}"
    lines.append(head)
    for r in plan.rows:
        fits = "-" if r.fits is None else ("yes" if r.fits else "NO")
        q_time = "(base)" if r.quantize_s is None and r is plan.rows[0] else _duration(r.quantize_s)
        lines.append(f"{r.quant:<8} {gib(r.file_bytes):>10} {gib(r.run.total):>11} {fits:>5} "
                     f"{gib(r.disk_bytes):>12} {q_time:>9}")
    lines.append("RAM to run = weights + KV cache + compute buffer (see `l3zh-local doctor` and README: Long context); "
                 "export disk = download + 16-bit GGUF + that quant")
    lines.append("")
    steps = plan.steps
    if any(v is not None for v in steps.values()) or plan.rows[1:] and plan.rows[1].quantize_s is not None:
        measured = measured_on(plan.throughput)
        imatrix_note = (_duration(steps["imatrix"]) if steps["imatrix"] is not None
                        else "off by default above 4B parameters")
        lines.append(f"export steps on this machine: convert {_duration(steps['convert'])}, importance matrix "
                     f"{imatrix_note}, quantize per type as above, verify {_duration(steps['verify'])} per GGUF")
        one_size = all(len({e["n_params"] for e in v}) < 2 for v in plan.throughput.values())
        how = ("scaled by parameter count, so long for a larger model: its start-up share is smaller"
               if one_size else "start-up cost + cost per parameter fitted")
        lines.append(f"  (from exports timed here: {', '.join(measured)}; {how})")
    else:
        lines.append("export step times: nothing measured on this machine yet; run `l3zh-local plan --measure` "
                     "(exports the demo model, a few minutes) or any export")
    lines.append("")
    lines.append(f"memory by context and KV cache type ({plan.table_quant} weights "
                 f"{gib(plan.table[0].weights)}):")
    lines.append(memory.format_table(plan.table, budget=budget, native=plan.shape.context_length))
    return "\n".join(lines)
