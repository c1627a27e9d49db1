"""`splitvlm store` stats, ls, check, get and rm."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from splitvlm.cli.store_cmd import command as store_cli
from splitvlm.store import EmbeddingStore, Entry, StoreError, make_key


def run(*args: str):
    return CliRunner().invoke(store_cli, list(args))


@pytest.fixture
def path(tmp_path):
    path = tmp_path / "cli.lmdb"
    with EmbeddingStore(path) as store:
        entries = []
        for i, dtype in enumerate([torch.bfloat16, torch.bfloat16, torch.float16]):
            key = make_key(f"img{i}".encode(), model_fingerprint="f", preprocess={}, profile="exact", dtype="bfloat16")
            meta = {"model_id": "m" if i < 2 else "other", "source": f"imgs/{i}.png", "profile": "exact"}
            entries.append(Entry(key, torch.full((4, 8), float(i), dtype=dtype), torch.tensor([[1, 4, 4]]), meta))
        store.put_many(entries)
    return str(path)


def keys(path: str) -> list[str]:
    with EmbeddingStore(path, readonly=True) as store:
        return list(store.keys())


def test_stats(path):
    result = run("stats", "--store", path)
    assert result.exit_code == 0
    assert result.output.splitlines()[0].startswith("3 entries, ")
    assert "models: m (2), other (1)" in result.output and "dtypes: bfloat16 (2), float16 (1)" in result.output
    stats = json.loads(run("stats", "--store", path, "--json").output)
    assert stats["entries"] == 3 and stats["dtypes"] == {"bfloat16": 2, "float16": 1}


def test_ls(path):
    lines = run("ls", "--store", path).output.splitlines()
    assert [line.split()[0] for line in lines] == keys(path)
    assert lines[0].split()[1] == "4x8" and lines[0].split()[2] in {"bfloat16", "float16"} and "imgs/" in lines[0]
    rows = [json.loads(line) for line in run("ls", "--store", path, "--json").output.splitlines()]
    assert [r["key"] for r in rows] == keys(path)
    assert {r["source"] for r in rows} == {"imgs/0.png", "imgs/1.png", "imgs/2.png"} and rows[0]["n_tokens"] == 4


def test_check_good_store_and_against_a_model(path):
    result = run("check", "--store", path)
    assert result.exit_code == 0 and result.output.strip() == "3 entries checked, 0 bad; 0 cached results checked, 0 bad"
    result = run("check", "--store", path, "--hidden-size", "8", "--dtype", "bfloat16", "--merge-size", "2")
    assert result.exit_code == 1 and result.output.strip().endswith("3 entries checked, 1 bad; 0 cached results checked, 0 bad")
    assert "dtype float16, model needs bfloat16" in result.output
    assert run("check", "--store", path, "--dtype", "bfloat16").exit_code == 2  # the three go together


def test_get_writes_a_checked_safetensors_file(path, tmp_path):
    key = keys(path)[0]
    out = tmp_path / "e.safetensors"
    result = run("get", "--store", path, key, "--out", str(out))
    assert result.exit_code == 0 and out.exists()
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["key"] == key and f.get_tensor("image_embeds").shape == (4, 8)
    result = run("get", "--store", path, "0" * 64, "--out", str(out))
    assert isinstance(result.exception, StoreError) and str(result.exception) == f"{'0' * 64}: missing"


def test_rm(path):
    first, second, third = keys(path)
    result = run("rm", "--store", path, first, second)
    assert result.exit_code == 0 and "removed 2 entries" in result.output
    assert keys(path) == [third]
    result = run("rm", "--store", path, first)
    assert result.exit_code == 1 and f"{first}: missing" in result.output


def test_missing_store_is_a_one_line_error(tmp_path):
    result = run("stats", "--store", str(tmp_path / "none"))
    assert isinstance(result.exception, StoreError) and "no store there" in str(result.exception)
