"""splitvlm's default image loader gives vLLM's ImageMediaIO pixels for every odd format; "scaled" is keyed."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import config
from PIL import Image
from vllm.multimodal.media.image import ImageMediaIO

import splitvlm.core.images as images
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.identity import LOADER_VERSION, legacy_preprocess, preprocess_identity
from splitvlm.core.images import ImageError, image_from_bytes, u16_to_u8
from splitvlm.core.images_legacy import image_from_bytes_legacy
from splitvlm.core.provenance import KeyMaker, Provenance, explain_misses
from splitvlm.core.sources import load_image
from splitvlm.encoder.rekey import rekey
from splitvlm.store import EmbeddingStore, Entry
from splitvlm.store.key import canonical_json, image_digest, key_from_digest, make_key_v1

W, H = 37, 23
RNG = np.random.default_rng(17)


def rand(*shape: int, top: int = 256, dtype=np.uint8) -> np.ndarray:
    return RNG.integers(0, top, shape, dtype=dtype)


def saved(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_rgb16(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow does not write them)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def palette(transparency: object = None) -> bytes:
    img = Image.fromarray(rand(H, W), "L").convert("P")
    img.putpalette(list(rand(768)))
    return saved(img) if transparency is None else saved(img, transparency=transparency)


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return saved(Image.fromarray(rand(H, W, 3)), "JPEG", quality=95, exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(rand(H, W, 3)) for _ in range(3)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return saved(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **kw)


RGBA = Image.fromarray(rand(H, W, 4), "RGBA")  # every alpha value, not only 0 and 255
CASES: dict[str, Callable[[], bytes]] = {
    "rgb": lambda: saved(Image.fromarray(rand(H, W, 3))),
    "grey L": lambda: saved(Image.fromarray(rand(H, W))),
    "grey+alpha LA": lambda: saved(Image.fromarray(rand(H, W, 2), "LA")),
    "RGBA": lambda: saved(RGBA),
    "palette": lambda: palette(),
    "palette, transparent index": lambda: palette(7),
    "palette, alpha per index": lambda: palette(bytes(rand(256))),
    "grey with tRNS": lambda: saved(Image.fromarray(rand(H, W)), transparency=9),
    "RGB with tRNS": lambda: saved(Image.fromarray(rand(H, W, 3, top=3)), transparency=(1, 2, 0)),
    "CMYK JPEG": lambda: saved(Image.fromarray(rand(H, W, 4), "CMYK"), "JPEG", quality=95),
    "CMYK TIFF": lambda: saved(Image.fromarray(rand(H, W, 4), "CMYK"), "TIFF"),
    "1-bit": lambda: saved(Image.fromarray(rand(H, W, top=2).astype(bool))),
    "16-bit grey PNG (I;16)": lambda: saved(Image.fromarray(rand(H, W, top=65536, dtype=np.uint16))),
    "16-bit grey PNG with tRNS": lambda: saved(Image.fromarray(rand(H, W, top=65536, dtype=np.uint16)),
                                              transparency=300),
    "16-bit big-endian TIFF (I;16B)": lambda: saved(Image.fromarray(rand(H, W, top=65536, dtype=np.uint16)
                                                                    .astype(">u2")), "TIFF"),
    "16-bit RGB PNG": lambda: png_rgb16(rand(H, W, 3, top=65536, dtype=np.uint16)),
    "32-bit I TIFF": lambda: saved(Image.fromarray(RNG.integers(-500, 70_000, (H, W), dtype=np.int32)), "TIFF"),
    "float F TIFF": lambda: saved(Image.fromarray((RNG.random((H, W)) * 300).astype(np.float32)), "TIFF"),
    "float F TIFF in [0, 1]": lambda: saved(Image.fromarray(RNG.random((H, W)).astype(np.float32)), "TIFF"),
    **{f"EXIF orientation {o} JPEG": (lambda o=o: exif_jpeg(o)) for o in range(1, 9)},
    "broken EXIF JPEG": lambda: saved(Image.fromarray(rand(H, W, 3)), "JPEG", exif=b"Exif\0\0MM\0*garbage"),
    "animated GIF": lambda: animated("GIF"),
    "animated PNG": lambda: animated("PNG"),
    "animated WebP": lambda: animated("WEBP"),
    "WebP with alpha": lambda: saved(RGBA, "WEBP", lossless=True),
    "lossy WebP with alpha": lambda: saved(RGBA, "WEBP", quality=80),
    "BMP": lambda: saved(Image.fromarray(rand(H, W, 3)), "BMP"),
    "TGA with alpha": lambda: saved(RGBA, "TGA"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    out = {}
    for i, (name, make) in enumerate(CASES.items()):
        out[name] = root / f"{i:02d}.img"
        out[name].write_bytes(make())
    return out


@pytest.mark.parametrize("strip_pixels", [images.STRIP_PIXELS, 50])  # one strip, and strips of 1-2 rows
@pytest.mark.parametrize("name", list(CASES))
def test_default_pixels_are_vllms(files, name, strip_pixels, monkeypatch):
    monkeypatch.setattr(images, "STRIP_PIXELS", strip_pixels)
    path = files[name]
    theirs = ImageMediaIO().load_file(path).media  # vLLM's own loader: image_mode RGB, white background
    data, mine = load_image(path)
    assert data == path.read_bytes() and mine.mode == theirs.mode == "RGB"
    assert np.array_equal(np.asarray(mine), np.asarray(theirs)), name


def test_the_cases_are_what_they_say(files):
    modes = {name: Image.open(files[name]).mode for name in CASES}
    assert modes["16-bit grey PNG (I;16)"] == "I;16" and modes["16-bit big-endian TIFF (I;16B)"] == "I;16B"
    assert modes["32-bit I TIFF"] == "I" and modes["float F TIFF"] == "F" and modes["1-bit"] == "1"
    assert modes["CMYK JPEG"] == "CMYK" and modes["palette, transparent index"] == "P"
    assert modes["16-bit RGB PNG"] == "RGB"  # Pillow reads 16-bit RGB PNGs as 8-bit RGB (the high bytes)
    assert image_from_bytes(files["EXIF orientation 6 JPEG"].read_bytes()).size == (H, W)  # turned, as vLLM does


def test_sixteen_bit_grey_is_vllms_by_default_and_rint_257_when_scaled(files):
    data = files["16-bit grey PNG (I;16)"].read_bytes()
    raw = np.asarray(Image.open(io.BytesIO(data))).astype(np.uint16)
    default, scaled = np.asarray(image_from_bytes(data)), np.asarray(image_from_bytes(data, loader="scaled"))
    assert np.array_equal(default, np.asarray(ImageMediaIO().load_bytes(data).media))
    assert np.array_equal(scaled, np.repeat(u16_to_u8(raw)[..., None], 3, axis=2))
    assert np.array_equal(scaled, np.asarray(image_from_bytes_legacy(data)))  # today's 16-bit values, kept
    assert default.mean() > 200 and abs(scaled.mean() - raw.mean() / 257) < 1  # vLLM saturates, scaled does not
    rgb = files["RGBA"].read_bytes()  # "scaled" differs from "vllm" only for deep grey
    assert np.array_equal(np.asarray(image_from_bytes(rgb, loader="scaled")), np.asarray(image_from_bytes(rgb)))


def test_refusals_stay_one_line_and_name_the_input(tmp_path):
    with pytest.raises(ImageError, match="unknown image loader"):
        image_from_bytes(b"", "x.png", loader="other")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # vLLM does not open EPS (Ghostscript)
    for data, reason in [(eps, "not an image file"), (saved(RGBA)[:80], "truncated")]:
        with pytest.raises(ImageError, match=reason) as err:
            image_from_bytes(data, "odd.img")
        assert "\n" not in str(err.value) and "odd.img" in str(err.value)


def test_the_loader_is_in_the_key_and_old_loader_keys_differ(tiny_model, tmp_path):
    data = saved(Image.fromarray(rand(H, W, 3)))
    vllm, scaled = (KeyMaker(config(tiny_model, tmp_path / "S", image_loader=x)) for x in ("vllm", "scaled"))
    assert vllm(data) != scaled(data)
    fields = vllm.provenance.key_fields()
    assert fields["preprocess"]["loader"] == LOADER_VERSION and fields["preprocess"]["image_loader"] == "vllm"
    old = key_from_digest(image_digest(data), **{**fields, "preprocess": legacy_preprocess(fields["preprocess"])})
    assert old != vllm(data) and old != scaled(data)
    assert preprocess_identity(tiny_model, {}, "scaled")["image_loader"] == "scaled"
    with pytest.raises(SplitVLMError, match="image loader 'other'"):
        config(tiny_model, tmp_path / "S", image_loader="other")


def old_entry(prov: Provenance, source: Path) -> Entry:
    """An entry as splitvlm-images-1 stored it (this key version, the old loader in its preprocessing)."""
    import torch

    legacy = legacy_preprocess(prov.key_fields()["preprocess"])
    old = dataclasses.replace(prov, preprocess_json=canonical_json(legacy).decode())
    digest = image_digest(source.read_bytes())
    meta = {**old.meta(digest), "source": str(source), "profile": prov.profile, "dtype": prov.dtype}
    embeds = torch.randn(4, prov.width or 64).to(torch.bfloat16)
    return Entry(old.key_of_digest(digest), embeds, torch.tensor([[1, 4, 4]]), meta)


def v1_entry(prov: Provenance, source: Path) -> Entry:
    """An entry of splitvlm 0.1: a version-1 key, made by the old loader, 0.1's metadata."""
    entry = old_entry(prov, source)
    meta = {k: v for k, v in entry.meta.items() if k not in ("key_version", "image_blake3", "provenance")}
    key = make_key_v1(source.read_bytes(), model_id=prov.model_id, model_fingerprint=prov.model_fingerprint,
                      preprocess=legacy_preprocess(prov.key_fields()["preprocess"]), profile=prov.profile)
    return Entry(key, entry.image_embeds, entry.image_grid_thw, meta)


def test_rekey_carries_over_old_loader_entries_only_when_the_pixels_agree(tiny_model, files, tmp_path):
    cfg = config(tiny_model, tmp_path / "store")
    prov = Provenance.of(cfg)
    same, other, v1 = files["rgb"], files["16-bit grey PNG (I;16)"], files["palette"]
    entries = [old_entry(prov, same), old_entry(prov, other), v1_entry(prov, v1)]
    with EmbeddingStore(cfg.store) as s:
        s.put_many(entries)
        metas = dict(s.metas())
    why = explain_misses(prov, {"x": image_digest(other.read_bytes())}, metas.items())["x"]
    assert f"preprocess loader 'splitvlm-images-1' (here '{LOADER_VERSION}')" in why and "store rekey" in why
    stats = rekey(cfg)
    assert stats.moved == 2 and stats.reencode == 1 and len(stats.failed) == 1
    assert entries[1].key in stats.failed[0] and "needs re-encode" in stats.failed[0] and "\n" not in stats.failed[0]
    assert "1 of them need re-encoding" in stats.summary()
    new = KeyMaker(cfg)(same.read_bytes())
    with EmbeddingStore(cfg.store) as s:  # the 16-bit image's old entry stays, and is never served as new
        assert set(s.keys()) == {new, KeyMaker(cfg)(v1.read_bytes()), entries[1].key}
        moved = s.get(new)
        assert np.array_equal(moved.image_embeds.float().numpy(), entries[0].image_embeds.float().numpy())
        assert Provenance.of(cfg).differences(moved.meta["provenance"]) == []
    again = rekey(cfg.replace(image_loader="scaled"))  # scaled keeps the old 16-bit pixels: carried over
    assert again.moved == 1 and again.reencode == 0 and not again.failed
