"""Read a GGUF's header: metadata and tensor types, without the vocabulary arrays.

gguf-py's GGUFReader builds a Python object for every element of every array, which takes ~5 s per file for a
Llama-3 vocabulary (128k tokens, 280k merges); the export reads headers after each step, so this walks the header
once, keeps scalars and short arrays, and steps over long arrays. The value types are gguf-py's named constants.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

from gguf import GGUF_MAGIC, GGUFValueType

from .errors import InputError

_SHORT_ARRAY = 64  # arrays longer than this (the vocabulary) are skipped, not decoded
# struct formats of the scalar value types (GGUF is little-endian)
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class _Cursor:
    def __init__(self, fh):
        self.fh = fh
        self.skipped_lengths: list[int] = []  # lengths of the long arrays stepped over, in order

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.fh.read(size)
        if len(data) != size:
            raise ValueError("unexpected end of file")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        return self.fh.read(self.unpack("<Q")).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.fh.seek(self.unpack("<Q"), 1)

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[GGUFValueType(vtype)])
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if count <= _SHORT_ARRAY:
                return [self.value(item_type) for _ in range(count)]
            self.skipped_lengths.append(count)
            if item_type in _SCALARS:
                self.fh.seek(struct.calcsize(_SCALARS[GGUFValueType(item_type)]) * count, 1)
            elif item_type == GGUFValueType.STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                raise ValueError(f"nested arrays of type {item_type} are not expected in a model header")
            return None  # skipped
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_metadata(path: Path) -> dict:
    """Metadata key/values of a GGUF (long arrays left out) plus `l3zh.tensor_types`: tensor type -> count,
    `l3zh.array_lengths`: long array key -> its length (the vocabulary size is the tokens' one), and
    `l3zh.tensor_data_bytes`: the bytes of tensor data (what llama.cpp maps into memory)."""
    import gguf

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if struct.unpack("<I", fh.read(4).ljust(4, b"\0"))[0] != GGUF_MAGIC:
                raise ValueError("no GGUF magic at the start")
            cur = _Cursor(fh)
            version = cur.unpack("<I")
            n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
            meta: dict = {"GGUF.version": version}
            lengths: dict[str, int] = {}
            for _ in range(n_kv):
                key = cur.string()
                skipped = len(cur.skipped_lengths)
                value = cur.value(cur.unpack("<I"))
                if value is not None:
                    meta[key] = value
                elif len(cur.skipped_lengths) > skipped:
                    lengths[key] = cur.skipped_lengths[-1]
            types: Counter[str] = Counter()
            for _ in range(n_tensors):
                cur.skip_string()
                n_dims = cur.unpack("<I")
                fh.seek(8 * n_dims, 1)
                types[gguf.GGMLQuantizationType(cur.unpack("<I")).name] += 1
                cur.unpack("<Q")  # data offset
            # Tensor data starts at the next multiple of the alignment after the tensor infos.
            alignment = int(meta.get("general.alignment", 32))
            data_start = -(-fh.tell() // alignment) * alignment
            size = path.stat().st_size
    except (OSError, ValueError, struct.error) as exc:
        raise InputError(f"{path} is not a readable GGUF file ({exc})") from None
    meta["l3zh.tensor_types"] = dict(types)
    meta["l3zh.array_lengths"] = lengths
    meta["l3zh.tensor_data_bytes"] = max(0, size - data_start)
    return meta


def file_type_name(meta: dict) -> str:
    """general.file_type as the lower-case name users know (q4_k_m, bf16, ...)."""
    import gguf

    value = meta.get("general.file_type")
    if value is None:
        return "unknown"
    name = gguf.LlamaFileType(value).name  # e.g. MOSTLY_Q4_K_M, ALL_F32
    return name.split("_", 1)[1].lower()
