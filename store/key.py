"""The content address of an embedding: blake3 over the image bytes and everything that shapes its tensor."""

from __future__ import annotations

import json
import struct
from typing import Any

import blake3

from splitvlm.store.errors import StoreError

KEY_VERSION = b"splitvlm.key/1"
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


def make_key(
    image_bytes: bytes,
    *,
    model_id: str,
    model_fingerprint: str,
    preprocess: dict,
    profile: str,
) -> str:
    """The store key (64 hex digits) of one image under one model, preprocessing and encoder profile.

    Every field goes in with its name and its length, so no two different inputs hash the same
    bytes; the recipe is written out in docs/store-format.md.
    """
    if not isinstance(image_bytes, (bytes, bytearray, memoryview)):
        raise StoreError(f"image_bytes must be bytes, not {type(image_bytes).__name__}")
    if not isinstance(preprocess, dict):
        raise StoreError(f"preprocess must be a dict, not {type(preprocess).__name__}")
    for name, text in (("model_id", model_id), ("model_fingerprint", model_fingerprint), ("profile", profile)):
        if not isinstance(text, str) or not text:
            raise StoreError(f"{name} must be a non-empty string, got {text!r}")
    image = memoryview(image_bytes).cast("B")
    h = blake3.blake3()
    _add_field(h, b"version", KEY_VERSION)
    _add_field(h, b"image", image)
    _add_field(h, b"model_id", model_id.encode("utf-8"))
    _add_field(h, b"model_fingerprint", model_fingerprint.encode("utf-8"))
    _add_field(h, b"preprocess", canonical_json(preprocess))
    _add_field(h, b"profile", profile.encode("utf-8"))
    return h.hexdigest()


def is_key(text: str) -> bool:
    return len(text) == KEY_HEX_LENGTH and all(c in "0123456789abcdef" for c in text)
