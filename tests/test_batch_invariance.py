"""Batch invariance on the CPU build: the same jobs alone, in batches of 8 and shuffled give the same tokens."""

from __future__ import annotations

from helpers import batch_runs

from benchmarks.common import encode_batches
from benchmarks.exactness import chat_prompt
from splitvlm.tools.samples import synthetic_image


def test_batch_1_vs_8_vs_shuffled(engine):
    sizes = [(64, 64), (96, 128), (128, 96), (112, 112)]
    images = [synthetic_image(i, sizes[i % 4], seed=7) for i in range(8)]
    prepared = [engine.preprocess(im) for im in images]
    embeds, _ = encode_batches(engine, prepared, batch_patches=4096)
    jobs = [(i, p) for p in (0, 2) for i in range(8)]
    runs = batch_runs(engine, images, prepared, embeds, jobs, chat_prompt, shuffled_batch=16)
    reference = runs["e2e/b1"]
    assert len({tuple(t) for t in reference}) >= 14  # outputs react to image and prompt
    for name, tokens in runs.items():
        assert tokens == reference, name
