"""serve's stash: vLLM's own embedding loader resolves the middleware's references, and nothing else changes."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from vllm.multimodal.media.image import ImageEmbeddingMediaIO

from splitvlm.serve.stash import PREFIX, Stash, install


def test_vllm_loader_takes_stashed_tensors_once_and_base64_as_before():
    stash = Stash()
    assert install(stash) and install(stash)  # twice in one process: one wrapper
    tensor = torch.randn(7, 5, dtype=torch.float32).to(torch.bfloat16)
    token = stash.put(tensor)
    assert token.startswith(PREFIX) and len(token) == len(PREFIX) + 32
    got = ImageEmbeddingMediaIO().load_base64("", token)
    assert got is tensor  # no copy, no serialisation
    with pytest.raises(ValueError, match="expired"):
        ImageEmbeddingMediaIO().load_base64("", token)  # one use
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    plain = ImageEmbeddingMediaIO().load_base64("", base64.b64encode(buffer.getvalue()).decode())
    assert torch.equal(plain.view(torch.int16), tensor.view(torch.int16))


def test_stash_forgets_the_oldest_past_its_limit():
    stash = Stash(limit=3)
    tokens = [stash.put(torch.zeros(1)) for _ in range(5)]
    assert len(stash) == 3
    assert stash.take(tokens[0]) is None and stash.take(tokens[4]) is not None
    assert stash.take(PREFIX + "0" * 32) is None


def test_counts_from_many_threads_lose_nothing(tmp_path):
    import json
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from splitvlm.serve.settings import Counts, read_counts

    counts = Counts(str(tmp_path), "api")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave inside add and flush, as under load

    def hit(_):
        counts.add("store_hits")
        counts.flush()

    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(hit, range(4000)))
    finally:
        sys.setswitchinterval(switch)
    assert read_counts(str(tmp_path))["store_hits"] == 4000
    assert json.loads(next(tmp_path.glob("counts-api-*.json")).read_text())["store_hits"] == 4000
