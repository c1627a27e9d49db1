"""EmbeddingStore: image embeddings in LMDB, content-addressed, every read checked."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lmdb
import numpy as np

from splitvlm.store import env as shared_env
from splitvlm.store import walk
from splitvlm.store.ahead import Ahead
from splitvlm.store.entry import Entry, Expect, entry_parts, parse_blob
from splitvlm.store.errors import StoreError
from splitvlm.store.key import is_key


class EmbeddingStore:
    """A folder holding an LMDB environment with the named database "embeddings".

    Keys come from make_key; values are safetensors blobs (see docs/store-format.md).
    Any number of processes may read while one writes; every store object of one
    process and path shares one LMDB environment. readonly=True creates and writes no file,
    and works on stores this process may not write (see env.open_env for the one risk).
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False, *, map_size: int = shared_env.DEFAULT_MAP_SIZE):
        self.path = os.fspath(path)
        self.readonly = readonly
        self._shared: shared_env.SharedEnv | None = shared_env.acquire(self.path, readonly, map_size)

    # -- lifetime --
    def close(self) -> None:
        if self._shared is not None:
            shared_env.release(self._shared)
            self._shared = None

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.path!r}, readonly={self.readonly})"

    @property
    def shared(self) -> shared_env.SharedEnv:
        if self._shared is None:
            raise StoreError(f"{self.path}: store is closed")
        if self._shared.pid != os.getpid():
            raise StoreError(f"{self.path}: opened before this process forked; LMDB forbids using it here")
        return self._shared

    @property
    def env(self) -> lmdb.Environment:
        return self.shared.env

    def results_db(self):
        """The lmdb handle of the "results" database (reserved for the result cache); None if absent."""
        return self.shared.results

    def read(self):
        """Context manager: a read transaction on the environment (values are memoryviews)."""
        return self.shared.read()

    def write(self, fn: Callable[[lmdb.Transaction], Any], size_hint: int = 0) -> Any:
        """fn(txn) in one write transaction, rerun from the start on a grown map if the map was full."""
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")
        return self.shared.write(fn, size_hint)

    # -- writing --
    def put_many(self, entries: Iterable[Entry], overwrite: bool = False) -> int:
        """Store entries in one transaction (all or none); returns how many were written.

        Without overwrite, keys already present are skipped without being written again.
        """
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")
        chosen: dict[str, Entry] = {}
        for entry in entries:
            if not isinstance(entry, Entry) or not isinstance(entry.key, str) or not is_key(entry.key):
                what = entry.key if isinstance(entry, Entry) else type(entry).__name__
                raise StoreError(f"{what!r}: not an Entry with a key from make_key (64 lowercase hex digits)")
            if overwrite or entry.key not in chosen:
                chosen[entry.key] = entry
        if not overwrite:
            for key in self._present(list(chosen)):
                del chosen[key]
        if not chosen:
            return 0
        ordered = [chosen[key] for key in sorted(chosen)]
        size_hint = sum(e.nbytes + 4096 for e in ordered)
        db = self.shared.embeddings
        with Ahead(entry_parts, ordered) as encoded:

            def put_all(txn: lmdb.Transaction) -> int:
                scratch, written = bytearray(), 0
                for entry, blob in zip(ordered, encoded(), strict=True):
                    if blob.size > len(scratch):
                        scratch = bytearray(blob.size)  # reused: no fresh pages to fault in per entry
                    written += self._put_one(txn, db, entry.key.encode(), blob.into(scratch), overwrite)
                return written

            return self.write(put_all, size_hint=size_hint)

    def put(self, entry: Entry, overwrite: bool = False) -> bool:
        return self.put_many([entry], overwrite) == 1

    @staticmethod
    def _put_one(txn: lmdb.Transaction, db, key: bytes, blob: memoryview, overwrite: bool) -> bool:
        return txn.put(key, blob, db=db, overwrite=overwrite)

    def delete(self, keys: Iterable[str]) -> int:
        """Remove entries in one transaction; returns how many were there."""
        encoded = [k.encode() for k in keys]
        db = self.shared.embeddings
        return self.write(lambda txn: sum(bool(txn.delete(k, db=db)) for k in encoded))

    # -- reading --
    def _present(self, keys: list[str]) -> list[str]:
        db = self.shared.embeddings
        with self.read() as txn:
            return [k for k in keys if txn.get(k.encode(), db=db) is not None]

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys not in the store, in the order given."""
        db = self.shared.embeddings
        with self.read() as txn:
            return [k for k in keys if txn.get(k.encode(), db=db) is None]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and not self.missing([key])

    def __len__(self) -> int:
        with self.read() as txn:
            return txn.stat(self.shared.embeddings)["entries"]

    def _copies(self, keys: list[str]) -> Iterator[tuple[str, memoryview | None]]:
        """(key, copy of its blob or None), unchecked, copied into one buffer (one allocation: huge
        pages, few page faults); the read transaction stays open while the caller takes each copy."""
        db = self.shared.embeddings
        with self.read() as txn:
            values = [txn.get(k.encode(), db=db) for k in keys]
            buffer = np.empty(sum(len(v) for v in values if v is not None), dtype=np.uint8)
            view, position = memoryview(buffer), 0
            for key, value in zip(keys, values, strict=True):
                if value is None:
                    yield key, None
                    continue
                copy = view[position : position + len(value)]
                copy[:] = value
                position += len(value)
                yield key, copy

    def raw(self, key: str) -> bytes | None:
        """The stored blob, unchecked (for copying and for tests); None if missing."""
        ((_, data),) = self._copies([key])
        return None if data is None else bytes(data)

    def blob(self, key: str, expect: Expect | None = None) -> bytes:
        """The stored blob after every check of get()."""
        self.get(key, expect)
        return self.raw(key)

    def get(self, key: str, expect: Expect | None = None) -> Entry:
        """The entry under key, checked (checksums, shapes; dtype and hidden size against expect)."""
        return self.get_many([key], expect)[0]

    def get_many(self, keys: Iterable[str], expect: Expect | None = None) -> list[Entry]:
        """Entries in the order of keys, read in one transaction and checked; the first bad one raises.

        The tensors of one call share one buffer, freed when none of them is left.
        """
        entries = []
        with contextlib.closing(self._copies(list(keys))) as copies:  # ends the transaction on errors too
            for key, data in copies:
                if data is None:
                    raise StoreError(f"{key}: missing")
                entries.append(parse_blob(key, data, expect))  # checked while the copy is in cache
        return entries

    # -- walking the whole store (see walk.py) --
    def keys(self) -> Iterator[str]:
        """Every key, in sorted order; holds no transaction between chunks."""
        return walk.scan(self, lambda key, value: key)

    def headers(self) -> Iterator[dict]:
        """What each entry's header says (key, n_tokens, model_id, dtype, ...), without reading tensors."""
        return walk.scan(self, walk.header_or_error)

    def metas(self) -> Iterator[tuple[str, dict]]:
        """(key, header metadata) of every entry, unchecked: for diagnosis (why a key is missing), not decoding."""
        return walk.scan(self, walk.key_and_meta)

    def check(self, expect: Expect | None = None, progress: walk.Progress = None) -> Iterator[tuple[str, str | None]]:
        """Reads every entry: (key, None) for a good one, (key, one-line problem) for a bad one."""
        return walk.check(self, expect, progress)

    def stats(self, progress: walk.Progress = None) -> dict:
        """Entries, bytes, and counts by model, dtype, profile and hidden size (from the headers)."""
        return walk.stats(self, progress)
