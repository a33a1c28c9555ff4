"""Inspect a local Hugging Face model folder before any work is done on it.

Everything here reads headers and JSON only: no weights are loaded, no pickle is ever opened, no remote code runs.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, UnsupportedArchitecture
from .files import read_json

# The seed's models are all LlamaForCausalLM; this is what the converter path and the templates are built for.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class SafetensorsFile:
    path: Path
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}


@dataclass
class ModelInfo:
    path: Path
    config: dict
    architecture: str
    weight_files: list[Path]
    weight_dtype: str  # the dominant floating dtype of the weights: BF16, F16 or F32
    n_params: int
    uses_pickle: bool = False
    safetensors: list[SafetensorsFile] = field(default_factory=list)

    @property
    def outtype_16bit(self) -> str:
        """The 16-bit GGUF type that keeps the weights as they are: bf16 stays bf16, the rest becomes f16."""
        return "bf16" if self.weight_dtype == "BF16" else "f16"

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse a safetensors header and check that the file holds all the data it announces."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a header")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100 * 1024**2):
                raise ValueError("header length is beyond the end of the file")
            header = json.loads(fh.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a valid safetensors file ({exc}); download it again") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + end > size:
        missing = 8 + header_len + end - size
        raise InputError(f"{path} is truncated: {missing} bytes of tensor data are missing; download it again")
    return SafetensorsFile(path=path, tensors=header)


def inspect_model(path: Path, *, allow_pickle: bool = False) -> ModelInfo:
    """Check that `path` is a Llama-family HF model we can convert, and describe it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give a model folder or a hub id like "
                         "shareAI/llama3.1-8b-instruct-dpo-zh")
    if not path.is_dir():
        raise InputError(f"{path} is not a folder; give the Hugging Face model folder (with config.json)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(f"{path} is not a Hugging Face model: config.json is missing")
    config = read_json(config_path)
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else config.get("model_type", "unknown")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported architecture {arch}: l3zh-local converts Llama-family models "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise InputError(
            f"{path} holds {method}-quantized weights; convert the original 16-bit model instead "
            "(quantizing twice loses quality)"
        )

    safetensors_files = _listed_safetensors(path)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not safetensors_files and pickles and not allow_pickle:
        raise InputError(
            f"{path} has only pickle weights ({pickles[0].name}); pickles can run code when loaded: convert them to "
            "safetensors, or pass --allow-pickle if you trust the source"
        )
    if not safetensors_files and not pickles:
        raise InputError(f"{path} holds no weights (*.safetensors); is the download complete?")

    parsed = [read_safetensors_header(p) for p in safetensors_files]
    n_params = 0
    dtype_count: dict[str, int] = {}
    for f in parsed:
        for t in f.tensors.values():
            numel = 1
            for d in t["shape"]:
                numel *= d
            n_params += numel
            dtype_count[t["dtype"]] = dtype_count.get(t["dtype"], 0) + numel
    floats = {k: v for k, v in dtype_count.items() if k in ("BF16", "F16", "F32")}
    declared = str(config.get("torch_dtype") or config.get("dtype") or "F16").upper()
    weight_dtype = max(floats, key=lambda k: floats[k]) if floats else declared
    weight_dtype = {"BFLOAT16": "BF16", "FLOAT16": "F16", "FLOAT32": "F32"}.get(weight_dtype, weight_dtype)
    return ModelInfo(
        path=path, config=config, architecture=arch,
        weight_files=safetensors_files or pickles, weight_dtype=weight_dtype, n_params=n_params,
        uses_pickle=not safetensors_files, safetensors=parsed,
    )


def _listed_safetensors(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index} is not a valid safetensors index: it has no weight_map")
        shards = sorted({path / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise InputError(f"{path} is incomplete: shard {missing[0]} listed in the index is missing")
        return shards
    return sorted(path.glob("*.safetensors"))


def estimate_gguf_bytes(info: ModelInfo, bits_per_weight: float) -> int:
    """Rough size of a GGUF of this model at `bits_per_weight`, for progress bars and disk checks."""
    from .memory import gguf_file_bytes

    return gguf_file_bytes(info.n_params, bits_per_weight)
