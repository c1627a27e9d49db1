"""encode --ray on a local Ray cluster: the same store as a single-process encode, bit for bit; failures, kill -9 and resume."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from splitvlm.cli.main import cli
from splitvlm.core.errors import SplitVLMError
from splitvlm.encoder.shards import SUFFIX, merge_shards, shards_in, store_lock, take_shard
from splitvlm.store import EmbeddingStore
from splitvlm.store.errors import StoreError
from splitvlm.tools.samples import save_corpus

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install 'splitvlm[ray]'")

SIZES = [(64, 64), (96, 72), (72, 120), (140, 100)]
BAD = {"zero.png": b"", "text.jpg": b"this is not an image"}
ENGINE = ["--max-model-len", "2048"]


def splitvlm(*args: str, env: dict | None = None, timeout: int = 600,
             base: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in its own process, its environment base (this one's by default) updated with env."""
    return subprocess.run([sys.executable, "-m", "splitvlm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**(os.environ if base is None else base), **(env or {})})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """12 images, one of them twice under another name, and 2 bad files."""
    folder = tmp_path_factory.mktemp("ray_corpus") / "imgs"
    good = save_corpus(folder, 12, seed=11, sizes=SIZES)
    (folder / "copy_of_3.png").write_bytes(Path(good[3]).read_bytes())
    for name, data in BAD.items():
        (folder / name).write_bytes(data)
    return folder


def without_session_cap() -> dict[str, str]:
    """This environment without the test session's oneDNN ISA cap: a process started with it must cap itself."""
    return {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}


@pytest.fixture(scope="module")
def reference(tiny_model, corpus, tmp_path_factory) -> tuple[Path, Path]:
    """A single-process encode of the corpus, not given the session's ISA cap: its store and failures file."""
    out = tmp_path_factory.mktemp("ray_reference")
    run = splitvlm("encode", "--model", tiny_model, "--store", out / "store", "--failures", out / "failures.jsonl",
                   *ENGINE, corpus, base=without_session_cap())
    assert run.returncode == 3, run.stderr
    return out / "store", out / "failures.jsonl"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the module; the CLI joins it with --address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def entries(path: Path) -> dict[str, tuple[bytes, bytes, dict]]:
    """Every entry read with the store's own checks: key -> (embedding bytes, grid bytes, metadata)."""
    with EmbeddingStore(path, readonly=True) as store:
        out = {}
        for key in store.keys():
            e = store.get(key)
            out[key] = (e.image_embeds.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes(),
                        e.image_grid_thw.numpy().tobytes(), dict(e.meta))
        return out


def assert_same_store(got: Path, want: Path) -> None:
    """Same keys, same tensor bytes, same metadata but for the write time (and the checksum covering it)."""
    a, b = entries(got), entries(want)
    assert sorted(a) == sorted(b) and len(a) == 12
    for key, (embeds, grid, meta) in a.items():
        assert embeds == b[key][0] and grid == b[key][1], key
        differ = {f for f in set(meta) | set(b[key][2]) if meta.get(f) != b[key][2].get(f)}
        assert differ <= {"created", "meta_checksum"}, (key, differ)


def assert_clean(store: Path) -> None:
    check = splitvlm("store", "check", "--store", store)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not Path(str(store) + SUFFIX).exists()  # every shard merged and removed


@needs_ray
@pytest.mark.slow
def test_ray_store_equals_single_process_and_lists_failures(tiny_model, corpus, reference, cluster, tmp_path):
    store, failures, stats = tmp_path / "store", tmp_path / "failures.jsonl", tmp_path / "stats.json"
    run = splitvlm("encode", "--ray", "--address", cluster, "--gpus", "0", "--workers", "2", "--ray-batch", "3",
                   "--model", tiny_model, "--store", store, "--failures", failures, "--stats-json", stats, *ENGINE, corpus)
    assert run.returncode == 3, run.stderr  # two bad inputs, the rest stored
    assert "encoded 12, skipped 0 already stored, 1 duplicates, failed 2" in run.stdout
    assert "images/s on 2 workers" in run.stderr  # plain progress lines off a terminal
    assert_same_store(store, reference[0])
    assert failures.read_text() == reference[1].read_text()  # one file, the same lines, in input order
    assert {json.loads(line)["path"].rsplit("/", 1)[1] for line in failures.read_text().splitlines()} == set(BAD)
    figures = json.loads(stats.read_text())
    assert figures["ray"]["workers"] == 2 and figures["ray"]["shards_merged"]["copied"] == 12
    # an empty store: the workers start their engines as they come up; where the time before the first entry went
    timeline = figures["ray"]["timeline_s"]
    assert figures["ray"]["eager_engines"] is True and set(timeline) == {"ray_started", "worker_up", "engine_ready"}
    assert 0 <= timeline["ray_started"] <= timeline["worker_up"] < timeline["engine_ready"] < figures["seconds"]
    assert_clean(store)

    again = splitvlm("encode", "--ray", "--address", cluster, "--gpus", "0", "--workers", "2",
                     "--model", tiny_model, "--store", store, *ENGINE, corpus)
    assert again.returncode == 3 and "encoded 0, skipped 12 already stored, 1 duplicates, failed 2" in again.stdout


@needs_ray
@pytest.mark.slow
def test_engine_that_cannot_start_stops_the_run_with_one_line(tiny_model, corpus, cluster, tmp_path):
    store = tmp_path / "store"
    run = splitvlm("encode", "--ray", "--address", cluster, "--gpus", "0", "--model", tiny_model, "--store", store,
                   "--max-model-len", "99999999", corpus)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 1 and len(errors) == 1, run.stderr
    assert errors[0].startswith("error: vLLM could not start the encoder-only engine")
    assert not Path(str(store) + SUFFIX).exists()  # the empty shard was cleared on the way out


def shard_entries(store: Path) -> int:
    """Entries committed in the store's shards so far (read-only, while the workers write)."""
    n = 0
    for shard in shards_in(str(store) + SUFFIX):
        try:
            with EmbeddingStore(shard, readonly=True) as s:
                n += len(s)
        except StoreError:  # not made yet, or no entries database yet
            pass
    return n


@needs_ray
@pytest.mark.slow
def test_kill_9_then_rerun_loses_nothing(tiny_model, corpus, reference, tmp_path):
    """The CLI starts its own local Ray; its process group is killed once a worker has committed entries.
    The rerun, with one worker, merges the killed run's shards first and encodes only the rest."""
    store = tmp_path / "store"

    def args(workers: int) -> list[str]:
        return ["encode", "--ray", "--gpus", "0", "--workers", str(workers), "--ray-batch", "1", "--no-progress",
                "--model", tiny_model, "--store", str(store), *ENGINE, str(corpus)]

    proc = subprocess.Popen([sys.executable, "-m", "splitvlm", *args(2)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    try:
        while shard_entries(store) == 0:
            assert proc.poll() is None, "the run ended before any shard was written"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with EmbeddingStore(store, readonly=True) as s:
        assert len(s) < 12  # killed before the end-of-run merge finished
    assert shards_in(str(store) + SUFFIX)

    stats = tmp_path / "stats.json"
    rerun = splitvlm(*args(1), "--stats-json", stats)
    assert rerun.returncode == 3, rerun.stderr
    figures = json.loads(stats.read_text())
    earlier = figures["ray"]["earlier_shards"]
    assert earlier["merged"] >= 1 and earlier["copied"] >= 1  # the killed run's work was kept, not redone
    assert figures["skipped"] == earlier["copied"] and figures["encoded"] + earlier["copied"] == 12
    assert_same_store(store, reference[0])
    assert_clean(store)


AMX_REFUSED = """# a thread holding a small (8 KiB) signal stack for the process's life, as some native libraries'
# threads do: while it lives, Linux refuses the process AMX tile state and oneDNN falls back, silently
import ctypes, threading
_libc = ctypes.CDLL(None, use_errno=True)
class _Stack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]
_ready = threading.Event()
def _hold():
    buf = ctypes.create_string_buffer(8192)
    _libc.sigaltstack(ctypes.byref(_Stack(ctypes.cast(buf, ctypes.c_void_p), 0, 8192)), None)
    _ready.set()
    threading.Event().wait()
threading.Thread(target=_hold, daemon=True).start()
_ready.wait()
"""


def test_a_process_refused_amx_stores_the_same_bytes(tiny_model, corpus, reference, tmp_path):
    """The kill -9 test's rare failure (1 CI run in ~6: image 3's entry differed): oneDNN used AMX in one
    process and AVX-512 BF16 in another, which round differently. The exact profile caps oneDNN's ISA on
    the CPU, so a process refused AMX (forced here) stores what any other does: the module's reference
    encode. Neither inherits the test session's own cap."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AMX_REFUSED)
    plain = without_session_cap()
    run = splitvlm("encode", "--model", tiny_model, "--store", tmp_path / "refused", *ENGINE, "--no-progress", corpus,
                   base=plain, env={"PYTHONPATH": os.pathsep.join([str(site), plain.get("PYTHONPATH", "")])})
    assert run.returncode == 3, run.stderr
    assert_same_store(tmp_path / "refused", reference[0])


def test_without_ray_one_error_line(tiny_model, corpus, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ray.py").write_text('raise ImportError("No module named \'ray\'")\n')
    env = {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    run = splitvlm("encode", "--ray", "--gpus", "0", "--model", tiny_model, "--store", tmp_path / "store", corpus,
                   env=env, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ") and "pip install 'splitvlm[ray]'" in lines[0]
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("extra, message", [
    (["--ray", "--gpus", "-1"], "-1"),
    (["--gpus", "1"], "--gpus goes with --ray only"),
    (["--address", "127.0.0.1:6379"], "--address goes with --ray only"),
    (["--ray"], "--ray needs --gpus"),
    (["--ray", "--gpus", "2", "--workers", "3"], "one worker per GPU"),
    (["--ray", "--gpus", "0", "--overwrite"], "--overwrite does not go with --ray"),
])
def test_ray_options_refused_before_any_work(tmp_path, extra, message):
    result = CliRunner().invoke(cli, ["encode", "--model", "m", "--store", str(tmp_path / "store"), *extra, "x.png"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "store").exists()


def test_shard_locks(tmp_path):
    """A live worker's shard is never taken by another; a dead one's is taken over; one run per store."""
    root, counter = str(tmp_path / "s.shards"), iter(range(10))
    first, fd = take_shard(root, "run", lambda: next(counter))
    second, fd2 = take_shard(root, "run", lambda: next(counter))
    assert first.endswith("run-w0") and second.endswith("run-w1")
    os.close(fd)  # the worker of w0 ends: the next worker of the run takes w0 over
    again, fd3 = take_shard(root, "run", lambda: next(counter))
    assert again == first
    os.close(fd2)
    os.close(fd3)
    (tmp_path / "store").mkdir()
    with store_lock(str(tmp_path / "store")):
        code = ("import sys; from splitvlm.encoder.shards import store_lock\n"
                "with store_lock(sys.argv[1]): pass\n")
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True)
        assert other.returncode == 1 and "another `encode --ray` is running" in other.stderr


def test_leftover_shards_merged_and_removed(tmp_path):
    """Shards a killed run left: one with an entry is merged; one killed before its first commit and a
    lone lock file are removed; a shard whose writer still lives is waited for, then named."""
    import lmdb
    import torch

    from splitvlm.store import Entry

    store, root = tmp_path / "store", str(tmp_path / "store") + SUFFIX
    EmbeddingStore(store).close()
    key = "ab" * 32
    with EmbeddingStore(os.path.join(root, "run-w0")) as shard:
        shard.put_many([Entry(key, torch.ones(4, 8, dtype=torch.bfloat16), torch.tensor([[1, 4, 4]]), {})])
    lmdb.open(os.path.join(root, "run-w1"), max_dbs=8).close()  # an environment, no entries database
    Path(root, "run-w2.lock").write_text("123\n")
    tally = merge_shards(shards_in(root), str(store), print, wait_s=1)
    assert (tally.shards, tally.copied, tally.kept) == (1, 1, [])
    assert not os.path.exists(root)
    assert key in entries(store)

    held = subprocess.Popen([sys.executable, "-c", "import sys, time; from splitvlm.encoder.shards import take_shard\n"
                             "take_shard(sys.argv[1], 'run', lambda: 0); print('held', flush=True); time.sleep(60)", root],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(SplitVLMError, match=rf"run-w0: still written by process {held.pid} "):
            merge_shards(shards_in(root), str(store), print, wait_s=0.5)
    finally:
        held.kill()
        held.wait()


def test_ray_batch_default_follows_the_workers():
    """256 inputs per GPU worker call (each call fills the tower from empty), 32 per CPU worker call;
    --ray-batch wins over both."""
    from splitvlm.cli.encode_cmd import ray_options

    assert ray_options(True, None, 2, None, None, False).batch_images == 256
    assert ray_options(True, None, 0, 2, None, False).batch_images == 32
    assert ray_options(True, None, 2, None, 64, False).batch_images == 64


def test_claims_are_settled_in_input_order():
    """The lowest input index with a key encodes it, as in `encode`, whichever keying task asks first; a
    batch asked again (a retried task) gets the same answers; an unkeyable input still settles its index."""
    import asyncio

    from splitvlm.encoder.ray_worker import Claims

    async def run() -> None:
        claims = Claims()
        later = asyncio.create_task(claims.claim([3, 4], ["k", "z"]))
        await asyncio.sleep(0.05)
        assert not later.done()  # waits for indices 0-2
        assert await claims.claim([0, 1, 2], ["a", "k", None]) == [True, True, False]
        assert await later == [False, True]  # index 1 came first in the input, though it asked later
        assert await claims.claim([3, 4], ["k", "z"]) == [False, True]
        assert await claims.claim([5], ["a"]) == [False]
        assert claims.settled == 6 and claims.claimed == set()  # settled indices are let go

    asyncio.run(run())
