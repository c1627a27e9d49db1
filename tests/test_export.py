"""`splitvlm store export` and `to_numpy`: npy, safetensors and parquet round trips, bit for bit."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file

from splitvlm.cli.main import cli
from splitvlm.store import EmbeddingStore, Entry, StoreError, export_store, make_key, to_numpy
from splitvlm.store.entry import tensor_checksum


def run(*args: str):
    return CliRunner().invoke(cli, ["store", "export", *args])


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def widened(entry: Entry) -> np.ndarray:
    """torch's own widening, the reference for every exported value."""
    return entry.image_embeds.float().numpy()


@pytest.fixture
def store(tmp_path):
    """Three entries: two bfloat16 (one with -0.0 and extremes), one float16; sources and models differ."""
    path = tmp_path / "s.lmdb"
    entries = []
    for i, dtype in enumerate([torch.bfloat16, torch.bfloat16, torch.float16]):
        key = make_key(f"img{i}".encode(), model_fingerprint="f", preprocess={}, profile="exact", dtype="bfloat16")
        embeds = torch.randn(4 * (i + 1), 8, generator=torch.Generator().manual_seed(i)).to(dtype)
        if i == 0:
            embeds[0, :4] = torch.tensor([-0.0, torch.finfo(dtype).max, torch.finfo(dtype).tiny, -torch.finfo(dtype).min])
        meta = {"model_id": f"model{i}", "source": f"imgs/{i}.png", "vllm_version": "0.26"}
        entries.append(Entry(key, embeds, torch.tensor([[1, 4, 4 * (i + 1)]]), meta))
    with EmbeddingStore(path) as s:
        s.put_many(entries)
        return str(path), {e.key: s.get(e.key) for e in entries}  # as read back, checked


def test_to_numpy_widens_every_bfloat16_exactly():
    every = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)  # NaNs too
    out = to_numpy(every)
    assert out.dtype == np.float32 and np.array_equal(bits(out), every.float().numpy().view(np.uint32))
    half = torch.randn(64).half()
    assert np.array_equal(bits(to_numpy(half)), half.float().numpy().view(np.uint32))
    assert to_numpy(half, "native").dtype == np.float16
    with pytest.raises(ValueError, match="bfloat16 has no numpy dtype"):
        to_numpy(every, "native")


def test_to_numpy_on_an_entry(store):
    _, entries = store
    for entry in entries.values():
        assert np.array_equal(bits(to_numpy(entry)), bits(widened(entry)))
        assert to_numpy(entry).shape == tuple(entry.image_embeds.shape)


def test_npy_round_trip(store, tmp_path):
    path, entries = store
    out = tmp_path / "npy"  # made by the export
    result = run("--store", path, "--out", str(out), "--format", "npy")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("exported 3, bad 0, ") and result.stderr == ""
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [row["key"] for row in index] == sorted(entries)
    for row in index:
        entry = entries[row["key"]]
        array = np.load(out / row["file"], allow_pickle=False)
        assert row["file"] == f"{entry.key}.npy" and row["dtype"] == "float32" and array.dtype == np.float32
        assert np.array_equal(bits(array), bits(widened(entry))) and row["shape"] == list(array.shape)
        assert row["image_grid_thw"] == entry.image_grid_thw[0].tolist()
        assert (row["source"], row["model_id"]) == (entry.meta["source"], entry.meta["model_id"])
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{k}.npy" for k in entries] + ["index.jsonl"])  # no temporaries


def test_safetensors_float32_reads_with_numpy_alone(store, tmp_path):
    path, entries = store
    out = tmp_path / "st"
    assert run("--store", path, "--out", str(out), "--format", "safetensors").exit_code == 0
    for key, entry in entries.items():
        tensors = load_file(str(out / f"{key}.safetensors"))  # safetensors.numpy: no torch
        assert np.array_equal(bits(tensors["image_embeds"]), bits(widened(entry)))
        assert np.array_equal(tensors["image_grid_thw"], entry.image_grid_thw.numpy())
        with safe_open(str(out / f"{key}.safetensors"), "np") as f:
            meta = f.metadata()
        assert {k: meta[k] for k in entry.meta} == entry.meta and meta["exported_dtype"] == "float32"
        narrowed = torch.from_numpy(tensors["image_embeds"]).to(entry.image_embeds.dtype)  # back to the stored dtype
        assert tensor_checksum(narrowed, entry.image_grid_thw) == meta["checksum"]


def test_safetensors_native_is_the_stored_blob(store, tmp_path):
    path, entries = store
    out = tmp_path / "native"
    assert run("--store", path, "--out", str(out), "--format", "safetensors", "--dtype", "native").exit_code == 0
    for key, entry in entries.items():
        with EmbeddingStore(path, readonly=True) as s:
            assert (out / f"{key}.safetensors").read_bytes() == s.raw(key)  # what `store get` writes
        with safe_open(str(out / f"{key}.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor("image_embeds"), entry.image_embeds)
    assert run("--store", path, "--out", str(tmp_path / "x"), "--format", "npy", "--dtype", "native").exit_code == 2


def test_parquet_round_trip_in_row_groups(store, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr("splitvlm.store.export.ROW_GROUP_ROWS", 2)
    path, entries = store
    out = tmp_path / "pq"
    assert run("--store", path, "--out", str(out), "--format", "parquet").exit_code == 0
    file = pq.ParquetFile(out / "embeddings.parquet")
    assert file.metadata.num_row_groups == 2
    assert file.schema_arrow.names == ["key", "image_grid_thw", "shape", "embeddings", "source", "model_id"]
    types = {name: file.schema_arrow.field(name).type for name in ("embeddings", "shape", "image_grid_thw")}
    assert {n: (pa.types.is_list(t), str(t.value_type)) for n, t in types.items()} == {
        "embeddings": (True, "float"), "shape": (True, "int64"), "image_grid_thw": (True, "int64")}
    rows = file.read().to_pylist()
    assert [r["key"] for r in rows] == sorted(entries)
    for row in rows:
        entry = entries[row["key"]]
        array = np.array(row["embeddings"], dtype=np.float32).reshape(row["shape"])
        assert np.array_equal(bits(array), bits(widened(entry)))
        assert row["image_grid_thw"] == entry.image_grid_thw[0].tolist() and row["model_id"] == entry.meta["model_id"]


def test_parquet_without_pyarrow_is_one_line(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(StoreError, match=r"^parquet export needs the pyarrow package \(pip install pyarrow\)$"):
        with EmbeddingStore(store[0], readonly=True) as s:
            export_store(s, str(tmp_path / "pq"), "parquet")
    assert not (tmp_path / "pq").exists()


def test_selected_keys_and_unknown_keys(store, tmp_path):
    path, entries = store
    first, second, third = sorted(entries)
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# wanted\n{third}\n\n")
    missing = "0" * 64
    result = run("--store", path, "--out", str(tmp_path / "some"), "--format", "npy",
                 "--keys", f"{first},{missing}", "--keys", "nope", "--keys-file", str(keys_file))
    assert result.exit_code == 3
    assert result.stderr.splitlines() == [f"{missing}: missing (not exported)",
                                          "nope: not a store key (64 lowercase hex digits) (not exported)"]
    assert result.stdout.startswith("exported 2, bad 2, ")
    index = [json.loads(line)["key"] for line in (tmp_path / "some" / "index.jsonl").read_text().splitlines()]
    assert index == [first, third]


def test_corrupt_entry_is_named_and_skipped(tmp_path, store):
    path, entries = store
    bad = sorted(entries)[1]
    with EmbeddingStore(path) as w:
        blob = bytearray(w.raw(bad))
        blob[-1] ^= 0x01  # a tensor byte: the checksum no longer matches
        w.write(lambda txn: txn.put(bad.encode(), bytes(blob), db=w.shared.embeddings))
    for fmt in ("npy", "parquet"):
        result = run("--store", path, "--out", str(tmp_path / fmt), "--format", fmt)
        assert result.exit_code == 3
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"{bad}: checksum mismatch") and line.endswith("(not exported)")
        assert result.stdout.startswith("exported 2, bad 1, ")
    assert not (tmp_path / "npy" / f"{bad}.npy").exists()


def test_non_empty_out_is_refused_unless_overwrite(store, tmp_path):
    path, _ = store
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("--store", path, "--out", str(out), "--format", "npy")
    assert result.exit_code == 1 and isinstance(result.exception, StoreError)
    assert str(result.exception) == f"{out}: folder not empty (--overwrite writes into it, replacing files of the same names)"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert run("--store", path, "--out", str(out), "--format", "npy", "--overwrite").exit_code == 0
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.glob("*.npy"))) == 3
    with EmbeddingStore(path, readonly=True) as s, pytest.raises(StoreError, match="store's own folder"):
        export_store(s, path, "npy", overwrite=True)
