"""The canonical image loader: one documented way for every odd image, one-line errors for bad ones."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from splitvlm.core.images import ImageError, image_from_bytes, read_image_bytes
from splitvlm.core.sources import load_image


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgb_passes_through_unchanged():
    arr = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = image_from_bytes(encoded(Image.fromarray(arr)))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), arr)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = image_from_bytes(encoded(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_alpha_is_composited_over_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert image_from_bytes(encoded(img)).getpixel((5, 5)) == (255, 255, 255)
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    assert image_from_bytes(encoded(img)).getpixel((5, 5)) == (255, 0, 0)


def test_palette_grey_cmyk_and_16_bit_become_rgb():
    pal = Image.new("P", (10, 10), 3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 756)
    assert image_from_bytes(encoded(pal)).getpixel((0, 0)) == (70, 80, 90)
    assert image_from_bytes(encoded(Image.new("L", (10, 10), 77))).getpixel((0, 0)) == (77, 77, 77)
    cmyk = image_from_bytes(encoded(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = cmyk.getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    deep = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))
    assert image_from_bytes(encoded(deep)).getpixel((0, 0)) == (255, 255, 255)
    mid = encoded(Image.fromarray(np.full((10, 10), 1000, dtype=np.uint16)))
    assert image_from_bytes(mid).getpixel((0, 0)) == (255, 255, 255)  # vLLM's convert("RGB") clips 16-bit
    assert image_from_bytes(mid, loader="scaled").getpixel((0, 0)) == (4, 4, 4)  # rint(1000 / 257)


def test_animated_image_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ("blue", "red", "green")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = image_from_bytes(buf.getvalue()).getpixel((8, 8))
    assert b > 200 and r < 50


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"hello, not an image", "not an image"),
        (encoded(Image.new("RGB", (64, 64), "red"))[:60], "truncated"),
        (encoded(Image.new("RGB", (1000, 4), "red")), "aspect ratio"),
        (encoded(Image.new("RGB", (2, 2), "red")), "too small"),
    ],
)
def test_bad_bytes_give_one_line_errors(data, reason):
    with pytest.raises(ImageError) as err:
        image_from_bytes(data, "x.png")
    assert reason in str(err.value) and "\n" not in str(err.value) and "x.png" in str(err.value)


def test_decompression_bomb_is_refused(monkeypatch):
    import splitvlm.core.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="pixels"):
        image_from_bytes(encoded(Image.new("RGB", (20, 20))), "bomb.png")


def test_bad_paths(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    for name, reason in [("empty.png", "empty"), ("folder.png", "folder"), ("link.png", "broken link"),
                         ("missing.png", "cannot read")]:
        with pytest.raises(ImageError, match=reason):
            read_image_bytes(tmp_path / name)
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "ok.png")
    data, img = load_image(tmp_path / "ok.png")
    assert data == (tmp_path / "ok.png").read_bytes() and img.size == (20, 20)


def test_fifo_device_and_oversized_files_are_refused_without_reading(tmp_path, monkeypatch):
    import splitvlm.core.images as images

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(ImageError, match="not a regular file"):
        read_image_bytes(fifo)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(ImageError, match="not a regular file"):
        read_image_bytes(zero)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * 2000)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ImageError, match="over the 1,000-byte limit"):
        read_image_bytes(big)
