"""The tiny model reacts to its input through the real vLLM engine, or equality tests prove nothing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

MAX_TOKENS = 24
SIZES = [(64, 64), (96, 160), (300, 120), (200, 200), (128, 256), (250, 90), (180, 300), (72, 140)]
COLOURS = [(220, 30, 30), (30, 160, 60), (40, 60, 210), (240, 200, 20), (150, 40, 170), (20, 20, 20)]


def make_image(index: int) -> Image.Image:
    """Image number `index` of a family of distinct synthetic pictures (shapes, stripes, colours, noise)."""
    rng = np.random.default_rng(1000 + index)
    width, height = SIZES[index % len(SIZES)]
    kind = index % 4
    fg = COLOURS[index % len(COLOURS)]
    bg = COLOURS[(index * 5 + 3) % len(COLOURS)]
    if kind == 0:  # a solid shape on a plain background
        image = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(image)
        box = [width * 0.2, height * 0.2, width * (0.5 + 0.04 * index), height * 0.8]
        (draw.ellipse if index % 8 == 0 else draw.rectangle)(box, fill=fg)
        return image
    if kind == 1:  # stripes of a width and direction that vary
        period = 4 + 3 * index
        axis = np.arange(width if index % 3 else height)
        stripe = (axis // period) % 2
        grid = np.broadcast_to(stripe[None, :], (height, width)) if index % 3 else np.broadcast_to(stripe[:, None], (height, width))
        pixels = np.where(grid[..., None] == 1, np.array(fg), np.array(bg)).astype(np.uint8)
        return Image.fromarray(pixels)
    if kind == 2:  # uniform noise
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    # a colour gradient with a triangle
    ramp = np.linspace(0, 255, width)[None, :, None] * np.array(fg)[None, None, :] / 255
    pixels = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    ImageDraw.Draw(image).polygon([(0, height), (width // 2, index * 7 % height), (width, height)], fill=bg)
    return image


def chat_prompt(engine, question: str = "Describe this image.") -> str:
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return engine.tokenizer().apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def greedy(engine, prompts: list[dict]) -> list[tuple[int, ...]]:
    outputs = engine.generate(prompts, engine.sampling_params(max_tokens=MAX_TOKENS))
    return [tuple(out.outputs[0].token_ids) for out in outputs]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [make_image(i) for i in range(16)]


def test_images_are_distinct(images):
    arrays = [np.asarray(image) for image in images]
    assert all(a.shape != b.shape or not np.array_equal(a, b) for a, b in itertools.combinations(arrays, 2))
    assert all(64 <= min(image.size) and max(image.size) <= 300 for image in images)


def test_distinct_images_give_distinct_outputs(engine, images):
    text = chat_prompt(engine)
    outputs = greedy(engine, [{"prompt": text, "multi_modal_data": {"image": image}} for image in images])
    distinct = len(set(outputs))
    print(f"\ndistinct greedy outputs: {distinct} of {len(images)}")
    assert distinct >= 14
    assert all(len(tokens) == MAX_TOKENS for tokens in outputs)  # the model does not stop at once
    decoded = engine.tokenizer().decode(list(outputs[0]))
    assert isinstance(decoded, str) and decoded


def test_prompts_change_output_for_same_image(engine, images):
    questions = ["Describe this image.", "What colour is it?", "Count the objects.", "这是什么？"]
    prompts = [{"prompt": chat_prompt(engine, q), "multi_modal_data": {"image": images[1]}} for q in questions]
    assert len(set(greedy(engine, prompts))) >= 3


def test_one_percent_noise_changes_output(engine, images):
    text = chat_prompt(engine)
    gen = torch.Generator().manual_seed(0)
    clean, noisy = [], []
    for image in images:
        pixel_values, grid = engine.preprocess(image)
        (emb,) = engine.run_tower(pixel_values, grid)
        rms = emb.float().pow(2).mean().sqrt()
        noise = torch.randn(emb.shape, generator=gen) * (0.01 * rms)
        emb_noisy = (emb.float() + noise).to(emb.dtype)
        clean.append({"prompt": text, "multi_modal_data": {"image": {"image_embeds": emb, "image_grid_thw": grid}}})
        noisy.append({"prompt": text, "multi_modal_data": {"image": {"image_embeds": emb_noisy, "image_grid_thw": grid}}})
    before, after = greedy(engine, clean), greedy(engine, noisy)
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    print(f"\noutputs changed by 1% noise: {changed} of {len(images)}")
    assert changed >= len(images) // 2
