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
