"""Provenance: what decides an embedding's bytes (the key) and where it came from (the metadata), in one place."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from splitvlm.core.config import Config
from splitvlm.core.families import LEGACY, layout_of_model
from splitvlm.core.identity import LOADER_VERSION, model_fingerprint, model_id, preprocess_identity
from splitvlm.store.key import (
    KEY_VERSION,
    canonical_json,
    has_old_key,
    image_digest,
    key_from_digest,
)

KEY_FIELDS = ("model_fingerprint", "preprocess", "profile", "dtype")


def tower_id(family: str, fingerprint: str) -> str:
    """What a key's model_fingerprint field holds: the family's name, then the fingerprint. Qwen2-VL,
    whose keys were made before there were families, keeps the bare fingerprint (and its keys)."""
    return fingerprint if family == LEGACY.name else f"{family}:{fingerprint}"


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
    family: str = LEGACY.name  # the model family (core.families): in the key, through tower_id
    width: int = 0  # an embedding's width (Qwen3-VL: hidden × (1 + deepstack)): metadata
    deepstack: int = 0  # deepstack levels inside that width: metadata

    @classmethod
    def of(cls, cfg: Config) -> Provenance:
        preprocess = preprocess_identity(cfg.model, cfg.mm_processor_kwargs, cfg.image_loader)
        family, layout = layout_of_model(cfg.model)
        return cls(model_fingerprint(cfg.model), canonical_json(preprocess).decode(), cfg.profile, cfg.dtype,
                   model_id(cfg.model), family.name, layout.width, layout.deepstack)

    def key_fields(self) -> dict:
        """What the key is made of (store.key.key_from_digest's fields)."""
        return {"model_fingerprint": tower_id(self.family, self.model_fingerprint),
                "preprocess": json.loads(self.preprocess_json), "profile": self.profile, "dtype": self.dtype}

    def layout_fields(self) -> dict:
        return {"family": self.family, "width": self.width, "deepstack": self.deepstack}

    def key_of_digest(self, digest: bytes) -> str:
        return key_from_digest(digest, **self.key_fields())

    def meta(self, digest: bytes) -> dict[str, str]:
        """What an entry records of its making (besides the versions, device and source path)."""
        return {"model_id": self.model_id, "model_fingerprint": self.model_fingerprint,
                "key_version": KEY_VERSION.decode(), "image_blake3": digest.hex(),
                "family": self.family, "deepstack": str(self.deepstack),
                "provenance": canonical_json({**self.key_fields(), **self.layout_fields()}).decode()}

    def layout_difference(self, meta: dict) -> str | None:
        """How an entry's family and layout differ from this model's (None when they agree);
        entries made before families were recorded are Qwen2-VL's, without deepstack."""
        family, deepstack = meta.get("family") or LEGACY.name, meta.get("deepstack") or "0"
        width = meta.get("hidden_size", "?")
        mine = (self.family, str(self.deepstack), str(self.width) if self.width else width)  # width 0: unknown
        if (family, deepstack, width) == mine:
            return None
        return (f"an embedding of a {family} model ({_layout_text(width, deepstack)}), but --model {self.model_id} "
                f"is a {self.family} model ({_layout_text(self.width, self.deepstack)}); re-encode it with this model")

    def differences(self, recorded: str) -> list[str]:
        """How the key fields recorded in an entry ("provenance" metadata) differ from these."""
        try:
            theirs = json.loads(recorded)
        except (TypeError, ValueError):
            return ["its settings are not recorded"]
        ours = self.key_fields()
        out = []
        if theirs.get("family", LEGACY.name) != self.family:
            out.append(f"family {theirs.get('family', LEGACY.name)} (here {self.family})")
        for name in KEY_FIELDS:
            if name == "model_fingerprint":
                mine, made = self.model_fingerprint, str(theirs.get(name)).rpartition(":")[2]
                if made != mine:
                    out.append(f"{name} {made} (here {mine})")
            elif name == "preprocess":
                out += [f"preprocess {k} {theirs.get(name, {}).get(k)!r} (here {ours[name].get(k)!r})"
                        for k in sorted(set(ours[name]) | set(theirs.get(name, {})))
                        if ours[name].get(k) != theirs.get(name, {}).get(k)]
            elif theirs.get(name) != ours[name]:
                out.append(f"{name} {theirs.get(name)} (here {ours[name]})")
        return out


def _layout_text(width: int | str, deepstack: int | str) -> str:
    return f"width {width}" + (f", {deepstack} deepstack levels" if str(deepstack) != "0" else "")


class KeyMaker:
    """Keys under one config: the fingerprint and preprocessing are read once; callable on image bytes."""

    def __init__(self, cfg: Config):
        self.provenance = Provenance.of(cfg)
        self.fingerprint = self.provenance.model_fingerprint
        self.model_id = self.provenance.model_id

    def __call__(self, image_bytes: bytes) -> str:
        return self.provenance.key_of_digest(image_digest(image_bytes))


def recorded_preprocess(meta: dict) -> dict | None:
    """The preprocessing an entry records in its provenance metadata (None when it records none)."""
    try:
        value = json.loads(meta.get("provenance") or "").get("preprocess")
    except (TypeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, dict) else None


def old_loader(meta: dict) -> bool:
    """An encoder's entry under this version's key, made by an image loader of an older version."""
    preprocess = recorded_preprocess(meta)
    return not has_old_key(meta) and preprocess is not None and preprocess.get("loader") != LOADER_VERSION


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
            if old_loader(meta):
                why[name] += ("; made by an older image loader: `splitvlm store rekey` carries it over if the image "
                              "decodes to the same pixels now, else re-encode it")
    if old:
        for name in wanted:
            why.setdefault(name, f"the store holds {old} entries with old-version keys; "
                                 "run `splitvlm store rekey` to move them to this version's keys")
    return why
