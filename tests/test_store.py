"""The embedding store in one process: keys, bit-exact round trips, checked reads, growth, the API."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading

import blake3
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from splitvlm.core.errors import SplitVLMError
from splitvlm.store import EmbeddingStore, Entry, Expect, StoreError, make_key
from splitvlm.store.blob import read_header

PREPROCESS = {"class": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2}
KEY_ARGS = dict(model_fingerprint="0123456789abcdef0123456789abcdef", preprocess=PREPROCESS, profile="exact", dtype="bfloat16")
IMAGE = b"\x89PNG fake image bytes"
GOLDEN_KEY = "dab271d266e90d0dd046f538a2e15bfab19e51f903f32935f4e937c4768d5732"  # key version 2


def entry(i: int, dtype=torch.bfloat16, n_tokens: int = 16, hidden: int = 32, **meta) -> Entry:
    gen = torch.Generator().manual_seed(i)
    embeds = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    key = make_key(f"image {i}".encode(), **KEY_ARGS)
    grid = torch.tensor([[1, 2 * 2, n_tokens]])  # 4 * n_tokens patches = n_tokens tokens at merge 2
    return Entry(key, embeds, grid, {"model_id": "m", "source": f"img/{i}.png", **meta})


@pytest.fixture
def store(tmp_path):
    with EmbeddingStore(tmp_path / "s.lmdb") as s:
        yield s


def corrupt(store: EmbeddingStore, key: str, offset: int, mask: int = 0xFF) -> None:
    """Flip bits of one byte of the stored blob, behind the store's back."""
    blob = bytearray(store.raw(key))
    blob[offset % len(blob)] ^= mask
    store.write(lambda txn: txn.put(key.encode(), bytes(blob), db=store.shared.embeddings))


# -- keys --
def _documented_key(image: bytes, model_fingerprint: str, preprocess: dict, profile: str, dtype: str) -> str:
    """The recipe of docs/store-format.md, written out independently of make_key."""
    def field(name: bytes, value: bytes) -> bytes:
        return struct.pack("<Q", len(name)) + name + struct.pack("<Q", len(value)) + value

    canonical = json.dumps(preprocess, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    data = (field(b"version", b"splitvlm.key/2") + field(b"image_blake3", blake3.blake3(image).digest())
            + field(b"model_fingerprint", model_fingerprint.encode()) + field(b"preprocess", canonical)
            + field(b"profile", profile.encode()) + field(b"dtype", dtype.encode()))
    return blake3.blake3(data).hexdigest()


def test_key_matches_the_documented_recipe_and_a_pinned_value():
    key = make_key(IMAGE, **KEY_ARGS)
    assert key == _documented_key(IMAGE, **KEY_ARGS)
    assert key == GOLDEN_KEY  # a change here orphans every existing store


def test_key_is_the_same_in_another_process():
    code = (
        "import json, sys; from splitvlm.store import make_key; a = json.loads(sys.argv[1]); "
        "print(make_key(bytes.fromhex(a.pop('image')), **a))"
    )
    args = json.dumps({"image": IMAGE.hex(), **KEY_ARGS})
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == make_key(IMAGE, **KEY_ARGS)


CHANGES = {
    "image byte": dict(image=IMAGE[:-1] + b"X"),
    "dtype": dict(dtype="float32"),
    "model_fingerprint": dict(model_fingerprint="f" * 32),
    "processor class": dict(preprocess={**PREPROCESS, "class": "Qwen2VLImageProcessorFast"}),
    "min_pixels": dict(preprocess={**PREPROCESS, "min_pixels": 3137}),
    "max_pixels": dict(preprocess={**PREPROCESS, "max_pixels": 1003520}),
    "other resize setting": dict(preprocess={**PREPROCESS, "resample": 3}),
    "int vs float": dict(preprocess={**PREPROCESS, "min_pixels": 3136.0}),
    "profile": dict(profile="fast"),
    "fields run together": dict(profile="exactb", dtype="float16"[1:]),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_key_changes_with_every_field(change):
    args = {"image": IMAGE, **KEY_ARGS, **change}
    assert make_key(args.pop("image"), **args) != GOLDEN_KEY


def test_key_ignores_the_order_of_preprocess_fields():
    reordered = dict(reversed(list(PREPROCESS.items())))
    assert make_key(IMAGE, **{**KEY_ARGS, "preprocess": reordered}) == GOLDEN_KEY


@pytest.mark.parametrize("bad", [dict(preprocess={"x": object()}), dict(preprocess={"x": float("nan")}), dict(profile="")])
def test_key_refuses_what_it_cannot_hash_stably(bad):
    with pytest.raises(StoreError):
        make_key(IMAGE, **{**KEY_ARGS, **bad})


# -- round trips --
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact(store, dtype):
    e = entry(1, dtype, n_tokens=64, hidden=96)
    info = torch.finfo(dtype)
    e.image_embeds[0, :5] = torch.tensor([info.max, -0.0, -info.max, 1e-8, info.smallest_normal / 2]).to(dtype)
    assert store.put_many([e]) == 1
    got = store.get(e.key, Expect(hidden_size=96, dtype=dtype, merge_size=2))
    assert got.image_embeds.dtype == dtype and torch.equal(got.image_embeds[1:], e.image_embeds[1:])
    bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    assert torch.equal(got.image_embeds.view(bits), e.image_embeds.view(bits))  # row 0: -0.0, extremes, subnormal
    assert got.image_grid_thw.dtype == torch.int64 and got.image_grid_thw.tolist() == [[1, 4, 64]]
    assert got.meta["dtype"] == str(dtype).removeprefix("torch.") and got.meta["hidden_size"] == "96"
    assert got.meta["source"] == "img/1.png" and got.meta["vllm_version"] == "" and got.meta["created"].endswith("Z")
    assert len(got.meta["checksum"]) == 64


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_embeddings_are_refused(store, value):
    e = entry(3, torch.bfloat16, n_tokens=64, hidden=96)
    e.image_embeds[5, 7] = value
    with pytest.raises(StoreError, match=f"{e.key}: image_embeds holds 1 NaN or Inf"):
        store.put_many([e])
    assert e.key not in store


def test_blobs_are_plain_safetensors_both_ways(store, tmp_path):
    e = entry(2, torch.float32)
    store.put_many([e])
    blob = store.blob(e.key)
    tensors = st_load(blob)  # the safetensors library reads our blob
    assert torch.equal(tensors["image_embeds"], e.image_embeds) and set(tensors) == {"image_embeds", "image_grid_thw"}
    (tmp_path / "e.safetensors").write_bytes(blob)
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:
        assert f.metadata()["key"] == e.key
    meta = read_header(blob)["__metadata__"]  # and we read the library's blob
    theirs = st_save({"image_embeds": e.image_embeds, "image_grid_thw": e.image_grid_thw}, metadata=meta)
    store.write(lambda txn: txn.put(e.key.encode(), theirs, db=store.shared.embeddings))
    assert torch.equal(store.get(e.key).image_embeds, e.image_embeds)


# -- the API --
def test_put_get_contains_len_keys_missing_delete(store):
    entries = [entry(i) for i in range(5)]
    assert store.put_many(entries) == 5
    keys = [e.key for e in entries]
    assert len(store) == 5 and keys[0] in store and "0" * 64 not in store
    assert list(store.keys()) == sorted(keys)
    assert store.missing(["0" * 64, keys[1], "1" * 64]) == ["0" * 64, "1" * 64]
    got = store.get_many(keys[::-1])
    assert [g.key for g in got] == keys[::-1]
    assert all(torch.equal(g.image_embeds, e.image_embeds) for g, e in zip(got, entries[::-1], strict=True))
    assert store.delete([keys[0], "0" * 64]) == 1
    assert len(store) == 4 and keys[0] not in store


def test_reput_writes_nothing_and_overwrite_replaces(store):
    e = entry(3)
    store.put_many([e])
    before = store.raw(e.key)
    txn_id = store.env.info()["last_txnid"]
    assert store.put_many([e, e]) == 0
    assert store.env.info()["last_txnid"] == txn_id and store.raw(e.key) == before
    changed = Entry(e.key, e.image_embeds + 1, e.image_grid_thw, e.meta)
    assert store.put_many([changed]) == 0 and torch.equal(store.get(e.key).image_embeds, e.image_embeds)
    assert store.put_many([changed], overwrite=True) == 1
    assert torch.equal(store.get(e.key).image_embeds, changed.image_embeds)


def test_a_bad_entry_fails_the_whole_batch(store):
    good, bad = entry(4), entry(5)
    bad.image_grid_thw = torch.tensor([[1, 3, 5]])  # 15 patches cannot make 16 tokens
    with pytest.raises(StoreError, match="does not fit"):
        store.put_many([good, bad])
    assert len(store) == 0
    for broken in (Entry("not-a-key", good.image_embeds, good.image_grid_thw, {}),
                   Entry(good.key, good.image_embeds.to(torch.int32), good.image_grid_thw, {})):
        with pytest.raises(StoreError):
            store.put_many([broken])


def test_map_grows_past_a_tiny_initial_size(tmp_path):
    with EmbeddingStore(tmp_path / "tiny.lmdb", map_size=64 << 10) as store:
        entries = [entry(i, n_tokens=256, hidden=256) for i in range(40)]  # 5 MiB in 64 KiB
        for i in range(0, 40, 8):
            assert store.put_many(entries[i : i + 8]) == 8
        assert store.shared.map_size() > 5 << 20 and len(store) == 40
        assert all(torch.equal(g.image_embeds, e.image_embeds) for g, e in zip(store.get_many([e.key for e in entries]), entries, strict=True))


def test_one_environment_per_process_and_path(tmp_path):
    path = tmp_path / "one.lmdb"
    a, b = EmbeddingStore(path), EmbeddingStore(str(path) + "/")
    assert a.env is b.env
    a.put_many([entry(6)])
    a.close()
    assert len(b) == 1  # still open for b
    b.close()
    with pytest.raises(StoreError, match="closed"):
        len(b)
    with EmbeddingStore(path, readonly=True) as ro:
        with pytest.raises(StoreError, match="read-only"):
            ro.put_many([entry(7)])
        with pytest.raises(StoreError, match="read-only"):
            EmbeddingStore(path)


def test_missing_store_and_missing_key_are_one_line_errors(tmp_path, store):
    with pytest.raises(StoreError, match="no store there"):
        EmbeddingStore(tmp_path / "nowhere", readonly=True)
    with pytest.raises(StoreError) as err:
        store.get("0" * 64)
    assert str(err.value) == f"{'0' * 64}: missing" and isinstance(err.value, SplitVLMError)


@pytest.mark.parametrize(
    "expect, message",
    [
        (Expect(32, torch.float16, 2), "dtype bfloat16, model needs float16"),
        (Expect(64, torch.bfloat16, 2), "hidden size 32, model needs 64"),
        (Expect(32, torch.bfloat16, 1), "16 embedding rows, but image_grid_thw [1, 4, 16] with merge size 1 needs 64"),
    ],
)
def test_get_checks_against_the_callers_model(store, expect, message):
    e = entry(8)
    store.put_many([e])
    with pytest.raises(StoreError) as err:
        store.get(e.key, expect)
    assert str(err.value) == f"{e.key}: {message}"
    store.get(e.key, Expect(32, "bfloat16", 2))  # the right model reads it


REGIONS = {"header length": 0, "header json": 40, "grid data": -16 * 32 * 2 - 8, "embeds data": -100, "last byte": -1}


@pytest.mark.parametrize("offset", REGIONS.values(), ids=REGIONS.keys())
def test_one_flipped_byte_anywhere_is_caught(store, offset):
    e, other = entry(9), entry(10)
    store.put_many([e, other])
    corrupt(store, e.key, offset)
    with pytest.raises(StoreError) as err:
        store.get(e.key)
    assert str(err.value).startswith(f"{e.key}: ") and "\n" not in str(err.value)
    with pytest.raises(StoreError):
        store.get_many([other.key, e.key])
    assert dict(store.check()) == {e.key: str(err.value), other.key: None}


def test_flipped_metadata_byte_is_caught(store):
    e = entry(11, source="img/abcdefgh.png")
    store.put_many([e])
    blob = store.raw(e.key)
    corrupt(store, e.key, blob.index(b"abcdefgh"), mask=0x01)  # still valid JSON: "img/`bcdefgh.png"
    with pytest.raises(StoreError, match="metadata checksum mismatch"):
        store.get(e.key)


def test_a_blob_under_the_wrong_key_is_caught(store):
    a, b = entry(12), entry(13)
    store.put_many([a, b])
    blob = store.raw(a.key)
    store.write(lambda txn: txn.put(b.key.encode(), blob, db=store.shared.embeddings))
    with pytest.raises(StoreError, match="another key"):
        store.get(b.key)


def test_stats_count_only_embeddings(store):
    store.put_many([entry(14), entry(15, torch.float16)])
    store.write(lambda txn: txn.put(b"some result", b"{}", db=store.results_db()))
    stats = store.stats()
    assert stats["entries"] == 2 and stats["results"] == 1 and len(store) == 2
    assert stats["dtypes"] == {"bfloat16": 1, "float16": 1} and stats["models"] == {"m": 2}
    assert stats["bytes"] == sum(len(store.raw(k)) for k in store.keys())


def test_threads_read_while_another_thread_grows_the_map(tmp_path):
    with EmbeddingStore(tmp_path / "threads.lmdb", map_size=64 << 10) as store:
        first = [entry(i, n_tokens=64, hidden=64) for i in range(4)]
        store.put_many(first)
        errors: list[BaseException] = []
        stop = threading.Event()

        def read():
            try:
                while not stop.is_set():
                    assert len(store.get_many([e.key for e in first])) == 4
            except BaseException as exc:  # noqa: BLE001 - any failure must reach the test
                errors.append(exc)

        readers = [threading.Thread(target=read) for _ in range(3)]
        for t in readers:
            t.start()
        more = [entry(i, n_tokens=64, hidden=64) for i in range(4, 164)]
        for i in range(0, len(more), 8):
            store.put_many(more[i : i + 8])
        stop.set()
        for t in readers:
            t.join()
        assert errors == [] and len(store) == 164 and store.shared.map_size() > 1 << 20


def test_an_undecodable_file_name_is_stored_readably(store, tmp_path):
    e = entry(16, source=b"img/\xff.png".decode("utf-8", "surrogateescape"))
    store.put_many([e])
    assert store.get(e.key).meta["source"] == "img/\\udcff.png"
    (tmp_path / "e.safetensors").write_bytes(store.blob(e.key))
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:  # strict JSON readers accept it
        assert f.metadata()["source"] == "img/\\udcff.png"


def test_a_failed_get_leaves_no_transaction_open(store):
    e = entry(17)
    store.put_many([e])
    corrupt(store, e.key, -1)
    try:
        store.get_many([e.key])
    except StoreError as exc:
        kept = exc  # holding the traceback must not hold a transaction (a resize would wait forever)
    assert kept is not None and store.shared._active == 0
    store.shared.resize(store.shared.map_size() * 2)
