"""Merging stores: the entries and cached results of source stores copied into one, checked, never overwritten.

Values are copied byte for byte (no re-encoding), a batch per write transaction. A key already in
the destination with the same bytes is skipped; with other bytes it is a conflict, reported and
left as the destination has it. Every entry is read with the store's full checks first; a bad one
is reported and skipped. A merge that was killed and is run again finds the batches it committed
already there (identical) and copies the rest. See docs/store-format.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import lmdb

from splitvlm.store.blob import read_header
from splitvlm.store.entry import parse_blob
from splitvlm.store.errors import StoreError
from splitvlm.store.key import is_key
from splitvlm.store.store import EmbeddingStore

DEFAULT_BATCH = 256  # entries per write transaction
BATCH_BYTES = 128 << 20  # and at most about this many bytes of values
Report = Callable[[str], None]
Progress = Callable[[int], None] | None  # called with the number of entries read


@dataclass
class Tally:
    """What happened to the values of one database."""

    copied: int = 0
    identical: int = 0  # already in the destination with the same bytes
    conflicts: int = 0  # already in the destination with other bytes: left as they were
    bad: int = 0  # failed the store's checks: not copied


@dataclass
class Merged:
    """Counts for the embeddings and the cached results; exit_status 3 if any entry was bad, 1 on conflicts."""

    entries: Tally = field(default_factory=Tally)
    results: Tally = field(default_factory=Tally)

    @property
    def exit_status(self) -> int:
        if self.entries.bad:
            return 3
        return 1 if self.entries.conflicts or self.results.conflicts else 0


def _same_folder(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _chunks(store: EmbeddingStore, db, batch: int) -> Iterator[list[tuple[bytes, bytes]]]:
    """(key, value) copies in key order, up to batch entries or BATCH_BYTES a chunk; no transaction held between."""
    after: bytes | None = None
    while True:
        chunk: list[tuple[bytes, bytes]] = []
        size = 0
        with store.read() as txn:
            cursor = txn.cursor(db)
            found = cursor.set_range(after) if after is not None else cursor.first()
            while found and len(chunk) < batch and size < BATCH_BYTES:
                key = bytes(cursor.key())
                if key != after:
                    chunk.append((key, bytes(cursor.value())))
                    size += len(chunk[-1][1])
                found = cursor.next()
        if not chunk:
            return
        after = chunk[-1][0]
        yield chunk


def _problem(key: bytes, value: bytes) -> str | None:
    """The one-line problem of a stored entry (every check of get()), or None when it is sound."""
    text = key.decode("utf-8", "backslashreplace")
    if not is_key(text):
        return f"{text}: not a store key (64 lowercase hex digits)"
    try:
        parse_blob(text, value)
    except StoreError as exc:
        return str(exc)
    return None


def _how_different(old: memoryview, new: bytes) -> str:
    """Whether two entries of one key differ in their tensors or only in their metadata."""
    try:
        same = read_header(old)["__metadata__"].get("checksum") == read_header(new)["__metadata__"].get("checksum")
    except (ValueError, UnicodeDecodeError):
        return "different values"
    return "the same tensors with other metadata" if same else "different tensors"


def _put(dst: EmbeddingStore, db, items: list[tuple[bytes, bytes]], entries: bool) -> list[str | None]:
    """Write the items not yet in db, in one transaction; per item None (written), "" (identical) or how it differs."""

    def put_new(txn: lmdb.Transaction) -> list[str | None]:
        outcome: list[str | None] = []
        for key, value in items:
            old = txn.get(key, db=db)
            if old is None:
                txn.put(key, value, db=db)
                outcome.append(None)
            elif old == value:
                outcome.append("")
            else:
                outcome.append(_how_different(old, value) if entries else "different values")
        return outcome

    return dst.write(put_new, size_hint=sum(len(v) + 256 for _, v in items))


def _merge_db(source: EmbeddingStore, db, dst: EmbeddingStore, dst_db, batch: int, entries: bool,
              tally: Tally, report: Report, progress: Progress = None) -> None:
    """Every value of one database of source into dst_db; entries are checked first."""
    what = "" if entries else "cached result "
    for chunk in _chunks(source, db, batch):
        good = []
        for key, value in chunk:
            problem = _problem(key, value) if entries else None
            if problem is None:
                good.append((key, value))
            else:
                tally.bad += 1
                report(f"{problem} (in {source.path}; not copied)")
        for (key, _), outcome in zip(good, _put(dst, dst_db, good, entries) if good else [], strict=True):
            if outcome is None:
                tally.copied += 1
            elif outcome == "":
                tally.identical += 1
            else:
                tally.conflicts += 1
                name = key.decode("utf-8", "backslashreplace")
                report(f"{what}{name}: conflict: {source.path} and {dst.path} hold {outcome}; {dst.path} keeps its own")
        if progress is not None:
            progress(len(chunk))


def merge_stores(sources: Sequence[str | os.PathLike], into: str | os.PathLike, *, batch: int = DEFAULT_BATCH,
                 report: Report = lambda line: None, progress: Progress = None) -> Merged:
    """Copy every sound entry and cached result of each source into the store at into (made if missing).

    Problems (bad entries, conflicts) go to report one line each as they are found; the counts come back.
    """
    if batch < 1:
        raise StoreError(f"batch must be at least 1, not {batch}")
    into = os.path.realpath(os.fspath(into))
    paths = [os.path.realpath(os.fspath(s)) for s in sources]
    for path in paths:
        if _same_folder(path, into):
            raise StoreError(f"{path}: is the destination store; a store cannot be merged into itself")
        if not os.path.isfile(os.path.join(path, "data.mdb")):
            raise StoreError(f"{path}: no store there")
    merged = Merged()
    with EmbeddingStore(into) as dst:
        for path in paths:
            with EmbeddingStore(path, readonly=True) as source:
                _merge_db(source, source.shared.embeddings, dst, dst.shared.embeddings, batch, True, merged.entries,
                          report, progress)
                if source.results_db() is not None:
                    _merge_db(source, source.results_db(), dst, dst.results_db(), batch, False, merged.results, report)
    return merged

