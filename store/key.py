"""The content address of an embedding: blake3 over the image bytes and everything that shapes its tensor."""

from __future__ import annotations

import json
import struct
from typing import Any

import blake3

from splitvlm.store.errors import StoreError

KEY_VERSION = b"splitvlm.key/2"
KEY_VERSION_1 = b"splitvlm.key/1"  # keys that held the model's path; `splitvlm store rekey` moves them
KEY_HEX_LENGTH = 64


def canonical_json(value: Any, what: str = "preprocess") -> bytes:
    """JSON with sorted keys and no spaces; the same value gives the same bytes in every process."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be plain JSON (str, int, float, bool, None, list, dict): {exc}") from None
    return text.encode("ascii")


def _add_field(h: blake3.blake3, name: bytes, value: bytes | bytearray | memoryview) -> None:
    """u64 length of the name, the name, u64 length of the value, the value (lengths little-endian)."""
    h.update(struct.pack("<Q", len(name)) + name + struct.pack("<Q", len(value)))
    h.update(value)


def image_digest(image_bytes: bytes | bytearray | memoryview) -> bytes:
    """blake3 of an image file's bytes: what the key knows of the image (stored as image_blake3)."""
    if not isinstance(image_bytes, (bytes, bytearray, memoryview)):
        raise StoreError(f"image_bytes must be bytes, not {type(image_bytes).__name__}")
    return blake3.blake3(memoryview(image_bytes).cast("B")).digest()


def make_key(
    image_bytes: bytes,
    *,
    model_fingerprint: str,
    preprocess: dict,
    profile: str,
    dtype: str,
) -> str:
    """The store key (64 hex digits) of one image under everything that decides its embedding's bytes.

    Content only: the image's blake3, the vision weights' fingerprint, the preprocessing (loader
    version included), the encoder profile and the dtype. No path or hub id, so a store made on
    one machine is found on another. Every field goes in with its name and its length; the
    recipe is written out in docs/store-format.md.
    """
    return key_from_digest(image_digest(image_bytes), model_fingerprint=model_fingerprint,
                           preprocess=preprocess, profile=profile, dtype=dtype)


def key_from_digest(digest: bytes, *, model_fingerprint: str, preprocess: dict, profile: str, dtype: str) -> str:
    """make_key from the image's blake3 digest (as recorded in an entry), without the image."""
    if not isinstance(preprocess, dict):
        raise StoreError(f"preprocess must be a dict, not {type(preprocess).__name__}")
    for name, text in (("model_fingerprint", model_fingerprint), ("profile", profile), ("dtype", dtype)):
        if not isinstance(text, str) or not text:
            raise StoreError(f"{name} must be a non-empty string, got {text!r}")
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise StoreError("the image digest must be 32 bytes of blake3")
    h = blake3.blake3()
    _add_field(h, b"version", KEY_VERSION)
    _add_field(h, b"image_blake3", digest)
    _add_field(h, b"model_fingerprint", model_fingerprint.encode("utf-8"))
    _add_field(h, b"preprocess", canonical_json(preprocess))
    _add_field(h, b"profile", profile.encode("utf-8"))
    _add_field(h, b"dtype", dtype.encode("utf-8"))
    return h.hexdigest()


def make_key_v1(image_bytes: bytes, *, model_id: str, model_fingerprint: str, preprocess: dict, profile: str) -> str:
    """The version-1 key (it held the model's path or hub id, and no dtype); only `store rekey` uses it."""
    image = memoryview(image_bytes).cast("B")
    h = blake3.blake3()
    _add_field(h, b"version", KEY_VERSION_1)
    _add_field(h, b"image", image)
    _add_field(h, b"model_id", model_id.encode("utf-8"))
    _add_field(h, b"model_fingerprint", model_fingerprint.encode("utf-8"))
    _add_field(h, b"preprocess", canonical_json(preprocess))
    _add_field(h, b"profile", profile.encode("utf-8"))
    return h.hexdigest()


def has_old_key(meta: dict) -> bool:
    """An encoder's entry (it records a model fingerprint) stored under a key of an older version."""
    return "model_fingerprint" in meta and meta.get("key_version") != KEY_VERSION.decode()


def is_key(text: str) -> bool:
    return len(text) == KEY_HEX_LENGTH and all(c in "0123456789abcdef" for c in text)
