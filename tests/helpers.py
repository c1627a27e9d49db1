"""Small builders shared by the pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

from splitvlm.core.config import Config


def config(model: str, store: Path, **kw) -> Config:
    return Config(model=model, store=str(store), max_model_len=2048, show_progress=False, **kw)


def write_jobs(path: Path, jobs: list[dict]) -> str:
    path.write_text("".join(json.dumps(j, ensure_ascii=False) + "\n" for j in jobs), encoding="utf-8")
    return str(path)


def flip_one_ulp(store_path: str, key: str) -> None:
    """Change one element of a stored embedding by one bf16 ulp, re-stored with a valid checksum."""
    from splitvlm.store import EmbeddingStore, Entry

    with EmbeddingStore(store_path) as store:
        entry = store.get(key)
        embeds = entry.image_embeds.clone()
        bits = embeds.view(-1).view(dtype=__import__("torch").int16)
        bits[0] += 1
        store.put_many([Entry(key, embeds, entry.image_grid_thw, dict(entry.meta))], overwrite=True)


def batch_runs(engine, images: list, prepared: list, embeds: list, jobs: list[tuple[int, int]], text_prompt,
               shuffled_batch: int) -> dict[str, list[list[int]]]:
    """Token ids of the jobs (image index, prompt index) end to end and from the images' embeddings,
    at batch 1, batch 8 and shuffled in batches of shuffled_batch."""
    import random

    from benchmarks.exactness import run_chunks
    from splitvlm.tools.samples import PROMPTS

    tok = engine.tokenizer()
    texts = [text_prompt(tok, PROMPTS[p]) for _, p in jobs]
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
        runs[f"{name}/shuffled"], _ = run_chunks(engine, prompts, shuffled, shuffled_batch, params)
    return runs
