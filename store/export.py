"""Export store entries as files other tools read: numpy .npy, safetensors, or one parquet table."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from splitvlm.store.arrays import Raw, as_raw, is_tensor, widen
from splitvlm.store.entry import Entry, parse_blob
from splitvlm.store.errors import StoreError
from splitvlm.store.key import is_key
from splitvlm.store.store import EmbeddingStore

FORMATS = ("npy", "safetensors", "parquet")
DTYPES = ("float32", "native")
ROW_GROUP_BYTES = 64 << 20  # embedding bytes buffered per parquet row group
ROW_GROUP_ROWS = 1024


def to_numpy(x: Entry | Any, dtype: str = "float32") -> np.ndarray:
    """An entry's image_embeds (or a tensor) as numpy: "float32" widens bfloat16/float16 exactly; "native" as is.

    An entry read from a store is converted without torch (bfloat16 from its bits: exact, NaN payloads too).
    """
    if isinstance(x, Entry):
        raw = x.raw_embeds
    elif is_tensor(x) or isinstance(x, (np.ndarray, Raw)):
        raw = as_raw(x)
    else:
        raise TypeError(f"to_numpy takes an Entry or a torch.Tensor, not {type(x).__name__}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    return widen(raw, dtype)


@dataclass
class Exported:
    """What an export wrote: entries, bad or unknown keys skipped, bytes of the files written."""

    entries: int = 0
    bad: int = 0
    bytes: int = 0

    @property
    def exit_status(self) -> int:
        return 3 if self.bad else 0


def _write_atomic(path: str, write: Callable[[IO[bytes]], Any]) -> int:
    """write(file) to a temporary name beside path, then rename it to path; returns the bytes written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise StoreError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return os.path.getsize(path)


def _row(entry: Entry) -> dict[str, Any]:
    """What the index and the table say of an entry besides its embeddings."""
    meta = entry.meta
    return {"key": entry.key, "shape": list(entry.embeds_array.shape),
            "image_grid_thw": entry.grid_array.reshape(-1).tolist(),
            "source": meta.get("source", ""), "model_id": meta.get("model_id", "")}


class _Output:
    """A file written under a temporary name and renamed into place by close(); abort() removes it."""

    def __init__(self, path: str) -> None:
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"

    def finish(self) -> None:  # complete the temporary file
        pass

    def close(self) -> int:
        try:
            self.finish()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        return os.path.getsize(self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.finish()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)


class _Files(_Output):
    """One file per entry (.npy or .safetensors), and index.jsonl with one line per entry."""

    def __init__(self, out: str, fmt: str, dtype: str) -> None:
        super().__init__(os.path.join(out, "index.jsonl"))
        self.out, self.fmt, self.dtype = out, fmt, dtype
        self.index = open(self.tmp, "w", encoding="utf-8")  # closed by finish()

    def add(self, entry: Entry, blob: bytes | None) -> int:
        name = f"{entry.key}.{self.fmt}"
        if blob is not None:  # --dtype native safetensors: the checked blob exactly as stored
            dtype, write = entry.meta["dtype"], lambda f: f.write(blob)
        else:
            array = to_numpy(entry, self.dtype)
            dtype, write = str(array.dtype), lambda f: self._write(f, entry, array)
        size = _write_atomic(os.path.join(self.out, name), write)
        row = {"key": entry.key, "file": name, "dtype": dtype, **_row(entry)}
        self.index.write(json.dumps(row, ensure_ascii=False) + "\n")
        return size

    def _write(self, f: IO[bytes], entry: Entry, array: np.ndarray) -> None:
        if self.fmt == "npy":
            np.lib.format.write_array(f, array, allow_pickle=False)
            return
        from safetensors.numpy import save

        grid = entry.grid_array.astype(np.int64).reshape(1, 3)
        meta = {**entry.meta, "exported_dtype": str(array.dtype)}
        f.write(save({"image_grid_thw": grid, "image_embeds": array}, metadata=meta))

    def finish(self) -> None:
        self.index.close()


class _Parquet(_Output):
    """One embeddings.parquet, written a row group at a time so memory stays bounded."""

    def __init__(self, out: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(os.path.join(out, "embeddings.parquet"))
        ints, text = pa.list_(pa.int64()), pa.string()
        self.pa, self.schema = pa, pa.schema([("key", text), ("image_grid_thw", ints), ("shape", ints), ("embeddings",
                                              pa.list_(pa.float32())), ("source", text), ("model_id", text)])
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.rows: list[dict[str, Any]] = []
        self.arrays: list[np.ndarray] = []
        self.buffered = 0

    def add(self, entry: Entry, blob: bytes | None) -> int:
        self.rows.append(_row(entry))
        self.arrays.append(to_numpy(entry, "float32").reshape(-1))  # row-major
        self.buffered += self.arrays[-1].nbytes
        if self.buffered >= ROW_GROUP_BYTES or len(self.rows) >= ROW_GROUP_ROWS:
            self._flush()
        return 0  # the file's size is counted by close()

    def _flush(self) -> None:
        pa = self.pa
        offsets = pa.array(np.cumsum([0] + [a.size for a in self.arrays]).astype(np.int32))
        table = pa.Table.from_pylist(self.rows, schema=self.schema.remove(3))
        values = np.concatenate(self.arrays) if self.arrays else np.empty(0, np.float32)
        table = table.add_column(3, self.schema.field(3), pa.ListArray.from_arrays(offsets, pa.array(values)))
        self.writer.write_table(table)  # one row group
        self.rows, self.arrays, self.buffered = [], [], 0

    def finish(self) -> None:
        if self.rows:
            self._flush()
        self.writer.close()


def check_export(fmt: str, dtype: str) -> None:
    """Refuse, before any work, a format and dtype that do not go together or whose package is missing."""
    if fmt not in FORMATS or dtype not in DTYPES:
        raise StoreError(f"export: format one of {', '.join(FORMATS)}, dtype one of {', '.join(DTYPES)}")
    if dtype == "native" and fmt != "safetensors":
        raise StoreError(f"{fmt} holds float32 only (numpy has no bfloat16); --dtype native goes with safetensors")
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise StoreError("parquet export needs the pyarrow package (pip install pyarrow)") from None


def prepare_out(out: str, store: EmbeddingStore, overwrite: bool) -> None:
    """Make the output folder; refuse a file, the store's own folder, or a non-empty folder without overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise StoreError(f"{out}: not a folder")
    if os.path.isdir(out) and os.path.samefile(out, store.path):
        raise StoreError(f"{out}: that is the store's own folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise StoreError(f"{out}: folder not empty (--overwrite writes into it, replacing files of the same names)")
    os.makedirs(out, exist_ok=True)


def _read(store: EmbeddingStore, key: str, native: bool) -> tuple[Entry, bytes | None]:
    """The entry after every check of store.get; for native export also the very bytes checked."""
    if not is_key(key):
        raise StoreError(f"{key}: not a store key (64 lowercase hex digits)")
    blob = store.raw(key) if native else None
    if native and blob is None:
        raise StoreError(f"{key}: missing")
    return (store.get(key) if blob is None else parse_blob(key, blob)), blob  # parse_blob: get's checks


def export_store(store: EmbeddingStore, out: str, fmt: str, *, dtype: str = "float32",
                 keys: Iterable[str] | None = None, overwrite: bool = False,
                 report: Callable[[str], None] = print, progress: Callable[[int], None] | None = None) -> Exported:
    """Write the given keys (default: every entry) to out; a bad or unknown key is reported on one line and skipped."""
    check_export(fmt, dtype)
    prepare_out(out, store, overwrite)
    writer = _Parquet(out) if fmt == "parquet" else _Files(out, fmt, dtype)
    done = Exported()
    try:
        for key in dict.fromkeys(store.keys() if keys is None else keys):
            try:
                entry, blob = _read(store, key, native=dtype == "native" and fmt == "safetensors")
            except StoreError as exc:
                done.bad += 1
                report(f"{exc} (not exported)")
            else:
                done.bytes += writer.add(entry, blob)
                done.entries += 1
            if progress is not None:
                progress(1)
        done.bytes += writer.close()
    finally:
        if os.path.exists(writer.tmp):  # stopped before close: no half-written index or table
            writer.abort()
    return done
