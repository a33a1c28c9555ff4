"""Importance matrices: computed layer by layer from the HF weights, stored in llama.cpp's own imatrix format.

llama.cpp's quantizer can weigh each weight's rounding error by how large its input column's activations are: the
mean of x_j^2 over calibration tokens. llama.cpp's ``llama-imatrix`` collects, per weight tensor, the sum of x_j^2 for
each input column and the number of rows (tokens) seen; ``llama-quantize`` divides one by the other and hands the
means to ``llama_model_quantize``. We compute the same statistic without a C++ build by running the Llama decoder
ourselves in torch (fp32), one layer at a time, straight from the safetensors files: only one layer's weights (0.9 GB
for Llama-3-8B) and the hidden states of the calibration tokens are in memory, never the whole model.

Files: ``<stem>.imatrix.gguf`` has the GGUF layout llama-imatrix writes (llama-quantize and ``llama-imatrix
--in-file`` read it); ``export --imatrix FILE`` reads that layout and llama.cpp's older ``.dat`` one.

Measured on the demo model (SmolLM2-135M): without an imatrix its q4_k_m answers "What is the capital of France?"
with nonsense; with one, "The capital of France is Paris." (see benchmarks/).
"""

from __future__ import annotations

import ctypes
import math
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import InputError

# llama-imatrix's default context: the calibration tokens are cut into chunks this long, each seen on its own.
CHUNK_TOKENS = 512
# About 2 * n_params * tokens FLOPs: an 8B model over 4096 tokens is ~6e13, minutes on a laptop CPU (fp32 matrix
# products run at roughly 100-400 GFLOP/s there); the packaged calibration text is shorter (1.2k Llama-3 tokens).
DEFAULT_MAX_TOKENS = 4096
# llama-imatrix skips matrix products over fewer rows than this; a shorter last chunk would add little.
_MIN_CHUNK_TOKENS = 16
PACKAGED_CALIBRATION = "l3zh_local/data/calibration.txt"

_ATTN_IN = ("attn_q", "attn_k", "attn_v")  # these three read the same normed hidden state
_FFN_IN = ("ffn_gate", "ffn_up")
# llama.cpp's names of a block's linear layers -> HF Llama's module names.
_HF_LINEAR = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
OUTPUT = "output.weight"

# The keys llama-quantize writes into the GGUFs it quantizes with an importance matrix.
KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_ENTRIES = "quantize.imatrix.entries_count"
KV_CHUNKS = "quantize.imatrix.chunks_count"


def default_calibration_text() -> str:
    """Mixed Chinese/English calibration text written for this project (chat turns, prose, code, numbers)."""
    return resources.files("l3zh_local").joinpath("data/calibration.txt").read_text(encoding="utf-8")


@dataclass
class ImportanceMatrix:
    """Per GGUF weight tensor: the sum of x^2 per input column and the row count, as llama-imatrix keeps them.

    A legacy .dat file stores means times its chunk count, with that count; the quotient is the mean all the same.
    """

    sums: dict[str, np.ndarray]  # float32, one value per input column
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    file_name: str = ""  # what the quantized GGUF records as quantize.imatrix.file

    def means(self) -> dict[str, np.ndarray]:
        """What llama_model_quantize expects: sum / count (all ones where nothing was counted, as llama-quantize)."""
        return {name: (self.sums[name] / self.counts[name] if self.counts[name] > 0
                       else np.ones_like(self.sums[name])).astype(np.float32)
                for name in sorted(self.sums)}

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)


def layer_tensor_names(config: dict) -> dict[str, int]:
    """The GGUF names of a Llama model's linear layers -> their number of input columns."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    columns = {"attn_q": hidden, "attn_k": hidden, "attn_v": hidden, "attn_output": heads * head_dim,
               "ffn_gate": hidden, "ffn_up": hidden, "ffn_down": config["intermediate_size"]}
    names = {f"blk.{i}.{kind}.weight": n for i in range(config["num_hidden_layers"]) for kind, n in columns.items()}
    return names | {OUTPUT: hidden}


# -- computing -------------------------------------------------------------------------------------------------------

def calibration_chunks(model_dir: Path, text: str, *, chunk_tokens: int = CHUNK_TOKENS,
                       max_tokens: int = DEFAULT_MAX_TOKENS) -> list[list[int]]:
    """The token ids each chunk is run on: like llama-imatrix, each chunk starts with BOS if the tokenizer adds one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # No token is longer than 64 characters in practice: tokenizing a whole large file only to cut it is slow.
    ids = tok(text[:max_tokens * 64], add_special_tokens=True)["input_ids"][:max_tokens]
    if len(ids) < _MIN_CHUNK_TOKENS:
        raise InputError("the calibration text is too short for an importance matrix: give a few pages of text")
    bos = tok.bos_token_id if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else None
    chunks = [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
    if len(chunks) > 1 and len(chunks[-1]) < _MIN_CHUNK_TOKENS:
        chunks.pop()
    if bos is not None:
        for chunk in chunks:
            chunk[0] = bos  # replaces the first token, as llama-imatrix does
    return chunks


def compute_imatrix(model_dir: Path, text: str, *, chunk_tokens: int = CHUNK_TOKENS,
                    max_tokens: int = DEFAULT_MAX_TOKENS, dataset: str = PACKAGED_CALIBRATION,
                    progress: bool = True) -> ImportanceMatrix:
    """Run the decoder over the calibration text one layer at a time and collect llama-imatrix's statistic."""
    import torch
    from tqdm import tqdm

    from .hfmodel import inspect_model

    info = inspect_model(model_dir, allow_pickle=True)  # the caller has already accepted the source
    config = info.config
    chunks = calibration_chunks(model_dir, text, chunk_tokens=chunk_tokens, max_tokens=max_tokens)
    spans, start = [], 0
    for chunk in chunks:
        spans.append((start, start + len(chunk)))
        start += len(chunk)
    weights = _TensorReader(info)
    n_layers = config["num_hidden_layers"]
    stats = _Stats()
    with torch.inference_mode(), tqdm(total=n_layers * len(chunks), unit="chunk", leave=False,
                                       desc=f"importance matrix ({start} tokens)",
                                       disable=not progress or None) as bar:
        # All tokens' hidden states are carried from layer to layer; they are small next to one layer's weights.
        hidden = weights.rows("model.embed_tokens.weight", [t for chunk in chunks for t in chunk])
        rope = _rotary_tables(config, max(len(c) for c in chunks))
        for i in range(n_layers):
            layer = _DecoderLayer(weights, config, i)
            for a, b in spans:
                hidden[a:b] = layer(hidden[a:b], rope, stats)
                bar.update()
            del layer
        # The decoder's normed output is lm_head's input. A tied model has no output.weight in its GGUF (llama.cpp
        # reads token_embd there, and llama-imatrix does not collect it), so there is nothing to record then.
        if weights.has("lm_head.weight"):
            stats.add((OUTPUT,), _rms_norm(hidden, weights.get("model.norm.weight"), _eps(config)))
    return ImportanceMatrix(
        sums={name: s.to(torch.float32).numpy() for name, s in stats.sums.items()}, counts=dict(stats.counts),
        datasets=[dataset], chunk_count=len(chunks), chunk_size=chunk_tokens,
    )


class _Stats:
    def __init__(self):
        self.sums: dict = {}
        self.counts: dict[str, int] = {}

    def add(self, names: tuple[str, ...], x) -> None:
        import torch

        square_sum = (x * x).sum(dim=0, dtype=torch.float64)  # float64: thousands of rows are added up
        for name in names:
            self.sums[name] = self.sums[name] + square_sum if name in self.sums else square_sum
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]


class _TensorReader:
    """Single tensors, or some rows of one, read from the model's weight files without loading the rest."""

    def __init__(self, info):
        self._where: dict[str, Path] = {}
        self._pickles: dict[Path, dict] = {}
        for f in info.safetensors:
            for name in f.tensors:
                self._where[name] = f.path
        if not info.safetensors:  # --allow-pickle sources: torch maps the file and reads pages on demand
            import torch

            for path in info.weight_files:
                try:
                    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except Exception as exc:  # torch raises several types for old or odd pickles
                    raise InputError(f"cannot read {path} for the importance matrix ({exc}); convert the weights to "
                                     "safetensors or pass --no-imatrix") from None
                self._pickles[path] = state
                self._where.update(dict.fromkeys(state, path))

    def has(self, name: str) -> bool:
        return name in self._where

    def _path(self, name: str) -> Path:
        if name not in self._where:
            raise InputError(f"the model's weights have no tensor {name}; is the download complete?")
        return self._where[name]

    def get(self, name: str):
        from safetensors import safe_open

        path = self._path(name)
        if path in self._pickles:
            return self._pickles[path][name].float()
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name).float()

    def rows(self, name: str, ids: list[int]):
        """Rows `ids` of a 2-D tensor (the embedding: a few thousand of its 128k rows)."""
        import torch
        from safetensors import safe_open

        path = self._path(name)
        wanted = sorted(set(ids))
        if path in self._pickles:
            table = self._pickles[path][name][wanted].float()
        else:
            parts = []
            with safe_open(path, framework="pt") as f:
                tensor = f.get_slice(name)
                run_start = prev = wanted[0]
                for i in wanted[1:]:  # read consecutive ids as one slice
                    if i != prev + 1:
                        parts.append(tensor[run_start:prev + 1].float())
                        run_start = i
                    prev = i
                parts.append(tensor[run_start:prev + 1].float())
            table = torch.cat(parts)
        return table[torch.searchsorted(torch.tensor(wanted), torch.tensor(ids))]


def _eps(config: dict) -> float:
    return float(config.get("rms_norm_eps", 1e-6))


def _rms_norm(x, weight, eps: float):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_settings(config: dict) -> tuple[float, dict]:
    # Older configs have rope_theta and rope_scaling; transformers 5 writes both into rope_parameters.
    scaling = {**(config.get("rope_parameters") or {}), **(config.get("rope_scaling") or {})}
    theta = config.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    return float(theta), scaling


def _rotary_tables(config: dict, n_positions: int):
    """cos and sin (positions x head_dim) of Llama's rotary embedding, with Llama-3.1's frequency scaling."""
    import torch

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta, scaling = _rope_settings(config)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind != "default":
        inv_freq, attention_factor = _transformers_inv_freq(config)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq.to(torch.float64))
    angles = torch.cat([angles, angles], dim=-1)  # HF's layout: the two halves of each head rotate together
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def _llama3_inv_freq(inv_freq, scaling: dict):
    """Llama-3.1's scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    import torch

    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((old_context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    scaled = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(wavelength < old_context / high, inv_freq,
                       torch.where(wavelength > old_context / low, inv_freq / factor, scaled))


def _transformers_inv_freq(config: dict):
    """Other rope types (yarn, dynamic, ...): transformers' own initialisation, whatever its version."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(**config)
    _, scaling = _rope_settings(config)
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind not in ROPE_INIT_FUNCTIONS:
        raise InputError(f"the model's rope scaling type {kind!r} is unknown to this transformers version; "
                         "upgrade transformers or pass --no-imatrix")
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf_config, torch.device("cpu"))
    return inv_freq.to(torch.float64), float(attention_factor)


def _rotate(x, cos, sin):
    """HF Llama's rotary embedding: the first half of each head pairs with the second."""
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class _DecoderLayer:
    """One Llama decoder layer in fp32, recording the input of each of its linear layers."""

    def __init__(self, weights: _TensorReader, config: dict, index: int):
        prefix = f"model.layers.{index}."
        self.blk = f"blk.{index}."
        self.eps = _eps(config)
        self.n_heads = config["num_attention_heads"]
        self.n_kv = config.get("num_key_value_heads") or self.n_heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.n_heads
        self.norm_in = weights.get(prefix + "input_layernorm.weight")
        self.norm_ffn = weights.get(prefix + "post_attention_layernorm.weight")
        self.w, self.b = {}, {}
        for kind, module in _HF_LINEAR.items():
            self.w[kind] = weights.get(f"{prefix}{module}.weight")
            bias = f"{prefix}{module}.bias"  # attention_bias / mlp_bias configs
            self.b[kind] = weights.get(bias) if weights.has(bias) else None

    def _linear(self, kind: str, x):
        import torch.nn.functional as F

        return F.linear(x, self.w[kind], self.b[kind])

    def __call__(self, h, rope, stats: _Stats):
        import torch.nn.functional as F

        n = h.shape[0]
        cos, sin = rope[0][:n], rope[1][:n]
        x = _rms_norm(h, self.norm_in, self.eps)
        stats.add(tuple(self.blk + k + ".weight" for k in _ATTN_IN), x)
        q = self._linear("attn_q", x).view(n, self.n_heads, self.head_dim).transpose(0, 1)
        k = self._linear("attn_k", x).view(n, self.n_kv, self.head_dim).transpose(0, 1)
        v = self._linear("attn_v", x).view(n, self.n_kv, self.head_dim).transpose(0, 1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if self.n_kv != self.n_heads:  # grouped-query attention: each KV head serves a run of query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=0)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=0)
        # A batch dimension of 1: with 3-D inputs torch's CPU attention takes a path five times slower.
        attn = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        attn = attn.transpose(0, 1).reshape(n, -1)
        stats.add((self.blk + "attn_output.weight",), attn)
        h = h + self._linear("attn_output", attn)
        x = _rms_norm(h, self.norm_ffn, self.eps)
        stats.add(tuple(self.blk + k + ".weight" for k in _FFN_IN), x)
        act = F.silu(self._linear("ffn_gate", x)) * self._linear("ffn_up", x)
        stats.add((self.blk + "ffn_down.weight",), act)
        return h + self._linear("ffn_down", act)


# -- files -----------------------------------------------------------------------------------------------------------

def save_imatrix(path: Path, matrix: ImportanceMatrix) -> None:
    """Write `matrix` in llama-imatrix's GGUF layout: sums and counts per tensor, entries sorted by name."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    # The writer always starts with general.architecture; llama-imatrix's files have none.
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array("imatrix.datasets", list(matrix.datasets) or [""])
    writer.add_uint32("imatrix.chunk_count", matrix.chunk_count)
    writer.add_uint32("imatrix.chunk_size", matrix.chunk_size)
    for name in sorted(matrix.sums):
        # numpy shapes are ggml's ne reversed: in_sum2 is ne [columns, 1 matrix], counts ne [1, 1].
        writer.add_tensor(f"{name}.in_sum2", np.asarray(matrix.sums[name], dtype=np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[matrix.counts[name]]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_imatrix(path: Path) -> ImportanceMatrix:
    """Read an importance matrix in llama.cpp's GGUF layout or its legacy .dat layout."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InputError(f"cannot read the importance matrix {path}: {exc.strerror or exc}") from None
    matrix = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    bad = next((name for name, v in matrix.sums.items() if not np.isfinite(v).all()), None)
    if bad:
        raise InputError(f"{path} holds non-finite values for {bad}: it is damaged; make the importance matrix again")
    matrix.file_name = path.name
    return matrix


def _read_gguf(path: Path) -> ImportanceMatrix:
    import gguf

    from .ggufmeta import read_metadata

    # A model GGUF given by mistake is told apart from its header: GGUFReader would spend a minute decoding its
    # vocabulary first.
    try:
        header = read_metadata(path)
    except InputError:
        header = {}  # damaged: GGUFReader below says how
    kind = header.get("general.type")
    if kind not in (None, "imatrix") or (kind is None and "general.architecture" in header):
        raise InputError(f"{path} is a GGUF {kind or 'model'} file, not an importance matrix; give the .imatrix.gguf "
                         "file that llama-imatrix or l3zh-local wrote")
    try:
        reader = gguf.GGUFReader(path)
        fields = {name: f.contents() for name, f in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError... on damaged files
        raise InputError(f"{path} is a damaged GGUF file ({exc}); make the importance matrix again") from None
    sums, counts = {}, {}
    for tname, tensor in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname.removesuffix(".in_sum2")
        count = tensors.get(name + ".counts")
        if count is None:
            raise InputError(f"{path} has sums but no counts for {name}: it is damaged; make it again")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or count.tensor_type != gguf.GGMLQuantizationType.F32:
            raise InputError(f"{path}: the sums and counts of {name} are not F32; it is not an importance matrix")
        if count.n_elements != 1:
            raise InputError(f"{path} has {count.n_elements} matrices for {name} (a mixture-of-experts model's "
                             "matrix); it was made for another model")
        sums[name] = np.array(tensor.data, dtype=np.float32).reshape(-1)
        counts[name] = int(round(float(np.asarray(count.data).reshape(-1)[0])))
    if not sums:
        kind = fields.get("general.type") or fields.get("general.architecture") or "unknown"
        raise InputError(f"{path} is a GGUF file but not an importance matrix (type {kind!r}, no .in_sum2 tensors); "
                         "give the .imatrix.gguf file that llama-imatrix or l3zh-local wrote")
    datasets = fields.get("imatrix.datasets") or []
    return ImportanceMatrix(sums=sums, counts=counts, datasets=[str(d) for d in datasets],
                            chunk_count=int(fields.get("imatrix.chunk_count") or 0),
                            chunk_size=int(fields.get("imatrix.chunk_size") or 0))


def _read_legacy(path: Path) -> ImportanceMatrix:
    """llama.cpp's .dat layout, little-endian: int32 entry count; per entry int32 name length, the name, int32 chunk
    count, int32 value count, the float32 values (each mean times the chunk count); then, optionally, int32 chunk
    count and int32 length + the dataset name."""
    data = path.read_bytes()
    neither = (f"{path} is neither an importance matrix GGUF nor a legacy .dat imatrix file ({{}}); give the file "
               "llama-imatrix or l3zh-local wrote")
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError("it ends too early")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    try:
        (n_entries,) = take("<i")
        if not 0 < n_entries <= 1_000_000:
            raise ValueError(f"it announces {n_entries} entries")
        sums, counts = {}, {}
        for _ in range(n_entries):
            (length,) = take("<i")
            if not 0 < length <= 4096:
                raise ValueError(f"a tensor name {length} bytes long")
            name = data[pos:pos + length].decode("utf-8")
            pos += length
            ncall, nval = take("<ii")
            if not 0 < nval <= 1 << 28:
                raise ValueError(f"{nval} values for {name}")
            if pos + 4 * nval > len(data):
                raise ValueError(f"the values of {name} are cut off")
            sums[name] = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
            pos += 4 * nval
            counts[name] = ncall if ncall > 0 else 1  # llama-quantize takes the values as they are then
        chunk_count, datasets = 0, []
        if len(data) - pos >= 4:  # the trailer is optional
            (chunk_count,) = take("<i")
            if len(data) - pos >= 4:
                (length,) = take("<i")
                if 0 < length <= len(data) - pos:
                    datasets.append(data[pos:pos + length].decode("utf-8", errors="replace"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(neither.format(exc)) from None
    return ImportanceMatrix(sums=sums, counts=counts, datasets=datasets, chunk_count=max(chunk_count, 0))


def check_fits(matrix: ImportanceMatrix, config: dict, source: Path | str) -> None:
    """Refuse a matrix made for another model: every linear layer present, with this model's column counts."""
    expected = layer_tensor_names(config)
    for name, values in sorted(matrix.sums.items()):
        if name not in expected:
            raise InputError(f"{source} has an entry for {name}, which this model does not have: it was made for "
                             "another model; make one for this model (leave out --imatrix FILE)")
        if values.size != expected[name]:
            raise InputError(f"{source}: {name} has {values.size} columns, this model's has {expected[name]}: it was "
                             "made for another model; make one for this model (leave out --imatrix FILE)")
    missing = [name for name in expected if name != OUTPUT and name not in matrix.sums]
    if missing:
        raise InputError(f"{source} has no entry for {missing[0]} ({len(missing)} missing): it is incomplete or "
                         "for another model; make one for this model (leave out --imatrix FILE)")


# -- handing it to libllama ------------------------------------------------------------------------------------------

class ImatrixParam:
    """The NULL-terminated C arrays libllama reads (the means and the KVs llama-quantize records with them); keeps
    the buffers alive while they are in use."""

    def __init__(self, matrix: ImportanceMatrix):
        import llama_cpp

        self._buffers = [(name.encode(), values) for name, values in matrix.means().items()]
        self._array = (llama_cpp.llama_model_imatrix_data * (len(self._buffers) + 1))()
        for slot, (name, values) in zip(self._array, self._buffers):
            slot.name = name
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = values.size
        self._array[len(self._buffers)].name = None  # terminator
        self.pointer = ctypes.cast(self._array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))

        kvs: list[tuple[str, str | int]] = []
        if matrix.file_name:
            kvs.append((KV_FILE, matrix.file_name))
        if matrix.datasets:
            kvs.append((KV_DATASET, matrix.datasets[0]))
        kvs.append((KV_ENTRIES, len(self._buffers)))
        if matrix.chunk_count > 0:
            kvs.append((KV_CHUNKS, matrix.chunk_count))
        self._overrides = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()  # zeroed: the last is the end
        for slot, (key, value) in zip(self._overrides, kvs):
            slot.key = key.encode()
            if isinstance(value, str):
                slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                slot.value.val_str = _c_string(value, 127)
            else:
                slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                slot.value.val_i64 = value
        self.kv_overrides = ctypes.cast(self._overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))


def _c_string(text: str, max_bytes: int) -> bytes:
    """UTF-8, cut to fit a fixed C buffer without splitting a character."""
    return text.encode()[:max_bytes].decode("utf-8", errors="ignore").encode()
