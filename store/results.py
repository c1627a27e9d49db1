"""The cached decode results a store holds, read, checked and cleared without torch or vLLM.

The decoder writes and looks them up (splitvlm.decoder.cache: same format, same checks);
`splitvlm store check` and `store rm --results` use these so that they run on a store-only install.
"""

from __future__ import annotations

import hashlib
import json

import lmdb

from splitvlm.core.errors import SplitVLMError
from splitvlm.store.key import canonical_json
from splitvlm.store.store import EmbeddingStore

FORMAT = "splitvlm.result/2"  # as splitvlm.decoder.cache.FORMAT (tests/test_store_light.py checks)
RESULT_FIELDS = ("text", "token_ids", "finish_reason", "sha256", "prompt_tokens", "keys")


def fields_checksum(fields: dict) -> str:
    """sha256 over the canonical JSON of every field a cached result returns."""
    return hashlib.sha256(canonical_json({f: fields[f] for f in RESULT_FIELDS}, "cached result")).hexdigest()


def checked(raw: bytes) -> dict | None:
    """The fields of a stored result, or None when anything in it was changed (or it is of another format)."""
    try:
        value = json.loads(raw)
        fields = {f: value[f] for f in RESULT_FIELDS}
        ok = (value.get("format") == FORMAT and value.get("checksum") == fields_checksum(fields)
              and isinstance(fields["text"], str)
              and hashlib.sha256(fields["text"].encode("utf-8")).hexdigest() == fields["sha256"])
    except (ValueError, KeyError, TypeError, SplitVLMError):
        return None
    return fields if ok else None


def check_results(store: EmbeddingStore) -> tuple[int, list[str]]:
    """Every cached result read and checked: how many there are, and the keys of those that fail."""
    db = store.results_db()
    if db is None:
        return 0, []
    bad, n = [], 0
    with store.read() as txn:
        for key, raw in txn.cursor(db=db):
            n += 1
            if checked(bytes(raw)) is None:
                bad.append(bytes(key).decode("utf-8", "replace"))
    return n, bad


def clear_results(store: EmbeddingStore) -> int:
    """Remove every cached result (the embeddings stay); returns how many there were."""
    db = store.results_db()
    if db is None:
        return 0

    def drop(txn: lmdb.Transaction) -> int:
        n = txn.stat(db)["entries"]
        txn.drop(db, delete=False)
        return n

    return store.write(drop)
