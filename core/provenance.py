"""Provenance: what decides an embedding's bytes (the key) and where it came from (the metadata), in one place."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from splitvlm.core.config import Config
from splitvlm.core.identity import model_fingerprint, model_id, preprocess_identity
from splitvlm.store.key import (
    KEY_VERSION,
    canonical_json,
    has_old_key,
    image_digest,
    key_from_digest,
)

KEY_FIELDS = ("model_fingerprint", "preprocess", "profile", "dtype")


@dataclass(frozen=True)
class Provenance:
    """The settings that decide a stored embedding's bytes, and the model's name as metadata only.

    The store key, the entry metadata and the result cache all read them from here.
    """

    model_fingerprint: str  # blake3 of the vision config and vision weights
    preprocess_json: str  # canonical JSON of the image processor's settings and the loader version
    profile: str  # the encoder profile (exact or fast): which tower kernels ran
    dtype: str
    model_id: str  # the path or hub id as given: metadata, never key

    @classmethod
    def of(cls, cfg: Config) -> Provenance:
        preprocess = preprocess_identity(cfg.model, cfg.mm_processor_kwargs)
        return cls(model_fingerprint(cfg.model), canonical_json(preprocess).decode(), cfg.profile, cfg.dtype,
                   model_id(cfg.model))

    def key_fields(self) -> dict:
        return {"model_fingerprint": self.model_fingerprint, "preprocess": json.loads(self.preprocess_json),
                "profile": self.profile, "dtype": self.dtype}

    def key_of_digest(self, digest: bytes) -> str:
        return key_from_digest(digest, **self.key_fields())

    def meta(self, digest: bytes) -> dict[str, str]:
        """What an entry records of its making (besides the versions, device and source path)."""
        return {"model_id": self.model_id, "model_fingerprint": self.model_fingerprint,
                "key_version": KEY_VERSION.decode(), "image_blake3": digest.hex(),
                "provenance": canonical_json(self.key_fields()).decode()}

    def differences(self, recorded: str) -> list[str]:
        """How the key fields recorded in an entry ("provenance" metadata) differ from these."""
        try:
            theirs = json.loads(recorded)
        except (TypeError, ValueError):
            return ["its settings are not recorded"]
        ours = self.key_fields()
        out = []
        for name in KEY_FIELDS:
            if name == "preprocess":
                out += [f"preprocess {k} {theirs.get(name, {}).get(k)!r} (here {ours[name].get(k)!r})"
                        for k in sorted(set(ours[name]) | set(theirs.get(name, {})))
                        if ours[name].get(k) != theirs.get(name, {}).get(k)]
            elif theirs.get(name) != ours[name]:
                out.append(f"{name} {theirs.get(name)} (here {ours[name]})")
        return out


class KeyMaker:
    """Keys under one config: the fingerprint and preprocessing are read once; callable on image bytes."""

    def __init__(self, cfg: Config):
        self.provenance = Provenance.of(cfg)
        self.fingerprint = self.provenance.model_fingerprint
        self.model_id = self.provenance.model_id

    def __call__(self, image_bytes: bytes) -> str:
        return self.provenance.key_of_digest(image_digest(image_bytes))


def explain_misses(provenance: Provenance, wanted: dict[str, bytes], metas: Iterable[tuple[str, dict]]) -> dict[str, str]:
    """For images missing from a store (name -> image digest), why: the same image stored under
    other settings (which differ), or keys of an old version. One pass over the entries' metadata."""
    by_digest = {digest.hex(): name for name, digest in wanted.items()}
    why: dict[str, str] = {}
    old = 0
    for key, meta in metas:
        if has_old_key(meta):
            old += 1
            continue
        name = by_digest.get(meta.get("image_blake3", ""))
        if name is not None and name not in why:
            diffs = provenance.differences(meta.get("provenance", ""))
            why[name] = f"stored under other settings as {key[:16]}…: {'; '.join(diffs) or 'same settings'}"
    if old:
        for name in wanted:
            why.setdefault(name, f"the store holds {old} entries with old-version keys; "
                                 "run `splitvlm store rekey` to move them to this version's keys")
    return why
