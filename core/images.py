"""The one image loader of splitvlm: encode, decode, verify and the end-to-end reference all use it.

The default loader, "vllm", gives exactly the RGB pixels of vLLM's own ImageMediaIO (image_mode RGB,
white background) for the same bytes: the first frame, EXIF orientation applied as vLLM applies it,
alpha and transparency pasted over white, every other mode through Pillow's convert("RGB").
"scaled" differs only for 16-bit, 32-bit and float grey, which it scales to 8 bits first.
Rules and refusals: docs/store-format.md. The key is made from the file's bytes.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from splitvlm.core.config import IMAGE_LOADERS
from splitvlm.core.errors import SplitVLMError

MAX_PIXELS = 100_000_000  # larger is treated as a decompression bomb
MAX_ASPECT = 200  # Qwen2-VL refuses more extreme aspect ratios
MIN_SIDE = 4
STRIP_PIXELS = 1 << 20  # pixels per strip when converting: bounds the temporary copies
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # scaled to 8 bits by _to_8bit under "scaled"
MAX_FILE_BYTES = 256 * 1024 * 1024  # no image file of a usable size is larger
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
WHITE = (255, 255, 255)  # vLLM's default rgba_background_color
# vLLM 0.32's allowlist (vllm.multimodal.image.ALLOWED_IMAGE_FORMATS): Pillow's other readers
# (EPS runs Ghostscript, WMF, BUFR, GRIB, HDF5, MPEG) are never opened.
ALLOWED_FORMATS = ("AVIF", "BLP", "BMP", "CUR", "DCX", "DDS", "DIB", "FITS", "FLI", "FTEX", "GBR", "GIF", "ICNS",
                   "ICO", "IM", "IMT", "IPTC", "JPEG", "JPEG2000", "MCIDAS", "MSP", "PCD", "PCX", "PIXAR", "PNG",
                   "PPM", "PSD", "QOI", "SGI", "SPIDER", "SUN", "TGA", "TIFF", "WEBP", "XBM", "XPM", "XVTHUMB")
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


def _strips(img: Image.Image) -> Iterator[tuple[int, int, int, int]]:
    """Boxes of whole rows, about STRIP_PIXELS each: conversions copy one strip at a time."""
    w, h = img.size
    step = max(1, STRIP_PIXELS // w)
    return ((0, y, w, min(h, y + step)) for y in range(0, h, step))


def u16_to_u8(a: np.ndarray) -> np.ndarray:
    """16-bit values to 8 bits in integer math, equal to rint(a / 257) for all 65536 values."""
    q = a.astype(np.uint32)
    q += 128
    q //= 257
    return q.astype(np.uint8)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grey to 8 bits strip by strip: no full-size float copy."""
    out = np.empty((img.height, img.width), np.uint8)
    if img.mode.startswith("I;16"):
        for box in _strips(img):
            out[box[1] : box[3]] = u16_to_u8(np.asarray(img.crop(box)))
        return Image.fromarray(out)
    top = float(np.max([np.asarray(img.crop(b)).max() for b in _strips(img)], initial=0))  # NaN stays NaN
    for box in _strips(img):
        f = np.asarray(img.crop(box)).astype(np.float64)
        if top > 255:  # the same float64 formula as ever, a strip at a time
            f = f / 257.0 if top <= 65535 else f / top * 255
        elif img.mode == "F" and top <= 1.0:
            f = f * 255.0
        out[box[1] : box[3]] = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def open_image(data: bytes, name: str) -> Image.Image:
    """Bytes to an opened, not yet decoded image; refused before decoding: unknown or disallowed formats,
    decompression bombs, tiny sides and extreme aspect ratios."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: too many pixels (decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or a format vLLM does not open)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: broken or truncated image ({exc})") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: {w}x{h} is over {MAX_PIXELS:,} pixels (decompression bomb?)")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: {w}x{h} is too small (a side under {MIN_SIDE} px)")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ImageError(f"{name}: {w}x{h} has an aspect ratio over {MAX_ASPECT}:1")
    return img


def load_pixels(img: Image.Image, name: str) -> None:
    """Decode the opened frame (the first); ImageError on broken or truncated data."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: broken or truncated image ({exc})") from None


def _oriented(img: Image.Image) -> Image.Image:
    """vLLM's normalize_image: ImageOps.exif_transpose, a broken EXIF block ignored. Without an
    orientation exif_transpose returns an equal copy, which is not made."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # exif_transpose would raise the same, and vLLM keeps the image as it is
        return img
    if orientation != 1:
        with contextlib.suppress(Exception):
            img = ImageOps.exif_transpose(img)
    return img


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """vLLM's ImageMediaIO conversion to RGB, strip by strip (the same per-pixel Pillow operations):
    RGB as it is; RGBA, LA, PA and images with a "transparency" entry converted to RGBA and pasted
    over white with their alpha as the mask; every other mode by convert("RGB")."""
    if img.mode == "RGB":
        return img
    transparent = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    out = Image.new("RGB", img.size, WHITE)
    try:
        for box in _strips(img):
            strip = img.crop(box)
            if transparent:
                strip = strip if strip.mode == "RGBA" else strip.convert("RGBA")
                out.paste(strip, box[:2], mask=strip.getchannel("A"))
            else:
                out.paste(strip.convert("RGB"), box[:2])
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: cannot convert mode {img.mode} to RGB ({exc})") from None
    return out


def image_from_bytes(data: bytes, name: str = "<bytes>", loader: str = "vllm") -> Image.Image:
    """Bytes to an RGB PIL image by the loader's rules (IMAGE_LOADERS); ImageError with one line on bad input."""
    if loader not in IMAGE_LOADERS:
        raise ImageError(f"unknown image loader {loader!r} (one of {', '.join(IMAGE_LOADERS)})")
    img = open_image(data, name)
    load_pixels(img, name)
    img = _oriented(img)
    if loader == "scaled" and img.mode in DEEP_MODES:
        img = _to_8bit(img)  # the deep image is dropped before the RGB copy is made
    return to_rgb(img, name)


def image_pixels(data: bytes) -> int:
    """Pixels image_from_bytes would decode, from the header only; 0 when it would refuse the bytes first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                w, h = img.size
    except Exception:  # image_from_bytes will refuse these bytes with its own message
        return 0
    return w * h if w * h <= MAX_PIXELS else 0
