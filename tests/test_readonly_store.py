"""Stores the reader may not write: `splitvlm store` as another user, and on a read-only mount."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from splitvlm.cli.store_cmd import command as store_cli
from splitvlm.store import EmbeddingStore, Entry, StoreError, make_key

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
CLI = [sys.executable, "-m", "splitvlm.cli.main", "store"]
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run as another user"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to run as another user"),
]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


def nobody(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`splitvlm store ARGS` as user 65534, who may read the store but not write it."""
    return run([*AS_NOBODY, *CLI, *args], cwd)


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {e.name: (e.stat().st_size, e.stat().st_mtime_ns, e.stat().st_mode) for e in os.scandir(folder)}


@pytest.fixture
def top():
    """A folder under /tmp that user 65534 can reach (pytest's tmp_path may be 0700); out/ is writable by all."""
    top = Path(tempfile.mkdtemp(prefix="splitvlm-ro-", dir="/tmp"))
    top.chmod(0o755)
    (top / "out").mkdir(mode=0o777)
    (top / "out").chmod(0o777)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def runs_as_nobody() -> None:
    probe = run([*AS_NOBODY, sys.executable, "-c", "import splitvlm.store"], Path("/"))
    if probe.returncode != 0:
        pytest.skip(f"user {NOBODY} cannot run this Python: {probe.stderr.strip().splitlines()[-1:]}")


@pytest.fixture
def store(top, runs_as_nobody) -> Path:
    """Three entries, made by root: folder 0755, files 0644, so others may read but not write."""
    path = top / "s"
    entries = []
    for i, dtype in enumerate([torch.bfloat16, torch.bfloat16, torch.float16]):
        key = make_key(f"img{i}".encode(), model_fingerprint="f", preprocess={}, profile="exact", dtype="bfloat16")
        meta = {"model_id": "m" if i < 2 else "other", "source": f"imgs/{i}.png", "profile": "exact"}
        entries.append(Entry(key, torch.full((4, 8), float(i), dtype=dtype), torch.tensor([[1, 4, 4]]), meta))
    with EmbeddingStore(path) as s:
        s.put_many(entries)
    path.chmod(0o755)
    for name in ("data.mdb", "lock.mdb"):
        (path / name).chmod(0o644)
    return path


def keys(path: Path) -> list[str]:
    with EmbeddingStore(path, readonly=True) as s:
        return list(s.keys())


def test_stats_ls_check_without_write_access(store):
    expected = keys(store)  # root's reads write lock.mdb (a reader slot): before the snapshot
    before = snapshot(store)
    result = nobody("stats", "--json", "--store", str(store), cwd=store.parent)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["entries"] == 3 and stats["dtypes"] == {"bfloat16": 2, "float16": 1}
    assert stats["models"] == {"m": 2, "other": 1} and stats["locked"] is False
    result = nobody("stats", "--store", str(store), cwd=store.parent)
    assert result.returncode == 0 and result.stdout.startswith("3 entries, ")
    assert "read without LMDB's lock" in result.stderr
    result = nobody("ls", "--store", str(store), cwd=store.parent)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == expected
    result = nobody("check", "--store", str(store), cwd=store.parent)
    assert result.returncode == 0 and result.stdout.strip() == "3 entries checked, 0 bad; 0 cached results checked, 0 bad", result.stderr
    assert snapshot(store) == before  # nothing created, nothing written (lock.mdb included)
    assert sorted(os.listdir(store.parent)) == ["out", "s"]


def test_get_and_the_library_without_write_access(store, top):
    key = keys(store)[0]
    out = top / "out" / "e.safetensors"
    result = nobody("get", "--store", str(store), key, "--out", str(out), cwd=top)
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["key"] == key and f.get_tensor("image_embeds").shape == (4, 8)
    (top / "closed").mkdir(mode=0o700)  # a folder the user may not even look into
    code = (
        "import sys; from splitvlm.store import EmbeddingStore, StoreError\n"
        "with EmbeddingStore(sys.argv[1], readonly=True) as s:\n"
        "    print(len(s), s.shared.locked, len(s.get_many(list(s.keys()))))\n"
        "try:\n"
        "    EmbeddingStore(sys.argv[2], readonly=True)\n"
        "except StoreError as exc:\n"
        "    print(exc)"
    )
    result = run([*AS_NOBODY, sys.executable, "-c", code, str(store), str(top / "closed")], top)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["3 False 3", f"{top / 'closed'}: cannot read the store (Permission denied)"]


def test_errors_stay_one_line_and_name_the_store(store, top):
    key = keys(store)[0]
    before = snapshot(store)
    result = nobody("rm", "--store", str(store), key, cwd=top)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {store}: cannot open the store for writing (Permission denied)"]
    assert snapshot(store) == before and len(keys(store)) == 3
    result = nobody("stats", "--store", str(top / "none"), cwd=top)
    assert result.returncode == 1 and result.stderr.splitlines() == [f"error: {top / 'none'}: no store there"]


def test_rm_makes_no_store(tmp_path):
    result = CliRunner().invoke(store_cli, ["rm", "--store", str(tmp_path / "none"), "0" * 64])
    assert isinstance(result.exception, StoreError) and str(result.exception) == f"{tmp_path / 'none'}: no store there"
    assert not (tmp_path / "none").exists()


def test_a_read_only_open_creates_no_lock_file(store):
    (store / "lock.mdb").unlink()  # a store copied without it: LMDB would make one
    with EmbeddingStore(store, readonly=True) as s:
        assert len(s) == 3 and s.shared.locked is False and len(s.get_many(keys(store))) == 3
    assert sorted(os.listdir(store)) == ["data.mdb"]
    with EmbeddingStore(store) as s:  # a writer locks as before
        assert s.shared.locked is True and len(s) == 3
    assert sorted(os.listdir(store)) == ["data.mdb", "lock.mdb"]


@pytest.mark.parametrize("files_writable", [False, True], ids=["files-not-writable", "only-the-mount-refuses"])
def test_read_only_mount(store, top, files_writable):
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare and mount (util-linux) to make a read-only bind mount")
    remount = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1"'
    probe = run(["unshare", "-m", "sh", "-c", f'{remount} && ! touch "$1/probe" 2>/dev/null', "sh", str(top)], top)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here (unshare -m, mount): {probe.stderr.strip()[:200]}")
    if files_writable:
        for path in (store, store / "data.mdb", store / "lock.mdb"):
            path.chmod(0o777 if path.is_dir() else 0o666)
    before = snapshot(store)
    stats, check = (shlex.join([*AS_NOBODY, *CLI, *args, "--store"]) + ' "$2"' for args in (["stats"], ["check"]))
    result = run(["unshare", "-m", "sh", "-c", f"{remount} && {stats} && {check}", "sh", str(top), str(store)], top)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("3 entries, ") and result.stdout.endswith("3 entries checked, 0 bad; 0 cached results checked, 0 bad\n")
    assert snapshot(store) == before and sorted(os.listdir(top)) == ["out", "s"]
