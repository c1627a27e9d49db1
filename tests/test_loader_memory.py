"""The loader's memory is bounded: lean 16-bit and float conversion, and a pixel budget across loader threads."""

from __future__ import annotations

import io
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from helpers import config
from PIL import Image

import splitvlm.core.images as images
from splitvlm.core.images import image_from_bytes
from splitvlm.encoder import Encoder
from splitvlm.store import EmbeddingStore


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def old_to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """The loader's conversion before this change, kept here as the reference it must equal."""
    arr = arr.astype(np.float64)
    if mode.startswith("I;16") or arr.max(initial=0) > 255:
        arr = arr / 257.0 if mode.startswith("I;16") or arr.max() <= 65535 else arr / arr.max() * 255
    elif mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def test_16_bit_conversion_equals_the_old_formula_for_every_value(monkeypatch):
    values = np.arange(65536, dtype=np.uint16)
    assert np.array_equal(images.u16_to_u8(values), old_to_8bit(values, "I;16"))
    monkeypatch.setattr(images, "STRIP_PIXELS", 1000)  # many strips, boundaries mid-image
    out = np.asarray(image_from_bytes(png(Image.fromarray(values.reshape(256, 256))), loader="scaled"))
    assert np.array_equal(out, np.repeat(old_to_8bit(values, "I;16").reshape(256, 256, 1), 3, axis=2))


@pytest.mark.parametrize("scale", [1.0, 200.0, 60000.0, 1e7])
def test_float_and_32_bit_conversion_equals_the_old_formula(monkeypatch, scale):
    monkeypatch.setattr(images, "STRIP_PIXELS", 1000)
    rng = np.random.default_rng(0)
    f = (rng.random((97, 131), dtype=np.float32) * scale - scale / 10).astype(np.float32)
    f[3, 5], f[90, 7] = scale / 2 + 0.5, -1.5  # a half (or the top of [0, 1]) and a negative
    for arr, mode in [(f, "F"), (f.astype(np.int32), "I")]:
        got = np.asarray(images._to_8bit(Image.fromarray(arr)))
        assert np.array_equal(got, old_to_8bit(arr, mode)), (mode, scale)


def test_decoding_a_large_16_bit_png_allocates_little():
    """6000x6000 I;16 PNG: 824 MiB traced at peak before (float64 copies), 41 MiB after (the 8-bit result + one strip)."""
    n = 6000
    data = png(Image.fromarray((np.arange(n * n, dtype=np.uint32) % 65536).astype(np.uint16).reshape(n, n)),
               compress_level=1)
    tracemalloc.start()
    try:
        img = image_from_bytes(data, "big.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert img.size == (n, n) and img.mode == "RGB"
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


class CountingEngine:
    """Stands in for vLLM's processor: records the pixels of the images inside preprocess at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inside = self.peak = 0

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        n = image.width * image.height
        with self.lock:
            self.inside += n
            self.peak = max(self.peak, self.inside)
        time.sleep(0.1)
        with self.lock:
            self.inside -= n
        return torch.zeros(4, 8), torch.tensor([[1, 2, 2]])


def load_all(tiny_model, tmp_path, sizes, budget):
    paths = []
    for i, size in enumerate(sizes):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.new("RGB", size, (i, 0, 0)).save(paths[-1])
    engine = CountingEngine()
    encoder = Encoder(config(tiny_model, tmp_path / "store", loader_threads=4), engine=engine, pixel_budget=budget)
    with EmbeddingStore(encoder.cfg.store) as store:
        loaded = list(encoder._loaded(paths, store))
    assert all(not isinstance(item, tuple) for item in loaded) and len(loaded) == len(sizes)
    assert encoder.pixels.in_use == 0
    return encoder, engine


def test_loader_threads_hold_at_most_the_pixel_budget(tiny_model, tmp_path):
    encoder, engine = load_all(tiny_model, tmp_path, [(100, 100)] * 8, budget=25_000)
    assert engine.peak <= 25_000 and encoder.pixels.peak <= 25_000
    assert encoder.pixels.peak == 20_000  # two at once still fit: the threads are not serialised


def test_an_image_over_the_whole_budget_runs_alone(tiny_model, tmp_path):
    sizes = [(100, 100), (100, 100), (300, 300), (100, 100), (100, 100)]
    encoder, engine = load_all(tiny_model, tmp_path, sizes, budget=25_000)
    assert engine.peak == 90_000 and encoder.pixels.peak == 90_000  # nothing beside the big one
