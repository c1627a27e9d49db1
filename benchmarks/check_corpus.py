"""The GPU acceptance check's corpus: real photographs, odd formats, synthetic images, bad inputs, jobs."""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from splitvlm.tools.samples import PROMPTS, synthetic_image

PHOTOS = Path(__file__).parent / "data" / "photos"


@dataclass
class Corpus:
    root: Path
    good: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # each must be listed in encode's --failures

    def add(self, name: str, img: Image.Image, fmt: str, **save) -> None:
        path = self.root / "images" / name
        img.save(path, fmt, **save)
        self.good.append(str(path))


def _photo_variants(corpus: Corpus, rng: random.Random, count: int) -> None:
    """Crops and rescales of the real photographs, 128 to 1024 px a side, as JPEG, PNG and WebP."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    for i in range(count):
        src = Image.open(photos[i % len(photos)])
        w, h = src.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        scale = rng.uniform(128, 1024) / max(cw, ch)
        img = src.crop((x, y, x + cw, y + ch)).resize((max(28, round(cw * scale)), max(28, round(ch * scale))))
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        corpus.add(f"photo{i:03d}.{ext}", img, fmt, **({"quality": 90} if fmt != "PNG" else {}))


def _odd_formats(corpus: Corpus) -> None:
    """One of each kind the loader has a rule for (docs/store-format.md)."""
    photo = Image.open(sorted(PHOTOS.glob("*.jpg"))[0]).convert("RGB")
    ramp = np.linspace(0, 65535, 300 * 200, dtype=np.uint16).reshape(200, 300)
    corpus.add("odd_16bit.png", Image.fromarray(ramp), "PNG")
    corpus.add("odd_float.tif", Image.fromarray((ramp / 65535).astype(np.float32)), "TIFF")
    corpus.add("odd_palette.png", photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")
    rgba = photo.resize((320, 240)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((320, 240)))
    corpus.add("odd_alpha.png", rgba, "PNG")
    corpus.add("odd_la.png", photo.convert("LA").resize((256, 200)), "PNG")
    corpus.add("odd_cmyk.jpg", photo.convert("CMYK"), "JPEG", quality=90)
    corpus.add("odd_grey.jpg", photo.convert("L").resize((400, 300)), "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° on display
    corpus.add("odd_exif_rotated.jpg", photo.resize((480, 320)), "JPEG", exif=exif.tobytes(), quality=90)
    corpus.add("odd_progressive.jpg", photo, "JPEG", progressive=True, quality=85)
    corpus.add("odd_bitmap.bmp", photo.resize((300, 300)), "BMP")
    corpus.add("odd_tiff.tif", photo.resize((350, 250)), "TIFF")
    frames = [photo.resize((200, 160)), photo.resize((200, 160)).rotate(180)]
    corpus.add("odd_animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    corpus.add("odd_lossless.webp", photo.resize((256, 256)), "WEBP", lossless=True)
    corpus.add("odd_small.png", photo.resize((28, 28)), "PNG")
    corpus.add("odd_large.jpg", photo.resize((1800, 1400)), "JPEG", quality=85)
    corpus.add("odd_tall.png", photo.resize((120, 1100)), "PNG")


def _bad_inputs(corpus: Corpus) -> None:
    images = corpus.root / "images"
    buf = io.BytesIO()
    synthetic_image(7, (200, 200)).save(buf, "PNG")
    for name, data in {"bad_zero.png": b"", "bad_text.jpg": b"this is not an image\n",
                       "bad_truncated.png": buf.getvalue()[:300]}.items():
        (images / name).write_bytes(data)
    Image.new("RGB", (1200, 4), "red").save(images / "bad_thin.png")
    (images / "bad_folder.png").mkdir()
    (images / "bad_link.png").symlink_to(corpus.root / "nowhere.png")
    os.mkfifo(images / "bad_fifo.png")
    (images / "bad_devzero.png").symlink_to("/dev/zero")
    corpus.bad = sorted(str(images / n) for n in ("bad_zero.png", "bad_text.jpg", "bad_truncated.png", "bad_thin.png",
                                                 "bad_folder.png", "bad_link.png", "bad_fifo.png", "bad_devzero.png"))


def make_corpus(root: str | Path, images: int, seed: int = 0) -> Corpus:
    """At least `images` good images (a fifth of them real photographs) and eight bad inputs."""
    corpus = Corpus(Path(root))
    (corpus.root / "images").mkdir(parents=True, exist_ok=False)
    rng = random.Random(seed)
    _photo_variants(corpus, rng, max(12, images // 5))
    _odd_formats(corpus)
    for i in range(max(0, images - len(corpus.good))):
        size = (rng.randint(128, 1024), rng.randint(128, 1024))
        corpus.add(f"synth{i:04d}.png", synthetic_image(i, size, seed=seed + 1), "PNG")
    _bad_inputs(corpus)
    return corpus


def write_jobs(corpus: Corpus, path: str | Path, prompts_per_image: int = 4) -> int:
    """prompts_per_image jobs per good image (Chinese prompts among them) and one two-image job."""
    jobs = []
    for i, image in enumerate(corpus.good):
        for p in range(prompts_per_image):
            jobs.append({"id": f"{i}-{p}", "images": [image], "prompt": PROMPTS[(i + 2 * p) % len(PROMPTS)]})
    jobs.append({"id": "two-images", "images": corpus.good[:2], "prompt": "比较这两张图片。Compare them."})
    Path(path).write_text("".join(json.dumps(j, ensure_ascii=False) + "\n" for j in jobs), encoding="utf-8")
    return len(jobs)
