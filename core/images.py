"""The one image loader of splitvlm: encode, decode, verify and the end-to-end reference all use it.

Rules (documented in docs/store-format.md): the first frame of an animated image; EXIF
orientation applied; palette, grey and CMYK converted to RGB; alpha composited over white;
16-bit and float images scaled to 8 bits. The key is made from the file's bytes, so any
change to the file gives another key.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from splitvlm.core.errors import SplitVLMError

MAX_PIXELS = 100_000_000  # larger is treated as a decompression bomb
MAX_ASPECT = 200  # Qwen2-VL refuses more extreme aspect ratios
MIN_SIDE = 4
MAX_FILE_BYTES = 256 * 1024 * 1024  # no image file of a usable size is larger
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(SplitVLMError):
    """An input that is not a usable image; the message says why in one line."""


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES; FIFOs and devices are never opened."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise ImageError(f"{p}: broken link")
    try:
        info = p.stat()
    except OSError as exc:
        raise ImageError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{p}: is a folder, not an image")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{p}: not a regular file (a FIFO, socket or device), not read")
    if info.st_size > MAX_FILE_BYTES:
        raise ImageError(f"{p}: {info.st_size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit for an image file")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImageError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{p}: grew past the {MAX_FILE_BYTES:,}-byte limit while being read")
    if not data:
        raise ImageError(f"{p}: empty file (0 bytes)")
    return data


def _to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        arr = arr / 257.0 if img.mode.startswith("I;16") or arr.max() <= 65535 else arr / arr.max() * 255
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Bytes to an RGB PIL image by the canonical rules; ImageError with one line on bad input."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{name}: {w}x{h} is over {MAX_PIXELS:,} pixels (decompression bomb?)")
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: too many pixels (decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: broken or truncated image ({exc})") from None
    img = ImageOps.exif_transpose(img)
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: {w}x{h} is too small (a side under {MIN_SIDE} px)")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ImageError(f"{name}: {w}x{h} has an aspect ratio over {MAX_ASPECT}:1")
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | os.PathLike) -> tuple[bytes, Image.Image]:
    """The file's bytes (for the key) and its canonical RGB image."""
    data = read_image_bytes(path)
    return data, decode_image(data, str(path))
