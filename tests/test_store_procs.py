"""The store across processes: a reader while a writer writes and grows the map, a writer killed mid-batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
from click.testing import CliRunner

from splitvlm.cli.store_cmd import command as store_cli
from splitvlm.store import EmbeddingStore

# A child process writes batches of BATCH entries with keys make_key(b"<batch>-<i>").
CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from splitvlm.store import EmbeddingStore, Entry, make_key

    path, batches, batch, pause_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def entries(b):
        out = []
        for i in range(batch):
            key = make_key(f"{b}-{i}".encode(), model_fingerprint="f", preprocess={}, profile="exact", dtype="bfloat16")
            embeds = torch.full((64, 64), float(b * batch + i))
            out.append(Entry(key, embeds, torch.tensor([[1, 16, 16]]), {"model_id": "m"}))
        return out

    class PausingStore(EmbeddingStore):
        puts = 0

        def _put_one(self, txn, db, key, blob, overwrite):
            PausingStore.puts += 1
            if PausingStore.puts == pause_at:  # inside the write transaction, half-way through a batch
                print("inside", flush=True)
                time.sleep(60)
            return super()._put_one(txn, db, key, blob, overwrite)

    store = PausingStore(path, map_size=256 << 10)
    for b in range(batches):
        store.put_many(entries(b))
        print("committed", b, flush=True)
    """
)
BATCH = 8


def keys_of(batch: int) -> list[str]:
    from splitvlm.store import make_key

    return [make_key(f"{batch}-{i}".encode(), model_fingerprint="f", preprocess={}, profile="exact", dtype="bfloat16") for i in range(BATCH)]


def start_writer(path, batches: int, pause_at: int = 0) -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, str(path), str(batches), str(BATCH), str(pause_at)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def test_reader_process_reads_while_writer_writes_and_grows_the_map(tmp_path):
    path = tmp_path / "shared.lmdb"
    writer = start_writer(path, batches=40)  # 40 x 8 x 16 KiB in a 256 KiB map: it must grow several times
    try:
        assert writer.stdout.readline().startswith("committed 0")
        reader = EmbeddingStore(path, readonly=True, map_size=64 << 10)  # too small: must adopt growth
        first_map, seen, reads = reader.shared.map_size(), 0, 0
        while True:
            finished = writer.poll() is not None
            n = len(reader)
            assert n >= seen and n % BATCH == 0  # whole batches only
            seen = n
            for key in list(reader.keys())[-BATCH:]:
                assert reader.get(key).image_embeds.shape == (64, 64)  # whole and checked
                reads += 1
            if finished:
                break
        assert writer.wait(timeout=60) == 0
        assert len(reader) == 40 * BATCH and reads > 0
        assert reader.shared.map_size() > first_map  # the reader adopted the grown map
        values = [reader.get(k).image_embeds[0, 0].item() for k in keys_of(39)]
        assert values == [float(39 * BATCH + i) for i in range(BATCH)]
        reader.close()
    finally:
        writer.kill()
        writer.wait()


def test_writer_killed_inside_put_many_leaves_all_or_none(tmp_path):
    path = tmp_path / "killed.lmdb"
    writer = start_writer(path, batches=2, pause_at=BATCH + BATCH // 2)
    try:
        assert writer.stdout.readline().startswith("committed 0")
        assert writer.stdout.readline().strip() == "inside"
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        writer.kill()
        writer.wait()
    result = CliRunner().invoke(store_cli, ["check", "--store", str(path)])
    assert result.exit_code == 0 and f"{BATCH} entries checked, 0 bad;" in result.output
    with EmbeddingStore(path) as store:  # a new writer gets the lock the dead one held
        assert store.missing(keys_of(0)) == [] and store.missing(keys_of(1)) == keys_of(1)
        assert len(store) == BATCH


def test_writer_killed_at_a_random_moment_leaves_whole_batches(tmp_path):
    path = tmp_path / "random.lmdb"
    writer = start_writer(path, batches=10_000)
    try:
        assert writer.stdout.readline().startswith("committed 0")
        time.sleep(0.3 + (os.getpid() % 7) / 10)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
        writer.wait()
    with EmbeddingStore(path, readonly=True) as store:
        n = len(store)
        assert n >= BATCH and n % BATCH == 0
        assert all(problem is None for _, problem in store.check())


def test_cli_check_names_each_flipped_byte_and_exits_1(tmp_path):
    from splitvlm.store import Entry, make_key

    path = tmp_path / "flip.lmdb"
    tensor_bad, meta_bad, good = (make_key(n, model_fingerprint="f", preprocess={}, profile="exact", dtype="bfloat16") for n in (b"x", b"y", b"z"))
    with EmbeddingStore(path) as store:
        meta = {"model_id": "m", "source": "a.png"}
        store.put_many([Entry(k, torch.ones(4, 8, dtype=torch.bfloat16), torch.tensor([[1, 4, 4]]), meta) for k in (tensor_bad, meta_bad, good)])
        for key, where in ((tensor_bad, -3), (meta_bad, store.raw(meta_bad).index(b"a.png"))):
            blob = bytearray(store.raw(key))
            blob[where] ^= 0x01
            store.write(lambda txn, key=key, blob=blob: txn.put(key.encode(), bytes(blob), db=store.shared.embeddings))
    splitvlm = os.path.join(os.path.dirname(sys.executable), "splitvlm")
    out = subprocess.run([splitvlm, "store", "check", "--store", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    problems = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines()[:-1])
    assert problems.keys() == {tensor_bad, meta_bad}
    assert problems[tensor_bad].startswith("checksum mismatch") and problems[meta_bad].startswith("metadata checksum mismatch")
    assert out.stdout.strip().splitlines()[-1] == "3 entries checked, 2 bad; 0 cached results checked, 0 bad"
