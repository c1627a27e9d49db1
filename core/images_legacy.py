"""The retired loader "splitvlm-images-1", kept only so `store rekey` can tell which old entries still hold."""

from __future__ import annotations

from PIL import Image, ImageOps

from splitvlm.core.images import DEEP_MODES, ImageError, _strips, _to_8bit, load_pixels, open_image


def image_from_bytes_legacy(data: bytes, name: str = "<bytes>") -> Image.Image:
    """The RGB image splitvlm-images-1 made of these bytes: the first frame, EXIF orientation, deep grey
    scaled to 8 bits, palette transparency (only) and alpha composited over white by alpha_composite."""
    img = open_image(data, name)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: broken or truncated image ({exc})") from None
    load_pixels(img, name)
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # the old loader failed on these bytes, so no entry was made of them
        raise ImageError(f"{name}: EXIF orientation failed ({type(exc).__name__})") from None
    if img.mode in DEEP_MODES:
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
    if img.mode != "RGBA":
        return img.convert("RGB") if img.mode != "RGB" else img
    out = Image.new("RGB", img.size)
    for box in _strips(img):
        strip = img.crop(box)
        white = Image.new("RGBA", strip.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, strip).convert("RGB"), box[:2])
    return out
