"""Streaming, exact LoRA merge: W' = W + scale * (B @ A), one tensor at a time, shard by shard.

PEFT's ``merge_and_unload`` needs the whole model in memory. Here each base shard is read tensor by tensor with
plain file reads at the offsets its safetensors header gives, and the output shard is written as we go with the
*same* header: a merged tensor keeps its name, dtype and shape, so its bytes land at the same offsets. Untouched
tensors are copied byte for byte. Peak memory is one tensor's float32 copy plus the adapter, not the model.

Semantics follow PEFT (checked against peft 0.21.2, and tested against its ``merge_and_unload``):

- ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and ``lora_alpha`` per
  module from ``rank_pattern`` / ``alpha_pattern``: a pattern key ``k`` applies to module name ``m`` when
  ``re.match(rf"(.*\\.)?({k})$", m)`` matches; the first matching key wins.
- The delta is computed in float32 from the adapter's tensors, added to the float32 base weight, and cast back to
  the base dtype once (PEFT with an fp32-autocast adapter does the same).
- ``lora_B.bias`` (``lora_bias=True``) is added, times scale, to the base layer's bias.
- Embedding LoRA (``lora_embedding_A`` [r, vocab], ``lora_embedding_B`` [dim, r]): delta = (B @ A)^T * scale.
- ``fan_in_fan_out`` transposes the delta only where the base weight is stored [in, out] (GPT-2 Conv1D). PEFT
  itself turns the flag off for ``nn.Linear`` layers, which is every layer of a Llama model, so there it is ignored.
- Full tensors saved in the adapter (``modules_to_save``, and the ``base_layer.weight`` PEFT saves when an
  embedding is targeted) replace the base tensors, cast to the base dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, OutputExists
from .files import ensure_free_space, ensure_writable_dir, human_size, read_json, sha256_file
from .hfmodel import ModelInfo, inspect_model, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
INDEX_NAME = "model.safetensors.index.json"
_PEFT_PREFIX = "base_model.model."
# Tokenizer files a fine-tuning tool saves beside the adapter; they describe how the fine-tune was trained
# (its chat template above all), so they take precedence over the base model's.
_ADAPTER_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
)
# Files in the base folder that are weights (rewritten or refused), not copied as they are.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")
# LoRA variants whose adapter file cannot be merged by W + scale * B @ A onto the original base.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora) adapters",
    "use_qalora": "QA-LoRA (use_qalora) adapters",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) adapters",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable-token adapters (trainable_token_indices)",
    "layer_replication": "layer-replicating adapters (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which cannot be merged,",
    "arrow_config": "Arrow routing adapters (arrow_config)",
    "monteclora_config": "MonteCLoRA adapters",
    "kasa_config": "KaSA adapters",
}
# Initialisations that rewrite the base weights during training: such an adapter belongs to a residual base
# model, not to the original one, unless it was converted back when saved (PEFT then records `true`).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_COPY_CHUNK = 16 * 1024**2


@dataclass
class LoraPair:
    """One low-rank update: which base tensor it changes and how."""

    module: str  # module name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    target: str  # base tensor it changes, e.g. "model.layers.0.self_attn.q_proj.weight"
    a_key: str
    b_key: str
    transposed: bool  # delta = (B @ A)^T: embedding LoRA, or fan_in_fan_out onto an [in, out] weight
    rank: int
    scale: float = 0.0
    bias_key: str | None = None  # lora_B.bias, added to the base layer's bias


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder, indexed: what it changes in the base, by tensor name."""

    path: Path
    config: dict
    weights: Path
    tensors: dict[str, dict]  # adapter tensor name -> safetensors header entry
    pairs: dict[str, LoraPair]  # base weight name -> update
    biases: dict[str, LoraPair]  # base bias name -> update whose lora_B.bias applies to it
    replacements: dict[str, str]  # base tensor name -> adapter tensor name (full tensor)


@dataclass
class MergeReport:
    """What a merge did; printed by the CLI and recorded in export manifests."""

    out_dir: Path
    lora_pairs_applied: int
    tensors_changed: int  # tensors whose bytes differ from the base
    tensors_replaced: int  # full tensors taken from the adapter (modules_to_save)
    output_shards: list[str]
    base_bytes: int
    largest_shard_bytes: int
    adapter_bytes: int
    adapter_sha256: str
    largest_merged_tensor_bytes: int  # float32 working copy: what the merge holds in memory beside the adapter
    files_copied: list[str] = field(default_factory=list)
    files_from_adapter: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"merged {self.lora_pairs_applied} LoRA pairs and {self.tensors_replaced} saved modules into "
            f"{self.out_dir}: {self.tensors_changed} tensors changed, {len(self.output_shards)} shard(s), "
            f"{human_size(self.base_bytes)}, {self.seconds:.1f} s"
        )


def merge_lora(
    base_dir: Path | str,
    adapter_dir: Path | str,
    out_dir: Path | str,
    *,
    force: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> MergeReport:
    """Merge the LoRA adapter in `adapter_dir` into the model in `base_dir`, writing a full HF folder to `out_dir`.

    Both inputs may be local folders or hub ids. Everything is checked before any weight is written; a mismatch
    raises InputError with one line. `force` overwrites an existing `out_dir` and goes on when the adapter
    records another base model than the one given (the warning stays in the report). The output appears under
    its final name only when complete. Fails if the adapter changed no tensor.
    """
    started = time.monotonic()
    base_given = str(base_dir)
    base_dir = _resolve(base_dir, "base model", allow_pickle=False)
    adapter_dir = _resolve(adapter_dir, "adapter", allow_pickle=allow_pickle)
    out_dir = Path(out_dir)
    info = inspect_model(base_dir)
    if any(p.suffix != ".safetensors" for p in info.weight_files):
        raise InputError(f"{base_dir} has only pickle weights; the merge reads safetensors: convert the base first")
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    try:
        return _merge_checked(info, adapter, out_dir, base_given=base_given, force=force, progress=progress,
                              started=started)
    finally:
        if adapter.weights.parent != adapter.path:  # the temporary safetensors copy of an adapter_model.bin
            shutil.rmtree(adapter.weights.parent, ignore_errors=True)


def _merge_checked(info: ModelInfo, adapter: LoraAdapter, out_dir: Path, *, base_given: str, force: bool,
                   progress: bool, started: float) -> MergeReport:
    warnings = check_adapter_fits(info, adapter, base_given=base_given, force=force)
    _check_changes_something(adapter)
    _check_out_dir(out_dir, info.path, adapter.path, force=force)

    ensure_writable_dir(out_dir.parent)
    ensure_free_space(out_dir.parent, info.weight_bytes, "the merged model")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by a killed run; never looks finished
    partial.mkdir()
    try:
        stats = _write_merged(info, adapter, partial, progress=progress)
        if stats.changed == 0:
            raise InputError(
                f"the adapter {adapter.path} changes nothing in {info.path} (every update rounds away in "
                f"{info.weight_dtype}); check that it is the trained adapter"
            )
        copied, from_adapter = _copy_side_files(info.path, adapter.path, partial)
        _publish(partial, out_dir, force=force)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    given_weights = adapter_weights_file(adapter.path, allow_pickle=True)
    return MergeReport(
        out_dir=out_dir,
        lora_pairs_applied=len(adapter.pairs),
        tensors_changed=stats.changed,
        tensors_replaced=len(adapter.replacements),
        output_shards=[p.name for p in info.weight_files],
        base_bytes=info.weight_bytes,
        largest_shard_bytes=max(p.stat().st_size for p in info.weight_files),
        adapter_bytes=given_weights.stat().st_size,
        adapter_sha256=sha256_file(given_weights),
        largest_merged_tensor_bytes=stats.largest_merged_bytes,
        files_copied=copied,
        files_from_adapter=from_adapter,
        warnings=warnings,
        seconds=time.monotonic() - started,
    )


# --- inputs -------------------------------------------------------------------------------------------------


def _resolve(source: Path | str, what: str, *, allow_pickle: bool) -> Path:
    """A local folder, or a hub id (Hugging Face, or modelscope:<id>) fetched into the hub's cache."""
    from . import sources

    path = sources.resolve(str(source), allow_pickle=allow_pickle).path
    if not path.is_dir():
        raise InputError(f"{what} {source} is not a folder; give a local {what} folder or a hub id (org/name)")
    return path


def load_adapter(adapter_dir: Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read a PEFT LoRA adapter's config and tensor index (no weights yet), refusing what cannot be merged.

    An adapter_model.bin (with allow_pickle) is read with torch's weights-only loader into a temporary
    safetensors file; `merge_lora` removes it when done.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_weights_file(adapter_dir, allow_pickle=allow_pickle)
    if weights.name == ADAPTER_PICKLE:
        weights = _pickle_to_safetensors(weights)
    tensors = read_safetensors_header(weights).tensors
    pairs, biases, replacements = _index_tensors(tensors, config, weights)
    return LoraAdapter(adapter_dir, config, weights, tensors, pairs, biases, replacements)


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, refusing PEFT types and LoRA variants that cannot be merged into the weights."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputError(f"adapter {adapter_dir} is not a folder; give the folder with {ADAPTER_CONFIG}")
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise InputError(f"{adapter_dir} is not a PEFT adapter: {ADAPTER_CONFIG} is missing")
    config = read_json(config_path)
    _check_config(config, adapter_dir)
    return config


def adapter_weights_file(adapter_dir: Path, *, allow_pickle: bool = False) -> Path:
    """The adapter's weights as the user gave them: adapter_model.safetensors, or (if allowed) adapter_model.bin."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if weights.is_file():
        return weights
    pickle = Path(adapter_dir) / ADAPTER_PICKLE
    if not pickle.is_file():
        raise InputError(f"{adapter_dir} holds no {ADAPTER_WEIGHTS}; is the adapter download complete?")
    if not allow_pickle:
        raise InputError(
            f"{adapter_dir} has only {ADAPTER_PICKLE}, a pickle that can run code when loaded: save it as "
            "safetensors, or pass --allow-pickle if you trust the source"
        )
    return pickle


def _check_config(config: dict, adapter_dir: Path) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InputError(
            f"{adapter_dir} is a {peft_type or 'non-PEFT'} adapter; only LoRA adapters (peft_type LORA) can be merged"
        )
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise InputError(f"{what} cannot be merged by l3zh-local; merge {adapter_dir} with PEFT instead")
    init = str(config.get("init_lora_weights", "true")).lower()
    if init.startswith(_BASE_REWRITING_INITS):
        raise InputError(
            f"{adapter_dir} was initialised with {init}, which rewrites the base weights; save it with PEFT's "
            "path_initial_model_for_weight_conversion to get a plain LoRA, then merge that"
        )
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise InputError(f"{adapter_dir}/{ADAPTER_CONFIG} has no valid rank r")


def _pickle_to_safetensors(path: Path) -> Path:
    """Load adapter_model.bin with torch's weights-only loader (no code runs) into a temporary safetensors file."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler refuses anything but tensors
        raise InputError(f"{path} could not be read as plain tensors ({type(exc).__name__}); re-save it") from None
    out = Path(tempfile.mkdtemp(prefix="l3zh-adapter-")) / ADAPTER_WEIGHTS
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def _module_key(name: str) -> str:
    """Adapter tensor name -> base model name: drop PEFT's wrapper prefix and adapter-name infixes."""
    name = name.removeprefix(_PEFT_PREFIX)
    for infix in (".modules_to_save.default.", ".modules_to_save.", ".original_module."):
        name = name.replace(infix, ".")
    return name


_LORA_SUFFIX = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.default)?(?P<tail>\.weight|\.bias)?$"
)


def _index_tensors(tensors: dict, config: dict, weights: Path):
    found: dict[str, dict[str, str]] = {}  # module -> {"A", "B", "bias", "emb"} adapter tensor names
    replacements: dict[str, str] = {}
    for name in tensors:
        key = _module_key(name)
        match = _LORA_SUFFIX.match(key)
        if match is None:
            if ".lora_" in key or key.endswith("lora_magnitude_vector"):
                raise InputError(f"{weights} holds {name}, a LoRA variant l3zh-local cannot merge")
            # A full tensor: modules_to_save, or the embedding PEFT saves as `<module>.base_layer.weight`.
            replacements[key.replace(".base_layer.", ".")] = name
            continue
        module, part, tail = match["module"], match["part"], match["tail"] or ""
        slot = found.setdefault(module, {})
        if part.startswith("lora_embedding"):
            slot["emb"] = "1"
        if part.endswith("B") and tail == ".bias":
            slot["bias"] = name
        else:
            slot[part[-1]] = name

    pairs: dict[str, LoraPair] = {}
    biases: dict[str, LoraPair] = {}
    for module, slot in sorted(found.items()):
        if "A" not in slot or "B" not in slot:
            raise InputError(f"{weights} is incomplete: {module} has lora_{'B' if 'A' in slot else 'A'} but not its "
                             "pair")
        rank = tensors[slot["A"]]["shape"][0]
        pair = LoraPair(
            module=module, target=f"{module}.weight", a_key=slot["A"], b_key=slot["B"],
            transposed="emb" in slot, rank=rank, bias_key=slot.get("bias"),
        )
        pair.scale = _scale_for(module, rank, config, weights)
        pairs[pair.target] = pair
        if pair.bias_key:
            biases[f"{module}.bias"] = pair
    return pairs, biases, replacements


def pattern_key(patterns, module: str) -> str | None:
    """The rank_pattern / alpha_pattern key that applies to `module`, with PEFT's matching rule, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _scale_for(module: str, rank: int, config: dict, weights: Path) -> float:
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = pattern_key(rank_pattern, module)
    a_key = pattern_key(alpha_pattern, module)
    r = rank_pattern[r_key] if r_key is not None else config["r"]
    alpha = alpha_pattern[a_key] if a_key is not None else config.get("lora_alpha", 8)
    if r != rank:
        raise InputError(
            f"{weights}: {module} has rank {rank} but adapter_config.json says {r}; the config does not belong to "
            "these weights"
        )
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# --- validation ---------------------------------------------------------------------------------------------


def check_adapter_fits(info: ModelInfo, adapter: LoraAdapter, *, base_given: str, force: bool) -> list[str]:
    """Refuse an adapter that does not fit the base; return warnings for what `force` let through."""
    base = {name: entry for f in info.safetensors for name, entry in f.tensors.items()}
    vocab = info.config.get("vocab_size")
    missing = [p.target for p in adapter.pairs.values() if p.target not in base]
    missing += [b for b in adapter.biases if b not in base]
    missing += [r for r in adapter.replacements if r not in base]
    if "lm_head.weight" in missing and info.config.get("tie_word_embeddings"):
        raise InputError(
            f"{info.path} ties lm_head to embed_tokens, but the adapter trains lm_head on its own; merge it with "
            "PEFT into an untied copy of the base"
        )
    if missing:
        raise InputError(
            f"the adapter targets {len(missing)} tensor(s) the base model lacks (first: {missing[0]}); "
            f"it was trained on another model than {info.path}"
        )
    for target, pair in adapter.pairs.items():
        _check_pair_shapes(pair, adapter, base[target]["shape"], base[target]["dtype"], vocab)
    for bias, pair in adapter.biases.items():
        assert pair.bias_key is not None  # `biases` holds only pairs with a lora_B.bias
        if adapter.tensors[pair.bias_key]["shape"] != base[bias]["shape"]:
            raise InputError(f"the adapter's LoRA bias for {pair.module} does not match the base bias shape")
    for target, name in adapter.replacements.items():
        saved, want = adapter.tensors[name]["shape"], base[target]["shape"]
        if saved != want:
            if vocab and len(saved) == 2 and saved[0] != want[0] and want[0] == vocab:
                raise InputError(
                    f"the adapter was trained with a resized vocabulary ({saved[0]} rows in {target}, the base has "
                    f"{vocab}); merge onto a base resized the same way"
                )
            raise InputError(f"the adapter's {target} has shape {saved}, the base has {want}; wrong base model?")
        if base[target]["dtype"] not in _TORCH_DTYPES:
            raise InputError(f"base tensor {target} is {base[target]['dtype']}, not a float type; is the base "
                             "quantized?")

    warnings: list[str] = []
    recorded = adapter.config.get("base_model_name_or_path")
    if recorded and not _same_base(recorded, base_given, info.path):
        message = (
            f"the adapter was trained on {recorded}, not on {base_given}"
        )
        if not force:
            raise InputError(f"{message}; pass --force if this base is the same model")
        warnings.append(message)
    return warnings


def _check_pair_shapes(pair: LoraPair, adapter: LoraAdapter, w_shape: list, w_dtype: str, vocab) -> None:
    a_shape = adapter.tensors[pair.a_key]["shape"]
    b_shape = adapter.tensors[pair.b_key]["shape"]
    if w_dtype not in _TORCH_DTYPES:
        raise InputError(f"base tensor {pair.target} is {w_dtype}, not a float type; is the base quantized?")
    if len(a_shape) != 2 or len(b_shape) != 2 or len(w_shape) != 2 or a_shape[0] != b_shape[1]:
        raise InputError(f"the adapter's A/B for {pair.module} are not a rank-r pair ({a_shape}, {b_shape})")
    if pair.transposed:  # embedding LoRA: A [r, vocab], B [dim, r]; weight [vocab, dim]
        expected = [a_shape[1], b_shape[0]]
    else:  # A: [r, in], B: [out, r]; weight [out, in], or [in, out] stored transposed (fan_in_fan_out)
        expected = [b_shape[0], a_shape[1]]
        if adapter.config.get("fan_in_fan_out") and w_shape == expected[::-1] and w_shape != expected:
            pair.transposed = True  # only Conv1D-style storage gets here; PEFT ignores the flag for nn.Linear
            expected = expected[::-1]
    if list(w_shape) != expected:
        if vocab and vocab in w_shape and vocab not in expected and max(expected) > 0:
            raise InputError(
                f"the adapter's {pair.module} was trained with a resized vocabulary ({expected} vs base {w_shape}); "
                "merge onto a base resized the same way"
            )
        raise InputError(
            f"the adapter's A/B for {pair.module} give a {expected} update but the base weight is {list(w_shape)}; "
            "wrong base model?"
        )


def _same_base(recorded: str, given: str, base_dir: Path) -> bool:
    """Does the adapter's base_model_name_or_path name the base we were given?

    The same string or folder, or the same last name: a hub id "org/name" matches a folder called "name" (or
    an HF cache folder "models--org--name"), and a training machine's "/data/name" matches a local "name".
    """
    def norm(text: str) -> str:
        return text.strip().rstrip("/").lower()

    base_dir = Path(base_dir).resolve()
    recorded_n = norm(recorded)
    if recorded_n in {norm(given), norm(str(base_dir))}:
        return True
    leaf = recorded_n.split("/")[-1]
    parts = [norm(p) for p in base_dir.parts]
    cache_name = "models--" + "--".join(recorded_n.split("/")[-2:])
    return leaf == parts[-1] or leaf == norm(Path(given).name) or cache_name in parts


def _check_changes_something(adapter: LoraAdapter) -> None:
    if not adapter.pairs and not adapter.replacements:
        raise InputError(f"the adapter {adapter.path} holds no LoRA weights and no saved modules: nothing to merge")
    if adapter.replacements:
        return
    with _TensorFile(adapter.weights, adapter.tensors) as fh:
        if all(not fh.get(p.b_key).any() for p in adapter.pairs.values()):
            raise InputError(
                f"every lora_B in {adapter.path} is zero, so it changes nothing (an untrained adapter?); "
                "give the trained adapter"
            )


def _check_out_dir(out_dir: Path, base_dir: Path, adapter_dir: Path, *, force: bool) -> None:
    out = out_dir.resolve()
    for src in (base_dir, adapter_dir):
        src = Path(src).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise InputError(f"--out {out_dir} overlaps the input {src}; choose a new folder")
    if out_dir.exists() and not force:
        raise OutputExists(f"{out_dir} already exists: pass --force to overwrite it")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; choose a folder")


# --- writing ------------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    changed: int = 0
    largest_merged_bytes: int = 0


class _TensorFile:
    """Tensors of a safetensors file read with plain reads at the header's offsets.

    Not memory-mapped on purpose: pages of a mapping stay in the process's resident set until it is closed,
    so reading a whole shard through one would cost a shard of RSS; a read copies just the tensor asked for.
    """

    def __init__(self, path: Path, tensors: dict[str, dict]):
        self.path, self.tensors = Path(path), tensors
        self.fh = open(self.path, "rb")
        (header_len,) = struct.unpack("<Q", self.fh.read(8))
        self.data_start = 8 + header_len

    def __enter__(self) -> _TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    def raw(self, name: str) -> bytearray:
        entry = self.tensors[name]
        buf = bytearray(_nbytes(entry))
        self.fh.seek(self.data_start + entry["data_offsets"][0])
        if self.fh.readinto(buf) != len(buf):
            raise InputError(f"{self.path} ended early; is the download complete?")
        return buf

    def get(self, name: str):
        import torch

        entry = self.tensors[name]
        if entry["dtype"] not in _TORCH_DTYPES:
            raise InputError(f"{self.path}: {name} is {entry['dtype']}, not a float type; is it quantized?")
        dtype = getattr(torch, _TORCH_DTYPES[entry["dtype"]])
        if _nbytes(entry) == 0:
            return torch.zeros(entry["shape"], dtype=dtype)
        return torch.frombuffer(self.raw(name), dtype=dtype).reshape(entry["shape"])


def _write_merged(info: ModelInfo, adapter: LoraAdapter, out: Path, *, progress: bool) -> _Stats:
    from tqdm import tqdm

    stats = _Stats()
    bar = tqdm(total=info.weight_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress, leave=False)
    with _TensorFile(adapter.weights, adapter.tensors) as adapter_file, bar:
        for shard in info.safetensors:
            with _TensorFile(shard.path, shard.tensors) as base_file:
                _write_shard(base_file, out / shard.path.name, adapter, adapter_file, stats, bar)
    index = info.path / INDEX_NAME
    if index.is_file():
        data = read_json(index)
        data.setdefault("metadata", {})["total_size"] = sum(
            _nbytes(t) for f in info.safetensors for t in f.tensors.values()
        )
        (out / INDEX_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return stats


def _write_shard(base: _TensorFile, dst: Path, adapter: LoraAdapter, adapter_file: _TensorFile, stats: _Stats,
                 bar) -> None:
    """Copy a base shard to `dst` with the same header, changing the bytes of the tensors the adapter touches."""
    with open(dst, "wb") as out:
        base.fh.seek(0)
        out.write(base.fh.read(base.data_start))  # the header stays valid: same names, dtypes, shapes, offsets
        position = 0
        for name, entry in sorted(base.tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            if begin != position:  # safetensors files are packed; a gap would shift everything after it
                raise InputError(f"{base.path} has an unexpected layout at {name}; re-save the base model")
            merged = _merged_bytes(name, base, adapter, adapter_file)
            if merged is None:
                base.fh.seek(base.data_start + begin)
                _copy_range(base.fh, out, end - begin)
            else:
                new_bytes, work_bytes = merged
                out.write(new_bytes)
                stats.changed += int(_differs(base, entry, new_bytes))
                stats.largest_merged_bytes = max(stats.largest_merged_bytes, work_bytes)
            position = end
            bar.update(end - begin)


def _merged_bytes(name: str, base: _TensorFile, adapter: LoraAdapter, adapter_file: _TensorFile):
    """(new bytes, float32 working bytes) of a tensor the adapter changes, else None."""
    pair = adapter.pairs.get(name)
    bias_pair = adapter.biases.get(name)
    replacement = adapter.replacements.get(name)
    if pair is None and bias_pair is None and replacement is None:
        return None
    import torch

    dtype = getattr(torch, _TORCH_DTYPES[base.tensors[name]["dtype"]])
    if pair is None and bias_pair is None:  # only a saved full tensor (modules_to_save): cast it, no float32 copy
        assert replacement is not None
        merged = adapter_file.get(replacement).to(dtype)
        return merged.contiguous().view(torch.uint8).reshape(-1).numpy(), 0
    # A saved full tensor (the embedding PEFT saves beside its LoRA) first; then the low-rank update on top.
    work = (adapter_file.get(replacement) if replacement else base.get(name)).to(torch.float32, copy=True)
    if pair is not None:
        a = adapter_file.get(pair.a_key).to(torch.float32)
        b = adapter_file.get(pair.b_key).to(torch.float32)
        if pair.transposed:  # delta = (B @ A)^T = A^T @ B^T
            work.addmm_(a.T, b.T, alpha=pair.scale)
        else:
            work.addmm_(b, a, alpha=pair.scale)
    if bias_pair is not None and bias_pair.bias_key is not None:
        work.add_(adapter_file.get(bias_pair.bias_key).to(torch.float32), alpha=bias_pair.scale)
    if not torch.isfinite(work).all():
        raise InputError(f"merging gives NaN or infinite values in {name}; the adapter is broken")
    work_bytes = work.numel() * 4
    merged = work.to(dtype)
    del work
    return merged.contiguous().view(torch.uint8).reshape(-1).numpy(), work_bytes


def _differs(base: _TensorFile, entry: dict, new_bytes) -> bool:
    """Do `new_bytes` differ from the base tensor's bytes? Compared block by block, never all in memory."""
    view = memoryview(new_bytes).cast("B")
    base.fh.seek(base.data_start + entry["data_offsets"][0])
    for start in range(0, len(view), _COPY_CHUNK):
        block = view[start:start + _COPY_CHUNK]
        if base.fh.read(len(block)) != block:
            return True
    return False


def _copy_range(src, out, length: int) -> None:
    while length > 0:
        block = src.read(min(_COPY_CHUNK, length))
        if not block:
            raise InputError(f"{src.name} ended early; is the base model download complete?")
        out.write(block)
        length -= len(block)


def _nbytes(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def _copy_side_files(base_dir: Path, adapter_dir: Path, out: Path) -> tuple[list[str], list[str]]:
    """Config, generation config, tokenizer and the rest of the base folder's small files; the adapter's
    tokenizer files on top, since the fine-tune was trained with them."""
    copied = []
    for entry in sorted(base_dir.iterdir()):
        if entry.is_file() and not entry.name.endswith(_WEIGHT_SUFFIXES) and entry.name != INDEX_NAME:
            shutil.copyfile(entry, out / entry.name)
            copied.append(entry.name)
    from_adapter = []
    for name in _ADAPTER_TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, out / name)
            from_adapter.append(name)
    return copied, from_adapter


def _publish(partial: Path, out_dir: Path, *, force: bool) -> None:
    """Rename the finished folder into place; an existing one (with force) is moved aside first, then removed."""
    old = None
    if out_dir.exists():
        if not force:
            raise OutputExists(f"{out_dir} already exists: pass --force to overwrite it")
        old = out_dir.with_name(out_dir.name + ".old-" + str(os.getpid()))
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
