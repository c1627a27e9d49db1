"""The safetensors bytes of a store value: written from parts without big copies, read back as views.

Written here rather than by safetensors.torch.save, which costs 1.5 ms per 1.5 MB of float32
(safetensors 0.8) and makes one more copy; tests/test_store.py checks that the safetensors
library reads every blob back the same, and that blobs it writes read back here.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from splitvlm.store.arrays import STORAGE, Raw, raw_bytes

SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "I64": "int64"}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
__all__ = ["Blob", "raw_bytes", "read_header", "safetensors_blob", "tensor_views"]


@dataclass
class Blob:
    """A safetensors blob as its parts: the length-prefixed header, then each tensor's bytes."""

    parts: list[bytes | np.ndarray]
    size: int

    def into(self, buffer: bytearray) -> memoryview:
        """The blob written at the start of buffer (reused across entries: no fresh pages to fault in)."""
        view, position = memoryview(buffer), 0
        for part in self.parts:
            n = len(part) if isinstance(part, bytes) else part.nbytes
            view[position : position + n] = part
            position += n
        return view[:position]

    def to_bytes(self) -> bytes:
        return b"".join(self.parts)


def safetensors_blob(tensors: list[tuple[str, Raw]], meta: dict[str, str]) -> Blob:
    """u64 little-endian header length, the JSON header padded with spaces to 8 bytes, tensor data.

    Give the widest dtype first: every tensor then starts aligned to its element size.
    """
    header: dict = {"__metadata__": meta}
    data, offset = [], 0
    for name, tensor in tensors:
        raw = raw_bytes(tensor)
        header[name] = {
            "dtype": SAFETENSORS_NAMES[tensor.dtype],  # a Raw's dtype name
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        data.append(raw)
        offset += raw.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return Blob([prefix, *data], len(prefix) + offset)


def read_header(blob: bytes | bytearray | memoryview) -> dict:
    """The JSON header of a safetensors blob (tensor names to dtype/shape/offsets, and __metadata__)."""
    if len(blob) < 8:
        raise ValueError(f"{len(blob)} bytes, shorter than a safetensors header")
    (size,) = struct.unpack_from("<Q", blob, 0)
    if size > len(blob) - 8:
        raise ValueError(f"header length {size} runs past the {len(blob)}-byte blob")
    header = json.loads(bytes(blob[8 : 8 + size]))
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ValueError("no __metadata__ in the header")
    return header


def tensor_views(header: dict, blob: bytearray | memoryview) -> dict[str, Raw]:
    """Arrays viewing the data section of blob (bfloat16 as its bits), after the safetensors loader's checks."""
    base = 8 + struct.unpack_from("<Q", blob, 0)[0]
    size = len(blob) - base
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        name_of = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if name_of is None:
            raise ValueError(f"tensor {name!r}: unsupported entry {info!r}")
        shape, (start, end) = info["shape"], info["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
        dtype = STORAGE[name_of]
        itemsize, count = dtype.itemsize, math.prod(shape)
        if not 0 <= start <= end <= size or end - start != count * itemsize or (base + start) % itemsize:
            raise ValueError(f"tensor {name!r}: offsets {start}..{end} do not hold {shape} of {info['dtype']}")
        spans.append((start, end))
        tensors[name] = Raw(np.frombuffer(blob, dtype=dtype, count=count, offset=base + start).reshape(shape), name_of)
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise ValueError("tensor data has a gap or an overlap")
        position = end
    if position != size:
        raise ValueError(f"{size - position} bytes after the last tensor")
    return tensors
