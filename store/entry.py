"""A store entry's value as a safetensors blob: written from an Entry, then read back checked."""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

from splitvlm.core.errors import first_line
from splitvlm.store.arrays import (
    EMBED_DTYPES,
    Entry,
    Raw,
    as_raw,
    dtype_name,
    dtype_of,
    non_finite,
    raw_bytes,
)
from splitvlm.store.blob import Blob, read_header, safetensors_blob, tensor_views
from splitvlm.store.errors import StoreError
from splitvlm.store.key import is_key

FORMAT = "splitvlm.store/1"
CALLER_FIELDS = ("model_id", "vllm_version", "torch_version", "device", "profile", "source")
DTYPES = EMBED_DTYPES  # the dtypes an embedding may have, by name
TENSOR_NAMES = {"image_embeds", "image_grid_thw"}
UNNAMED_FAMILY = "qwen2-vl"  # an entry that records no family was made before families were recorded
__all__ = ["Entry", "Expect", "check_tensors", "parse_blob", "dtype_name", "entry_bytes", "entry_parts",
           "tensor_checksum"]


@dataclass(frozen=True)
class Expect:
    """What the model about to consume an entry needs."""

    hidden_size: int  # the width of a stored embedding (Qwen3-VL: hidden × (1 + deepstack levels))
    dtype: Any  # a torch dtype, or its name ("bfloat16" or "torch.bfloat16"), kept as the name
    merge_size: int
    family: str | None = None  # the model family (splitvlm.core.families), when the caller knows it
    deepstack: int | None = None  # deepstack levels inside hidden_size, when the caller knows them

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):  # "bfloat16" or "torch.bfloat16" also do; no torch needed
            name = self.dtype.removeprefix("torch.")
            if name not in DTYPES:
                raise StoreError(f"Expect: unknown dtype {self.dtype!r}; one of {', '.join(DTYPES)}")
            object.__setattr__(self, "dtype", name)


def tensor_checksum(embeds: Any, grid: Any) -> str:
    """blake3 hex of the raw (little-endian) bytes of image_embeds, then image_grid_thw (tensors, arrays or Raws)."""
    h = blake3.blake3()
    h.update(raw_bytes(embeds))
    h.update(raw_bytes(grid))
    return h.hexdigest()


def meta_checksum(meta: dict[str, str]) -> str:
    """blake3 hex of every metadata field but meta_checksum, sorted, each name and value length-prefixed."""
    parts = []
    for name in sorted(meta):
        if name != "meta_checksum":
            for text in (name, meta[name]):
                data = text.encode("utf-8", "surrogatepass")  # never fails, even on a damaged header
                parts += (struct.pack("<Q", len(data)), data)
    return blake3.blake3(b"".join(parts)).hexdigest()


def tokens_fit(n_tokens: int, grid: list[int], merge_size: int | None = None) -> bool:
    """n_tokens == t*h*w / merge²; without a merge size, some whole merge size must make it so."""
    patches = math.prod(grid)
    if merge_size is not None:
        return patches == n_tokens * merge_size * merge_size
    if n_tokens <= 0 or patches % n_tokens:
        return False
    square = patches // n_tokens
    return math.isqrt(square) ** 2 == square


def entry_bytes(entry: Entry) -> bytes:
    """The safetensors bytes stored for an entry; fills the store's own metadata fields."""
    return entry_parts(entry).to_bytes()


def entry_parts(entry: Entry) -> Blob:
    """The value stored for an entry, as parts; checks the entry and fills the store's metadata fields."""
    key = entry.key
    if not isinstance(key, str) or not is_key(key):
        raise StoreError(f"{key!r}: not a store key (64 lowercase hex digits from make_key)")
    embeds, grid = _array_like(entry, "_embeds"), _array_like(entry, "_grid")
    if embeds is None or len(embeds.shape) != 2 or dtype_of(embeds) not in DTYPES:
        raise StoreError(f"{key}: image_embeds must be a 2-D bfloat16, float16 or float32 tensor")
    if embeds.shape[0] == 0 or embeds.shape[1] == 0:
        raise StoreError(f"{key}: image_embeds is empty, shape {list(embeds.shape)}")
    if grid is None or math.prod(grid.shape) != 3 or not dtype_of(grid).startswith(("int", "uint")):
        raise StoreError(f"{key}: image_grid_thw must be an integer tensor of 3 values")
    embeds = as_raw(embeds)
    grid = Raw(as_raw(grid).array.astype("<i8").reshape(1, 3), "int64")
    thw = grid.array[0].tolist()
    if min(thw) <= 0 or not tokens_fit(embeds.shape[0], thw):
        raise StoreError(f"{key}: image_grid_thw {thw} does not fit {embeds.shape[0]} embedding rows")
    check_finite(key, embeds)
    meta = {name: "" for name in CALLER_FIELDS}
    for name, value in entry.meta.items():
        if not isinstance(name, str) or not isinstance(value, (str, type(None))):
            raise StoreError(f"{key}: metadata {name!r} must map to a string, got {type(value).__name__}")
        # a file name's undecodable bytes come as lone surrogates, which UTF-8 cannot hold
        meta[name] = (value or "").encode("utf-8", "backslashreplace").decode("utf-8")
    meta.update(
        key=key,
        format=FORMAT,
        hidden_size=str(embeds.shape[1]),
        dtype=embeds.dtype,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        checksum=tensor_checksum(embeds, grid),
    )
    meta["meta_checksum"] = meta_checksum(meta)
    return safetensors_blob([("image_grid_thw", grid), ("image_embeds", embeds)], meta)


def _array_like(entry: Entry, name: str) -> Any:
    """What an entry holds for image_embeds or image_grid_thw, as given (a tensor, an array, a Raw); None if neither."""
    value = getattr(entry, name + "_raw")
    value = getattr(entry, name) if value is None else value
    return value if isinstance(value, (Raw, np.ndarray)) or (hasattr(value, "dtype") and hasattr(value, "shape")) else None


def checked_meta(key: str, header: dict) -> dict[str, str]:
    """The metadata of a parsed header, after its own checksum and the key it was stored for."""
    meta = header["__metadata__"]
    if not all(isinstance(v, str) for v in meta.values()):
        raise StoreError(f"{key}: metadata values are not all strings")
    if meta.get("format") != FORMAT:
        raise StoreError(f"{key}: unknown entry format {meta.get('format')!r}, expected {FORMAT}")
    if meta_checksum(meta) != meta.get("meta_checksum"):
        raise StoreError(f"{key}: metadata checksum mismatch (the header was changed)")
    if meta.get("key") != key:
        raise StoreError(f"{key}: holds the entry of another key {str(meta.get('key'))[:16]}…")
    return meta


def parse_blob(key: str, blob: bytes | bytearray | memoryview, expect: Expect | None = None) -> Entry:
    """The entry in a stored blob, after every check; StoreError with one line naming the key otherwise.

    The tensors view blob when it is writable (a bytearray or a writable memoryview), else a copy.
    """
    if isinstance(blob, bytes) or (isinstance(blob, memoryview) and blob.readonly):
        blob = bytearray(blob)
    try:
        header = read_header(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{key}: unreadable safetensors header ({first_line(exc)})") from None
    meta = checked_meta(key, header)
    try:
        tensors = tensor_views(header, blob)
    except Exception as exc:  # whatever a damaged header makes of the tensor table
        raise StoreError(f"{key}: unreadable tensors ({first_line(exc)})") from None
    if set(tensors) != TENSOR_NAMES:
        raise StoreError(f"{key}: tensors {sorted(tensors)}, expected {sorted(TENSOR_NAMES)}")
    embeds, grid = tensors["image_embeds"], tensors["image_grid_thw"]  # Raw views of blob
    computed = tensor_checksum(embeds, grid)
    if computed != meta.get("checksum"):
        raise StoreError(
            f"{key}: checksum mismatch (stored {meta.get('checksum', '')[:16]}…, computed {computed[:16]}…)"
        )
    check_tensors(key, embeds, grid, meta, expect)
    return Entry(key, embeds, grid, meta)


def check_finite(key: str, embeds: Any) -> None:
    """NaN or Inf in an embedding: a broken tower or a forged entry with a valid checksum, never data."""
    bad = non_finite(as_raw(embeds))
    if bad:
        raise StoreError(f"{key}: image_embeds holds {bad} NaN or Inf value(s)")


def check_tensors(key: str, embeds: Any, grid: Any, meta: dict, expect: Expect | None) -> None:
    """Shape, dtype, hidden size and finite values, against the entry's own metadata and the caller's model.

    embeds and grid: torch tensors, numpy arrays or Raws (what parse_blob reads)."""
    if dtype_of(grid) != "int64" or list(grid.shape) != [1, 3]:
        raise StoreError(f"{key}: image_grid_thw is {dtype_of(grid)} {list(grid.shape)}, expected int64 [1, 3]")
    if len(embeds.shape) != 2 or dtype_of(embeds) not in DTYPES:
        raise StoreError(f"{key}: image_embeds is {dtype_of(embeds)} {list(embeds.shape)}, expected 2-D float")
    dtype, hidden, thw = dtype_of(embeds), int(embeds.shape[1]), as_raw(grid).array[0].tolist()
    if meta.get("dtype") != dtype or meta.get("hidden_size") != str(hidden):
        raise StoreError(
            f"{key}: tensor is {dtype} with hidden size {hidden}, metadata says "
            f"{meta.get('dtype')} with {meta.get('hidden_size')}"
        )
    check_finite(key, embeds)
    if expect is None:
        if min(thw) <= 0 or not tokens_fit(embeds.shape[0], thw):
            raise StoreError(f"{key}: image_grid_thw {thw} does not fit {embeds.shape[0]} embedding rows")
        return
    check_layout(key, meta, expect)
    if dtype != dtype_name(expect.dtype):
        raise StoreError(f"{key}: dtype {dtype}, model needs {dtype_name(expect.dtype)}")
    if hidden != expect.hidden_size:
        raise StoreError(f"{key}: hidden size {hidden}, model needs {expect.hidden_size}")
    if min(thw) <= 0 or not tokens_fit(embeds.shape[0], thw, expect.merge_size):
        need = math.prod(thw) / expect.merge_size**2
        raise StoreError(
            f"{key}: {embeds.shape[0]} embedding rows, but image_grid_thw {thw} with merge size "
            f"{expect.merge_size} needs {need:g}"
        )


def check_layout(key: str, meta: dict, expect: Expect) -> None:
    """The family and deepstack levels an entry records, against the model's (when Expect names them)."""
    family, deepstack = meta.get("family") or UNNAMED_FAMILY, meta.get("deepstack") or "0"
    if expect.family is not None and family != expect.family:
        raise StoreError(f"{key}: an embedding of a {family} model, the model is {expect.family}; "
                         "re-encode it with this model")
    if expect.deepstack is not None and deepstack != str(expect.deepstack):
        raise StoreError(f"{key}: {deepstack} deepstack levels, the model needs {expect.deepstack}")


def describe(key: str, blob: bytes | memoryview) -> dict:
    """What the header says about an entry, without reading its tensors (for ls and stats)."""
    header = read_header(blob)
    meta = header["__metadata__"]
    shape = header.get("image_embeds", {}).get("shape", [])
    fields = {k: meta.get(k, "") for k in ("model_id", "dtype", "hidden_size", "profile", "created", "source")}
    return {"key": key, "n_tokens": shape[0] if shape else None, **fields, "bytes": len(blob)}
