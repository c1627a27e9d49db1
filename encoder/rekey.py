"""store rekey: move entries made under version-1 keys (which held the model's path) to this version's keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.images import read_image_bytes
from splitvlm.core.provenance import Provenance
from splitvlm.store import EmbeddingStore, Entry
from splitvlm.store.key import has_old_key, image_digest, make_key_v1

BATCH = 64


@dataclass
class RekeyStats:
    moved: int = 0
    current: int = 0  # already under this version's keys
    failed: list[str] = field(default_factory=list)  # one line each, naming the key

    def summary(self) -> str:
        return f"moved {self.moved} entries to key version 2, {self.current} already current, {len(self.failed)} not moved"


def _rekeyed(entry: Entry, meta: dict, provenance: Provenance) -> Entry:
    """The entry under its new key, if its source file still proves the old key; SplitVLMError otherwise."""
    source = meta.get("source", "")
    data = read_image_bytes(source)  # ImageError: the source is gone or unreadable
    mine = dataclasses.replace(provenance, profile=meta.get("profile") or provenance.profile,
                               dtype=meta.get("dtype") or provenance.dtype)
    old = make_key_v1(data, model_id=meta.get("model_id", ""), model_fingerprint=meta.get("model_fingerprint", ""),
                      preprocess=mine.key_fields()["preprocess"], profile=mine.profile)
    if old != entry.key:
        raise SplitVLMError(f"{entry.key}: {source} no longer gives this key (the file changed, or the entry was made "
                            "with other preprocessing); re-encode it")
    if meta.get("model_fingerprint") != provenance.model_fingerprint:
        raise SplitVLMError(f"{entry.key}: made by other vision weights than --model's; rekey with that model")
    digest = image_digest(data)
    return Entry(mine.key_of_digest(digest), entry.image_embeds, entry.image_grid_thw,
                 {**entry.meta, **mine.meta(digest)})


def rekey(cfg: Config) -> RekeyStats:
    """Every entry without this version's key: re-read its source file, prove the old key, store it
    under the new key, then remove the old one. Resumable: a rerun finishes what a killed run left."""
    provenance = Provenance.of(cfg)
    stats = RekeyStats()
    with EmbeddingStore(cfg.store) as store:
        old = []
        for key, meta in store.metas():
            if not has_old_key(meta):
                stats.current += 1  # this version's key, or not an encoder's entry (no fingerprint to rekey by)
            else:
                old.append((key, meta))
        for start in range(0, len(old), BATCH):
            moved, gone = [], []
            for key, meta in old[start:start + BATCH]:
                try:
                    moved.append(_rekeyed(store.get(key), meta, provenance))
                    gone.append(key)
                except SplitVLMError as exc:
                    stats.failed.append(str(exc) if str(exc).startswith(key) else f"{key}: {exc}")
            store.put_many(moved)  # an entry already moved by a killed run is skipped, not written twice
            store.delete(gone)
            stats.moved += len(gone)
    return stats
