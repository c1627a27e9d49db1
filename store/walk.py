"""Walking a whole store in short transactions: keys, headers, checks and statistics."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from splitvlm.store.blob import read_header
from splitvlm.store.entry import Expect, describe, parse_blob
from splitvlm.store.errors import StoreError
from splitvlm.store.key import has_old_key, is_key

if TYPE_CHECKING:
    from splitvlm.store.store import EmbeddingStore

SCAN_CHUNK = 1024  # entries visited per read transaction
Progress = Callable[[int], None] | None


def scan(store: EmbeddingStore, fn: Callable[[str, memoryview], Any]) -> Iterator[Any]:
    """fn(key, value) for every entry in key order; no transaction stays open between chunks."""
    db = store.shared.embeddings
    after: bytes | None = None
    while True:
        chunk = []
        with store.read() as txn:
            cursor = txn.cursor(db)
            found = cursor.set_range(after) if after is not None else cursor.first()
            while found and len(chunk) < SCAN_CHUNK:
                key = bytes(cursor.key())
                if key != after:
                    chunk.append((key, fn(key.decode("utf-8", "backslashreplace"), cursor.value())))
                found = cursor.next()
        if not chunk:
            return
        after = chunk[-1][0]
        yield from (result for _, result in chunk)


def key_and_meta(key: str, value: memoryview) -> tuple[str, dict]:
    """The entry's header metadata as written (unchecked: for diagnosis, never for decoding)."""
    try:
        return key, dict(read_header(value).get("__metadata__") or {})
    except Exception:  # a damaged header says nothing; check reports it
        return key, {}


def old_keys(store: EmbeddingStore) -> int:
    """Encoder entries (they record a model fingerprint) whose key is of an older version than this code makes."""
    return sum(has_old_key(meta) for _, meta in store.metas())


def header_or_error(key: str, value: memoryview) -> dict:
    try:
        return describe(key, value)
    except Exception as exc:  # any damage to the header; check says more
        return {"key": key, "bytes": len(value), "error": f"unreadable header ({exc})"}


def check(store: EmbeddingStore, expect: Expect | None, progress: Progress) -> Iterator[tuple[str, str | None]]:
    for key in store.keys():
        ((_, data),) = store._copies([key])
        if not is_key(key):
            yield key, f"{key}: not a store key (64 lowercase hex digits)"
        elif data is not None:  # else removed since the walk began
            try:
                parse_blob(key, data, expect)
                yield key, None
            except StoreError as exc:
                yield key, str(exc)
        if progress is not None:
            progress(1)


def stats(store: EmbeddingStore, progress: Progress) -> dict:
    counts: dict[str, Counter] = {f: Counter() for f in ("model_id", "dtype", "profile", "hidden_size")}
    entries = value_bytes = unreadable = 0
    for info in store.headers():
        entries += 1
        value_bytes += info["bytes"]
        if "error" in info:
            unreadable += 1
        else:
            for name, counter in counts.items():
                counter[info[name]] += 1
        if progress is not None:
            progress(1)
    results = store.results_db()
    with store.read() as txn:
        n_results = 0 if results is None else txn.stat(results)["entries"]
    st = os.stat(os.path.join(store.shared.path, "data.mdb"))
    return {
        "path": store.shared.path,
        "entries": entries,
        "bytes": value_bytes,
        "file_bytes": min(st.st_size, st.st_blocks * 512),  # the data file is sparse
        "map_size": store.shared.map_size(),
        "models": dict(counts["model_id"]),
        "dtypes": dict(counts["dtype"]),
        "profiles": dict(counts["profile"]),
        "hidden_sizes": dict(counts["hidden_size"]),
        "unreadable_headers": unreadable,
        "results": n_results,
        "locked": store.shared.locked,  # False: read without lock.mdb (see env.open_env)
    }
