"""Generated sample images and prompts for tests, benchmarks and the demo (deterministic)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PROMPTS = [
    "Describe this image.",
    "What colours do you see?",
    "请详细描述这张图片的内容，包括颜色、形状和文字。",
    "Is there any text in the picture? Read it.",
    "这张图片里有什么？",
    "Count the shapes.",
    "What is in the centre?",
    "Give a one-line caption.",
]
SIZES = [(224, 224), (200, 300), (448, 336), (320, 480), (512, 512), (600, 400), (640, 480), (800, 600)]


def red_square(size: int = 256) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    m = size // 8
    d.rectangle([m, m, size - m, size - m], fill=(220, 20, 20), outline="black", width=max(2, size // 40))
    d.text((size // 2, size // 2), "RED SQUARE", fill="white", anchor="mm", font_size=max(10, size // 10))
    return img


def rainbow_flag(width: int = 360, height: int = 240) -> Image.Image:
    colours = [(228, 3, 3), (255, 140, 0), (255, 237, 0), (0, 128, 38), (0, 77, 255), (75, 0, 130), (117, 7, 135)]
    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    stripe = height / len(colours)
    for i, c in enumerate(colours):
        d.rectangle([0, round(i * stripe), width, round((i + 1) * stripe)], fill=c)
    return img


def blue_circle(size: int = 300) -> Image.Image:
    img = Image.new("RGB", (size, size), (250, 250, 235))
    d = ImageDraw.Draw(img)
    d.ellipse([size // 6, size // 6, size * 5 // 6, size * 5 // 6], fill=(30, 60, 200), outline="black", width=3)
    d.text((size // 2, size - 20), "CIRCLE", fill="black", anchor="mm", font_size=18)
    return img


def synthetic_image(i: int, size: tuple[int, int] | None = None, seed: int = 0) -> Image.Image:
    """Image i of a deterministic family: shapes, stripes, gradients and noise of varied sizes."""
    rng = np.random.default_rng(seed * 100_003 + i)
    w, h = size or SIZES[i % len(SIZES)]
    kind = i % 4
    y, x = np.mgrid[0:h, 0:w]
    if kind == 0:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif kind == 1:
        period = int(rng.integers(8, 64))
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        mask = ((x // period + y // period) % 2)[..., None]
        arr = np.where(mask, c1, c2).astype(np.uint8)
    elif kind == 2:
        c = rng.random(3)
        arr = np.stack([(x / w * 255 * c[0]), (y / h * 255 * c[1]), ((x + y) / (w + h) * 255 * c[2])], -1).astype(np.uint8)
    else:
        arr = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(8, max(9, w // 2))), y0 + int(rng.integers(8, max(9, h // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    return img


def save_corpus(folder, n: int, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[str]:
    """Write n synthetic PNGs into folder; returns their paths."""
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = sizes[i % len(sizes)] if sizes else None
        p = out / f"img{i:05d}.png"
        if not p.exists():
            synthetic_image(i, size, seed).save(p)
        paths.append(str(p))
    return paths
