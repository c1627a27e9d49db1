"""Provenance: keys are content only (portable), misses say which settings differ, old keys can be moved."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import config, write_jobs

from splitvlm.core.errors import SplitVLMError
from splitvlm.core.provenance import KeyMaker, Provenance
from splitvlm.decoder import Decoder, read_jobs
from splitvlm.encoder import Encoder
from splitvlm.encoder.rekey import rekey
from splitvlm.store import EmbeddingStore, Entry
from splitvlm.store.key import KEY_VERSION, make_key_v1
from splitvlm.tools.samples import save_corpus


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_corpus(tmp_path_factory.mktemp("prov") / "imgs", 3, seed=21, sizes=[(64, 64), (80, 96)])


def test_a_copied_model_gives_the_same_keys(tiny_model, images, tmp_path):
    copy = tmp_path / "elsewhere" / "tiny-copy"
    shutil.copytree(tiny_model, copy)
    data = open(images[0], "rb").read()
    here, there = KeyMaker(config(tiny_model, tmp_path / "S")), KeyMaker(config(str(copy), tmp_path / "S"))
    assert here(data) == there(data) and here.model_id != there.model_id


def test_dtype_profile_and_preprocessing_are_in_the_key(tiny_model, images, tmp_path):
    data = open(images[0], "rb").read()
    base = KeyMaker(config(tiny_model, tmp_path / "S"))(data)
    for change in (dict(dtype="float32"), dict(profile="fast"), dict(max_pixels=50_000)):
        assert KeyMaker(config(tiny_model, tmp_path / "S", **change))(data) != base, change


def test_a_miss_says_which_settings_differ(tiny_model, engine, images, tmp_path):
    cfg = config(tiny_model, tmp_path / "store")
    Encoder(cfg, engine=engine).encode(images[:1])
    jobs = read_jobs(write_jobs(tmp_path / "j.jsonl", [{"id": "a", "images": [images[0]], "prompt": "Hi"}]))
    other = cfg.replace(max_pixels=40_000, dtype="float32")
    with pytest.raises(SplitVLMError) as err:
        Decoder(other).generate(jobs)  # no engine: the miss is found before any start
    message = str(err.value)
    assert "stored under other settings" in message and "dtype bfloat16 (here float32)" in message
    assert "preprocess max_pixels" in message and "\n" not in message
    skipped = Decoder(other.replace(on_missing="skip")).generate(jobs)[0]
    assert "dtype bfloat16 (here float32)" in skipped.error


def make_v1(cfg, key: str) -> str:
    """Re-store an entry as splitvlm 0.1 wrote it: under its version-1 key, with 0.1's metadata."""
    with EmbeddingStore(cfg.store) as s:
        entry = s.get(key)
        meta = {k: v for k, v in entry.meta.items() if k not in ("key_version", "image_blake3", "provenance")}
        prov = Provenance.of(cfg)
        old = make_key_v1(open(meta["source"], "rb").read(), model_id=prov.model_id,
                          model_fingerprint=prov.model_fingerprint, preprocess=prov.key_fields()["preprocess"],
                          profile=cfg.profile)
        s.put_many([Entry(old, entry.image_embeds, entry.image_grid_thw, meta)])
        s.delete([key])
    return old


def test_rekey_moves_version_1_entries_and_reports_what_it_cannot(tiny_model, engine, images, tmp_path):
    import subprocess
    import sys

    cfg = config(tiny_model, tmp_path / "store")
    Encoder(cfg, engine=engine).encode(images)
    keys = KeyMaker(cfg)
    new = [keys(open(p, "rb").read()) for p in images]
    with EmbeddingStore(cfg.store) as s:
        before = {k: s.get(k).image_embeds.clone() for k in new}
    old = [make_v1(cfg, k) for k in new]
    lost = tmp_path / "lost.png"
    shutil.copy(images[2], lost)
    with EmbeddingStore(cfg.store) as s:  # the third entry's source file is gone
        entry = s.get(old[2])
        s.put_many([Entry(old[2], entry.image_embeds, entry.image_grid_thw, {**entry.meta, "source": str(lost)})],
                   overwrite=True)
    lost.unlink()
    check = subprocess.run([sys.executable, "-m", "splitvlm.cli.main", "store", "check", "--store", cfg.store],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "store rekey" in check.stdout, check.stdout
    stats = rekey(cfg)
    assert stats.moved == 2 and len(stats.failed) == 1 and old[2] in stats.failed[0] and "lost.png" in stats.failed[0]
    with EmbeddingStore(cfg.store) as s:
        assert set(s.keys()) == {new[0], new[1], old[2]}
        for k in new[:2]:
            moved = s.get(k)
            assert torch.equal(moved.image_embeds, before[k]) and moved.meta["key_version"] == KEY_VERSION.decode()
    assert rekey(cfg).moved == 0  # a rerun has nothing left to move but the lost one
