"""store rekey: move entries made under version-1 keys or by an older image loader to this version's keys."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.identity import LEGACY_LOADER_VERSION, legacy_preprocess, with_loader
from splitvlm.core.images import image_from_bytes, read_image_bytes
from splitvlm.core.images_legacy import image_from_bytes_legacy
from splitvlm.core.provenance import Provenance, old_loader
from splitvlm.store import EmbeddingStore, Entry
from splitvlm.store.key import (
    canonical_json,
    has_old_key,
    image_digest,
    key_from_digest,
    make_key_v1,
)

BATCH = 64


class NeedsReencode(SplitVLMError):
    """An old loader's entry whose image decodes to other pixels under this loader."""


@dataclass
class RekeyStats:
    moved: int = 0
    current: int = 0  # already under this version's keys and loader
    reencode: int = 0  # made by the old loader from pixels this loader does not give: left as they are
    failed: list[str] = field(default_factory=list)  # one line each, naming the key (re-encode ones too)

    def summary(self) -> str:
        again = f" ({self.reencode} of them need re-encoding: their images decode to other pixels now)"
        return (f"moved {self.moved} entries to this version's keys, {self.current} already current, "
                f"{len(self.failed)} not moved" + (again if self.reencode else ""))


def _same_pixels(data: bytes, source: str, image_loader: str, key: str) -> None:
    """NeedsReencode unless the old loader and this one give these bytes the same pixels."""
    old = np.asarray(image_from_bytes_legacy(data, source))
    new = np.asarray(image_from_bytes(data, source, image_loader))
    if old.shape != new.shape or not np.array_equal(old, new):
        raise NeedsReencode(f"{key}: needs re-encode: {source} decodes to other pixels under the {image_loader} "
                            f"loader than under {LEGACY_LOADER_VERSION}; left as it is")


def _rekeyed(entry: Entry, meta: dict, provenance: Provenance) -> Entry:
    """The entry under its new key, if its source file still proves the old key (and, for an old
    loader's entry, decodes to the same pixels now); SplitVLMError otherwise."""
    source = meta.get("source", "")
    if meta.get("model_fingerprint") != provenance.model_fingerprint:
        raise SplitVLMError(f"{entry.key}: made by other vision weights than --model's; rekey with that model")
    data = read_image_bytes(source)  # ImageError: the source is gone or unreadable
    digest = image_digest(data)
    image_loader = json.loads(provenance.preprocess_json)["image_loader"]
    if has_old_key(meta):  # version 1: the key proves the settings, the current loader's or the old one's
        mine = dataclasses.replace(provenance, profile=meta.get("profile") or provenance.profile,
                                   dtype=meta.get("dtype") or provenance.dtype)
        preprocess = mine.key_fields()["preprocess"]
        made = [p for p in (preprocess, legacy_preprocess(preprocess))
                if make_key_v1(data, model_id=meta.get("model_id", ""), model_fingerprint=meta.get("model_fingerprint", ""),
                               preprocess=p, profile=mine.profile) == entry.key]
        if not made:
            raise SplitVLMError(f"{entry.key}: {source} no longer gives this key (the file changed, or the entry was "
                                "made with other preprocessing); re-encode it")
        if made[0] is not preprocess:
            _same_pixels(data, source, image_loader, entry.key)
    else:  # this version's key, made by an older loader: the recorded settings give the key
        fields = json.loads(meta["provenance"])
        theirs = {k: fields[k] for k in ("model_fingerprint", "preprocess", "profile", "dtype")}
        if meta.get("image_blake3") != digest.hex() or key_from_digest(digest, **theirs) != entry.key:
            raise SplitVLMError(f"{entry.key}: {source} no longer gives this key (the file changed); re-encode it")
        if fields.get("family", provenance.family) != provenance.family:
            raise SplitVLMError(f"{entry.key}: made by a {fields.get('family')} model, not --model's; rekey with that model")
        _same_pixels(data, source, image_loader, entry.key)
        mine = dataclasses.replace(provenance, profile=theirs["profile"], dtype=theirs["dtype"],
                                   preprocess_json=canonical_json(with_loader(theirs["preprocess"], image_loader)).decode())
    return Entry(mine.key_of_digest(digest), entry.image_embeds, entry.image_grid_thw,
                 {**entry.meta, **mine.meta(digest)})


def rekey(cfg: Config) -> RekeyStats:
    """Every entry under an older key or made by an older image loader: re-read its source file, prove
    the old key (an old loader's entry must also decode to the same pixels under cfg.image_loader), store
    it under the new key, then remove the old one. Resumable: a rerun finishes what a killed run left."""
    provenance = Provenance.of(cfg)
    stats = RekeyStats()
    with EmbeddingStore(cfg.store) as store:
        old = []
        for key, meta in store.metas():
            if has_old_key(meta) or old_loader(meta):
                old.append((key, meta))
            else:  # this version's key and loader, or not an encoder's entry (no fingerprint to rekey by)
                stats.current += 1
        for start in range(0, len(old), BATCH):
            moved, gone = [], []
            for key, meta in old[start:start + BATCH]:
                try:
                    moved.append(_rekeyed(store.get(key), meta, provenance))
                    gone.append(key)
                except NeedsReencode as exc:
                    stats.reencode += 1
                    stats.failed.append(str(exc))
                except SplitVLMError as exc:
                    stats.failed.append(str(exc) if str(exc).startswith(key) else f"{key}: {exc}")
            store.put_many(moved)  # an entry already moved by a killed run is skipped, not written twice
            store.delete(gone)
            stats.moved += len(gone)
    return stats
