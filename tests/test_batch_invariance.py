"""Batch invariance on the CPU build: the same jobs alone, in batches of 8 and shuffled give the same tokens."""

from __future__ import annotations

import random

from benchmarks.common import encode_batches
from benchmarks.exactness import chat_prompt, run_chunks
from splitvlm.tools.samples import PROMPTS, synthetic_image


def test_batch_1_vs_8_vs_shuffled(engine):
    sizes = [(64, 64), (96, 128), (128, 96), (112, 112)]
    images = [synthetic_image(i, sizes[i % 4], seed=7) for i in range(8)]
    prepared = [engine.preprocess(im) for im in images]
    embeds, _ = encode_batches(engine, prepared, batch_patches=4096)
    tok = engine.tokenizer()
    jobs = [(i, p) for p in (0, 2) for i in range(8)]
    texts = [chat_prompt(tok, PROMPTS[p]) for _, p in jobs]
    e2e = [{"prompt": t, "multi_modal_data": {"image": images[i]}} for t, (i, _) in zip(texts, jobs)]
    split = [{"prompt": t, "multi_modal_data": {"image": {"image_embeds": embeds[i], "image_grid_thw": prepared[i][1]}}}
             for t, (i, _) in zip(texts, jobs)]
    order = list(range(len(jobs)))
    shuffled = order[:]
    random.Random(1).shuffle(shuffled)
    params = engine.sampling_params(max_tokens=16)
    runs = {}
    for name, prompts in (("e2e", e2e), ("split", split)):
        runs[f"{name}/b1"], _ = run_chunks(engine, prompts, order, 1, params)
        runs[f"{name}/b8"], _ = run_chunks(engine, prompts, order, 8, params)
        runs[f"{name}/shuffled"], _ = run_chunks(engine, prompts, shuffled, 16, params)
    reference = runs["e2e/b1"]
    assert len({tuple(t) for t in reference}) >= 14  # outputs react to image and prompt
    for name, tokens in runs.items():
        assert tokens == reference, name
