"""Image tables (a Parquet file, a datasets save_to_disk folder), read batch by batch with pyarrow."""

from __future__ import annotations

import functools
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from splitvlm.core.images import ImageError

BATCH_ROWS = 64  # rows per batch read: a batch's images are the most held at once
IMAGE_COLUMN = "image"
ID_COLUMNS = ("id", "__key__")  # the id column when none is named; without either, the row number


class SourceError(ImageError):
    """An image source or reference that cannot be read; one line naming it."""


@dataclass(frozen=True)
class Table:
    path: str
    kind: str  # "parquet" or "datasets"
    image: str
    id: str | None  # None: ids are row numbers
    query: str  # "?image=..&id=.." for columns other than the defaults, "" otherwise
    rows: int


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError("Parquet and datasets sources are read with pyarrow, which is not installed "
                          "(pip install pyarrow)") from None
    return pa, pq


def is_dataset_dir(path: str | Path) -> bool:
    """A folder `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`) wrote."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _arrow_files(folder: Path) -> list[Path]:
    if (folder / "dataset_dict.json").is_file():
        splits = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_dir()))
        raise SourceError(f"{folder}: a DatasetDict folder; give one split's folder ({splits})")
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state.get("_data_files", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SourceError(f"{folder}: unreadable state.json ({exc})") from None
    return [folder / n for n in names] or sorted(folder.glob("data-*.arrow"))


def _stamp(path: str) -> tuple:
    """What changes when the table's files change: cached indexes are keyed by it."""
    p = Path(path)
    files = _arrow_files(p) if p.is_dir() else [p]
    try:
        return tuple((st.st_mtime_ns, st.st_size) for st in (f.stat() for f in files))
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _schema(path: str, kind: str):
    pa, pq = _pyarrow()
    try:
        if kind == "parquet":
            meta = pq.ParquetFile(path).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows
        tables = _mapped(path, _stamp(path))
        return tables[0].schema, sum(t.num_rows for t in tables)
    except SourceError:
        raise
    except (OSError, pa.ArrowException, IndexError) as exc:
        raise SourceError(f"{path}: not a readable {kind} source ({' '.join(str(exc).split())[:200]})") from None


def open_table(path: str, kind: str, image_column: str | None = None, id_column: str | None = None) -> Table:
    """The table with its image and id columns checked; SourceError naming the file and column."""
    return _open(path, kind, image_column, id_column, _stamp(path))


@functools.lru_cache(maxsize=64)
def _open(path: str, kind: str, image_column: str | None, id_column: str | None, stamp: tuple) -> Table:
    pa, _ = _pyarrow()
    schema, rows = _schema(path, kind)
    names = schema.names
    image = image_column or IMAGE_COLUMN
    if image not in names:
        raise SourceError(f"{path}: no column {image!r} for the images (columns: {', '.join(names)})")
    t = schema.field(image).type
    inner = t.field("bytes").type if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 else t
    if not (pa.types.is_binary(inner) or pa.types.is_large_binary(inner)):
        raise SourceError(f"{path}: column {image!r} holds {t}, not image bytes (binary, or a struct with a "
                          "bytes field as datasets writes images)")
    ident = id_column or next((c for c in ID_COLUMNS if c in names), None)
    if ident is not None and ident not in names:
        raise SourceError(f"{path}: no column {ident!r} for the ids (columns: {', '.join(names)})")
    given = {k: v for k, v in (("image", image_column), ("id", id_column)) if v}
    return Table(path, kind, image, ident, "?" + urllib.parse.urlencode(given) if given else "", rows)


@functools.lru_cache(maxsize=8)
def _mapped(path: str, stamp: tuple) -> list:
    """A datasets folder's arrow files, memory-mapped (no copy is made: pages are read as used)."""
    pa, _ = _pyarrow()
    return [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in _arrow_files(Path(path))]


def _image_values(column) -> list[bytes | None]:
    pa, _ = _pyarrow()
    if pa.types.is_struct(column.type):
        column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
        column = column.field("bytes")
    return column.to_pylist()


def _batches(t: Table, columns: list[str]) -> Iterator:
    _, pq = _pyarrow()
    if t.kind == "parquet":
        yield from pq.ParquetFile(t.path).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        return
    for table in _mapped(t.path, _stamp(t.path)):
        yield from table.select(columns).to_batches(max_chunksize=BATCH_ROWS)


def _chunks(t: Table, with_bytes: bool) -> Iterator[tuple[list | range, list]]:
    """(ids, images) of each batch; without an id column the ids are row numbers."""
    columns = ([t.image] if with_bytes else []) + ([t.id] if t.id else [])
    if not columns:  # row numbers only: nothing to read
        for start in range(0, t.rows, BATCH_ROWS):
            yield range(start, min(t.rows, start + BATCH_ROWS)), [None] * BATCH_ROWS
        return
    row = 0
    for batch in _batches(t, columns):
        n = batch.num_rows
        ids = batch.column(t.id).to_pylist() if t.id else range(row, row + n)
        yield ids, (_image_values(batch.column(t.image)) if with_bytes else [None] * n)
        row += n


def iter_rows(t: Table, with_bytes: bool = True) -> Iterator[tuple[str, str, bytes | SourceError | None]]:
    """(reference, id, image bytes) per row in file order; a row that cannot be named or read has a
    SourceError in place of its bytes. Without with_bytes only the ids are read (bytes None)."""
    seen: set[str] = set()
    row = 0
    for ids, images in _chunks(t, with_bytes):
        for ident, data in zip(ids, images):
            if ident is None:
                where = f"{t.path} row {row}"
                yield where, "", SourceError(f"{where}: no id (null in column {t.id!r})")
            else:
                ident = str(ident)
                ref = f"{t.path}{t.query}::{ident}"
                if ident in seen:
                    data = SourceError(f"{ref}: id {ident!r} repeats at row {row}; the reference names its first row")
                elif with_bytes and data is None:
                    data = SourceError(f"{ref}: no image bytes (null in column {t.image!r})")
                seen.add(ident)
                yield ref, ident, data
            row += 1


@functools.lru_cache(maxsize=16)
def _index(t: Table, stamp: tuple) -> dict[str, int]:
    """id -> row of its first row, from the id column alone."""
    index: dict[str, int] = {}
    for row, (_, ident, _) in enumerate(iter_rows(t, with_bytes=False)):
        if ident:
            index.setdefault(ident, row)
    return index


@functools.lru_cache(maxsize=2)  # jobs in file order read one row group many times in a row
def _row_group(path: str, stamp: tuple, group: int, column: str):
    _, pq = _pyarrow()
    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0)


def _cell(t: Table, row: int) -> bytes | None:
    if t.kind == "parquet":
        _, pq = _pyarrow()
        meta = pq.ParquetFile(t.path).metadata
        for group in range(meta.num_row_groups):
            size = meta.row_group(group).num_rows
            if row < size:
                return _image_values(_row_group(t.path, _stamp(t.path), group, t.image).slice(row, 1))[0]
            row -= size
    for table in _mapped(t.path, _stamp(t.path)):
        if row < table.num_rows:
            return _image_values(table.column(t.image).slice(row, 1))[0]
        row -= table.num_rows
    return None


def read_row(path: str, kind: str, query: str, member: str, ref: str) -> bytes:
    """The image bytes of the row a reference names."""
    columns = dict(urllib.parse.parse_qsl(query))
    unknown = set(columns) - {"image", "id"}
    if unknown:
        raise SourceError(f"{ref}: unknown column setting {', '.join(sorted(unknown))} (image=, id=)")
    try:
        t = open_table(path, kind, columns.get("image"), columns.get("id"))
    except SourceError as exc:  # named by the reference, which says which columns
        raise SourceError(f"{ref}: {str(exc).removeprefix(path + ': ')}") from None
    if t.id is None:
        row = int(member) if member.isdigit() and int(member) < t.rows else None
    else:
        row = _index(t, _stamp(path)).get(member)
    if row is None:
        raise SourceError(f"{ref}: no row with {t.id or 'row number'} {member!r} in {path}")
    data = _cell(t, row)
    if data is None:
        raise SourceError(f"{ref}: no image bytes (null in column {t.image!r})")
    return data
