"""`splitvlm store compact` and `store merge`: space given back, entries copied checked, conflicts refused, kills resumed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner

from splitvlm.cli.store_cmd import command as store_cli
from splitvlm.store import EmbeddingStore, Entry, StoreError, compact_store
from splitvlm.store import compact as compact_module
from splitvlm.store.compact import disk_bytes

SPLITVLM = os.path.join(os.path.dirname(sys.executable), "splitvlm")


def run(*args: str):
    return CliRunner().invoke(store_cli, [str(a) for a in args])


def key(i: int, tag: str = "") -> str:
    """An opaque store key (64 lowercase hex digits); how real keys are made does not matter here."""
    return hashlib.sha256(f"{tag}{i}".encode()).hexdigest()


def entry(i: int, tag: str = "", n: int = 16, hidden: int = 64, source: str = "") -> Entry:
    gen = torch.Generator().manual_seed(int(key(i, tag)[:8], 16))
    embeds = torch.randn(n, hidden, generator=gen)
    return Entry(key(i, tag), embeds, torch.tensor([[1, 4, n]]), {"model_id": "m", "source": source or f"{tag}{i}.png"})


def fill(path, ids, tag: str = "", **kw) -> list[str]:
    with EmbeddingStore(path) as store:
        store.put_many([entry(i, tag, **kw) for i in ids])
    return [key(i, tag) for i in ids]


def raw(path, db: str = "embeddings") -> dict[bytes, bytes]:
    """Every stored value, byte for byte, unchecked."""
    with EmbeddingStore(path, readonly=True) as store:
        handle = store.shared.embeddings if db == "embeddings" else store.results_db()
        if handle is None:
            return {}
        with store.read() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=handle)}


def put_raw(path, items: dict[bytes, bytes], db: str = "embeddings") -> None:
    """Store values exactly as given, behind the store's back (copies, forgeries, damage)."""
    with EmbeddingStore(path) as store:
        handle = store.shared.embeddings if db == "embeddings" else store.results_db()
        store.write(lambda txn: [txn.put(k, v, db=handle) for k, v in items.items()])


def result(i: int) -> tuple[bytes, bytes]:
    """A cached decode result that `store check` accepts (the values are opaque to merge and compact)."""
    from splitvlm.decoder.cache import FORMAT, RESULT_FIELDS, fields_checksum

    text = f"answer {i}"
    base = {"text": text, "token_ids": [i], "finish_reason": "stop", "prompt_tokens": 3, "keys": [key(i)],
            "sha256": hashlib.sha256(text.encode()).hexdigest()}
    fields = {f: base.get(f, "") for f in RESULT_FIELDS}
    value = {"format": FORMAT, **fields, "checksum": fields_checksum(fields)}
    return hashlib.sha256(f"result {i}".encode()).hexdigest().encode(), json.dumps(value).encode()


def check_clean(path, entries: int, results: int) -> None:
    out = run("check", "--store", path)
    assert out.exit_code == 0, out.output
    assert out.output.strip().splitlines()[-1] == f"{entries} entries checked, 0 bad; {results} cached results checked, 0 bad"


# -- compact --
def test_compact_in_place_gives_space_back_and_keeps_every_byte(tmp_path):
    path = tmp_path / "s.lmdb"
    keys = fill(path, range(400), hidden=256)  # 16 KiB of float32 an entry
    put_raw(path, dict(result(i) for i in range(5)), db="results")
    out = run("rm", "--store", path, *keys[:300])
    assert out.exit_code == 0 and "removed 300 entries" in out.output
    kept, results = raw(path), raw(path, "results")
    before = disk_bytes(str(path))
    os.chmod(path, 0o750)

    out = run("compact", "--store", path)
    assert out.exit_code == 0, out.output
    after = disk_bytes(str(path))
    assert after < before / 3  # 100 of 400 entries left
    assert out.output.strip() == (f"{os.path.realpath(path)}: {before / 2**20:.2f} MiB before, {after / 2**20:.2f} MiB after "
                                  "(100 entries, 5 cached results)")
    assert raw(path) == kept and raw(path, "results") == results  # bit-identical
    check_clean(path, 100, 5)
    assert sorted(os.listdir(tmp_path)) == ["s.lmdb"]  # no copy left behind
    assert os.stat(path).st_mode & 0o777 == 0o750
    fill(path, range(400, 410))  # the compacted store takes new writes
    assert len(raw(path)) == 110


def test_compact_into_a_new_folder_leaves_the_store_as_it_is(tmp_path):
    path, new = tmp_path / "s.lmdb", tmp_path / "new.lmdb"
    keys = fill(path, range(40), hidden=256)
    with EmbeddingStore(path) as store:
        store.delete(keys[:30])
    before, kept = disk_bytes(str(path)), raw(path)
    out = run("compact", "--store", path, "--into", new)
    assert out.exit_code == 0, out.output
    assert disk_bytes(str(path)) == before and raw(path) == kept  # untouched
    assert raw(new) == kept and disk_bytes(str(new)) < before / 2
    check_clean(new, 10, 0)
    out = run("compact", "--store", path, "--into", new)  # never over an existing store
    assert isinstance(out.exception, StoreError) and "exists and is not an empty folder" in str(out.exception)
    out = run("compact", "--store", path, "--into", path)
    assert isinstance(out.exception, StoreError) and "is the store itself" in str(out.exception)
    assert sorted(os.listdir(tmp_path)) == ["new.lmdb", "s.lmdb"]


HOLDER = textwrap.dedent(
    """
    import sys, time, lmdb
    env = lmdb.open(sys.argv[1], max_dbs=8, readonly=sys.argv[2] == "r")
    with env.begin() as txn:
        txn.stat(env.open_db(b"embeddings", txn=txn, create=False))
    print("open", flush=True)
    time.sleep(60)
    """
)


def hold(path, mode: str) -> subprocess.Popen:
    """Another process with the store open, for reading ("r") or writing ("w"), until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_compact_refuses_while_another_process_has_the_store_open_for_writing(tmp_path):
    path = tmp_path / "s.lmdb"
    fill(path, range(20))
    kept, inode = raw(path), os.stat(path / "data.mdb").st_ino
    writer = hold(path, "w")
    try:
        out = run("compact", "--store", path)
        assert isinstance(out.exception, StoreError)
        assert str(out.exception) == f"{os.path.realpath(path)}: process {writer.pid} has the store open for writing; compact when no one writes it"
    finally:
        writer.kill()
        writer.wait()
    assert os.stat(path / "data.mdb").st_ino == inode and raw(path) == kept
    assert sorted(os.listdir(tmp_path)) == ["s.lmdb"]
    reader = hold(path, "r")  # a reader is no obstacle; it goes on seeing the old store
    try:
        out = run("compact", "--store", path)
        assert out.exit_code == 0, out.output
        assert f"note: process {reader.pid} still reads the old store" in out.stderr
    finally:
        reader.kill()
        reader.wait()
    assert raw(path) == kept


def test_compact_undoes_the_swap_when_a_writer_opened_the_store_during_the_copy(tmp_path, monkeypatch):
    path = tmp_path / "s.lmdb"
    fill(path, range(20))
    kept, inode = raw(path), os.stat(path / "data.mdb").st_ino
    copy, late = compact_module._copy, []

    def copy_while_a_writer_opens(store, folder, like):
        late.append(hold(path, "w"))
        return copy(store, folder, like)

    monkeypatch.setattr(compact_module, "_copy", copy_while_a_writer_opens)
    try:
        with pytest.raises(StoreError) as refused:
            compact_store(path)
        assert str(refused.value) == f"{os.path.realpath(path)}: process {late[0].pid} opened the store for writing during compaction"
    finally:
        for proc in late:
            proc.kill()
            proc.wait()
    assert os.stat(path / "data.mdb").st_ino == inode and raw(path) == kept
    assert sorted(os.listdir(tmp_path)) == ["s.lmdb"]


def test_compact_that_fails_midway_keeps_the_old_store(tmp_path, monkeypatch):
    path = tmp_path / "s.lmdb"
    fill(path, range(20))
    kept, inode = raw(path), os.stat(path / "data.mdb").st_ino

    def broken(a, b):
        raise OSError(errno.EIO, "Input/output error", b)

    monkeypatch.setattr(compact_module, "_exchange", broken)
    with pytest.raises(StoreError, match="cannot swap in the compacted copy"):
        compact_store(path)
    monkeypatch.undo()
    monkeypatch.setattr(compact_module, "_copy", lambda store, folder, like: (0, 0))  # a short copy
    with pytest.raises(StoreError, match=r"the copy holds \(0, 0\) \(entries, results\), the store \(20, 0\)"):
        compact_store(path)
    assert os.stat(path / "data.mdb").st_ino == inode and raw(path) == kept
    assert sorted(os.listdir(tmp_path)) == ["s.lmdb"]
    (path / "notes.txt").write_text("mine")  # a file of someone else's in the folder: never moved away
    with pytest.raises(StoreError, match="holds 'notes.txt' besides the store"):
        compact_store(path)


def test_swap_without_renameat2_exchange(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    monkeypatch.setattr(compact_module, "RENAME_EXCHANGE", 1 << 30)  # unknown flag: EINVAL, the fallback runs
    compact_module._exchange(str(a), str(b))
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# -- merge --
def summary(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("entries:", "cached results:"))]


def test_merge_copies_entries_and_results_and_skips_identical_ones(tmp_path):
    one, two, dst = tmp_path / "one.lmdb", tmp_path / "two.lmdb", tmp_path / "new" / "dst.lmdb"
    (tmp_path / "new").mkdir()
    fill(one, range(30))
    fill(two, range(30, 50))
    put_raw(two, {k: v for k, v in raw(one).items() if k.decode() in {key(i) for i in range(20, 30)}})  # same bytes
    put_raw(one, dict(result(i) for i in range(5)), db="results")
    put_raw(two, dict(result(i) for i in range(3, 8)), db="results")

    out = run("merge", one, two, "--into", dst)  # dst is made
    assert out.exit_code == 0, out.output
    assert summary(out.output) == ["entries: 50 copied, 10 identical skipped, 0 conflicts, 0 bad",
                                   "cached results: 8 copied, 2 identical skipped, 0 conflicts"]
    assert raw(dst) == raw(one) | raw(two)
    assert raw(dst, "results") == raw(one, "results") | raw(two, "results")
    check_clean(dst, 50, 8)
    out = run("merge", one, two, "--into", dst)  # again: nothing new
    assert out.exit_code == 0
    assert summary(out.output) == ["entries: 0 copied, 60 identical skipped, 0 conflicts, 0 bad",
                                   "cached results: 0 copied, 10 identical skipped, 0 conflicts"]


def test_merge_skips_and_names_bad_entries_and_exits_3(tmp_path):
    src, dst = tmp_path / "src.lmdb", tmp_path / "dst.lmdb"
    keys = fill(src, range(10))
    damaged = bytearray(raw(src)[keys[3].encode()])
    damaged[-5] ^= 0x01  # one bit of the tensor data
    put_raw(src, {keys[3].encode(): bytes(damaged), b"not-a-key": raw(src)[keys[4].encode()]})
    out = run("merge", src, "--into", dst)
    assert out.exit_code == 3, out.output
    src_path = os.path.realpath(src)
    assert f"{keys[3]}: checksum mismatch" in out.stderr and f"(in {src_path}; not copied)" in out.stderr
    assert f"not-a-key: not a store key (64 lowercase hex digits) (in {src_path}; not copied)" in out.stderr
    assert summary(out.stdout)[0] == "entries: 9 copied, 0 identical skipped, 0 conflicts, 2 bad"
    good = {k: v for k, v in raw(src).items() if k not in {keys[3].encode(), b"not-a-key"}}
    assert raw(dst) == good
    check_clean(dst, 9, 0)


def test_merge_refuses_conflicts_names_them_and_exits_1(tmp_path):
    src, dst = tmp_path / "src.lmdb", tmp_path / "dst.lmdb"
    keys = fill(src, range(10))
    fill(dst, [2], tag="", source="elsewhere.png")  # same key and tensors, other metadata
    put_raw(dst, {keys[5].encode(): raw(src)[keys[6].encode()]})  # same key, other tensors (a forgery)
    put_raw(dst, {b"r": b"theirs"}, db="results")
    put_raw(src, {b"r": b"ours", b"s": b"new"}, db="results")
    theirs = raw(dst)
    out = run("merge", src, "--into", dst)
    assert out.exit_code == 1, out.output
    s, d = os.path.realpath(src), os.path.realpath(dst)
    lines = out.stderr.strip().splitlines()
    assert f"{keys[2]}: conflict: {s} and {d} hold the same tensors with other metadata; {d} keeps its own" in lines
    assert f"{keys[5]}: conflict: {s} and {d} hold different tensors; {d} keeps its own" in lines
    assert f"cached result r: conflict: {s} and {d} hold different values; {d} keeps its own" in lines
    assert summary(out.stdout) == ["entries: 8 copied, 0 identical skipped, 2 conflicts, 0 bad",
                                   "cached results: 1 copied, 0 identical skipped, 1 conflicts"]
    merged = raw(dst)
    assert all(merged[k] == v for k, v in theirs.items())  # nothing overwritten
    assert raw(dst, "results") == {b"r": b"theirs", b"s": b"new"}
    damaged = bytearray(raw(src)[keys[0].encode()])
    damaged[-5] ^= 0x01
    put_raw(src, {keys[0].encode(): bytes(damaged)})
    assert run("merge", src, "--into", dst).exit_code == 3  # bad entries outrank conflicts


def test_merge_into_itself_and_from_nothing_are_refused(tmp_path):
    src = tmp_path / "src.lmdb"
    fill(src, range(3))
    os.symlink(src, tmp_path / "link")
    for into in (src, tmp_path / "link", f"{src}/."):
        out = run("merge", src, "--into", into)
        assert isinstance(out.exception, StoreError) and str(out.exception) == (
            f"{os.path.realpath(src)}: is the destination store; a store cannot be merged into itself")
    out = run("merge", tmp_path / "none", "--into", tmp_path / "dst")
    assert isinstance(out.exception, StoreError) and "none: no store there" in str(out.exception)
    assert not (tmp_path / "dst").exists()  # refused before anything was made
    assert run("merge", src, "--into", tmp_path / "dst", "--batch", "0").exit_code == 2


# A merge in another process that stops inside its PAUSE_AT-th write transaction, after the batch was put.
PAUSING = textwrap.dedent(
    """
    import sys, time
    from splitvlm.store import EmbeddingStore, merge_stores

    src, dst, batch, pause_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    writes = 0
    write = EmbeddingStore.write

    def pausing(self, fn, size_hint=0):
        def then_pause(txn):
            global writes
            out = fn(txn)
            writes += 1
            if writes == pause_at:
                print("inside", flush=True)
                time.sleep(60)
            return out
        return write(self, then_pause, size_hint)

    EmbeddingStore.write = pausing
    merge_stores([src], dst, batch=batch)
    """
)


def test_merge_killed_inside_a_transaction_resumes_without_loss_or_duplicates(tmp_path):
    src, dst = tmp_path / "src.lmdb", tmp_path / "dst.lmdb"
    fill(src, range(60), n=4, hidden=8)
    child = subprocess.Popen([sys.executable, "-c", PAUSING, str(src), str(dst), "8", "4"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "inside"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    source = raw(src)
    partial = raw(dst)
    assert len(partial) == 3 * 8 and all(source[k] == v for k, v in partial.items())  # 3 batches committed, the 4th not
    check_clean(dst, 24, 0)
    out = run("merge", src, "--into", dst, "--batch", "8")
    assert out.exit_code == 0, out.output
    assert summary(out.output)[0] == "entries: 36 copied, 24 identical skipped, 0 conflicts, 0 bad"
    assert raw(dst) == source
    check_clean(dst, 60, 0)


def test_merge_cli_killed_at_any_moment_resumes(tmp_path):
    src, dst = tmp_path / "src.lmdb", tmp_path / "dst.lmdb"
    fill(src, range(3000), n=4, hidden=8)
    put_raw(src, dict(result(i) for i in range(20)), db="results")
    child = subprocess.Popen([SPLITVLM, "store", "merge", str(src), "--into", str(dst), "--batch", "2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen, deadline = 0, time.monotonic() + 120
        while seen == 0 and time.monotonic() < deadline and child.poll() is None:
            try:
                with EmbeddingStore(dst, readonly=True) as store:
                    seen = len(store)
            except StoreError:  # not made yet, or made but its databases not yet
                pass
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.wait()
    source, partial = raw(src), raw(dst)
    assert 0 < len(partial) < len(source) and len(partial) % 2 == 0  # killed midway, whole batches only
    assert all(source[k] == v for k, v in partial.items())
    out = run("merge", src, "--into", dst)
    assert out.exit_code == 0, out.output
    assert summary(out.output)[0] == f"entries: {3000 - len(partial)} copied, {len(partial)} identical skipped, 0 conflicts, 0 bad"
    assert raw(dst) == source and raw(dst, "results") == raw(src, "results")
    check_clean(dst, 3000, 20)
