"""Shards of `encode --ray`: one LMDB store per worker beside the target store, merged into it and removed."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lmdb

from splitvlm.core.errors import SplitVLMError
from splitvlm.store.merge import merge_stores

SUFFIX = ".shards"  # <store>.shards/ beside the store holds the shards of runs not yet merged
LOCK = ".lock"  # <shard>.lock: held (flock) by the worker writing <shard> for as long as it lives


def shard_root(store: str) -> str:
    """The folder of a store's shards: <store>.shards beside it."""
    return os.path.realpath(store).rstrip(os.sep) + SUFFIX


def new_run_id() -> str:
    """A name for one run's shards, unique on this machine: UTC time and the driver's pid."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"


def shard_path(root: str, run_id: str, worker: int) -> str:
    return os.path.join(root, f"{run_id}-w{worker}")


@contextlib.contextmanager
def store_lock(store: str) -> Iterator[None]:
    """One `encode --ray` at a time per store: an exclusive flock on the store's folder for the run."""
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SplitVLMError(f"{store}: another `encode --ray` is running on this store") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _try_hold(path: str) -> int | None:
    """<path>.lock taken for this process's lifetime (the kernel lets go when it dies), or None if held."""
    fd = os.open(path + LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def take_shard(root: str, run_id: str, next_worker: Callable[[], int]) -> tuple[str, int]:
    """A shard for a worker of this run, locked: one a dead worker of the run left, else a new one."""
    os.makedirs(root, exist_ok=True)
    for path in shards_in(root, run_id):
        if (fd := _try_hold(path)) is not None:
            return path, fd
    while True:
        path = shard_path(root, run_id, next_worker())
        if (fd := _try_hold(path)) is not None:
            return path, fd


def _wait_free(path: str, timeout_s: float) -> None:
    """Wait until no process holds <path>.lock: a worker of a killed run may outlive its driver for seconds."""
    lock = path + LOCK
    if not os.path.exists(lock):
        return
    deadline = time.monotonic() + timeout_s
    fd = os.open(lock, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    with open(lock, encoding="utf-8") as f:
                        pid = f.read().strip() or "?"
                    raise SplitVLMError(f"{path}: still written by process {pid} of another run after "
                                        f"{timeout_s:.0f} s; stop it or wait, then run again") from None
                time.sleep(0.2)
    finally:
        os.close(fd)


def shards_in(root: str, run_id: str | None = None) -> list[str]:
    """The shard folders under root (of one run, or of any), oldest name first; lone lock files too."""
    if not os.path.isdir(root):
        return []
    names = {n[: -len(LOCK)] if n.endswith(LOCK) else n for n in os.listdir(root)}
    prefix = f"{run_id}-w" if run_id else ""
    return [os.path.join(root, n) for n in sorted(names) if n.startswith(prefix) and not n.startswith(".")]


@dataclass
class MergeTally:
    """What merging shards into the store did."""

    shards: int = 0
    copied: int = 0
    identical: int = 0
    kept: list[str] = field(default_factory=list)  # shards with conflicts or bad entries, left in place


def remove_shard(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + LOCK)


def _never_committed(path: str) -> bool:
    """A shard whose worker died before its first commit: no data file, or no valid LMDB meta or entries database yet."""
    data = os.path.join(path, "data.mdb")
    if not os.path.isfile(data) or os.path.getsize(data) == 0:
        return True
    try:
        env = lmdb.open(path, readonly=True, lock=False, subdir=True, max_dbs=8)
    except lmdb.InvalidError:  # the meta pages were never written: nothing was ever committed
        return True
    except lmdb.Error:
        return False  # merge_stores names the problem
    try:
        with env.begin() as txn:
            return txn.get(b"embeddings") is None
    finally:
        env.close()


def merge_shards(shards: list[str], into: str, report: Callable[[str], None], *,
                 wait_s: float | None = None, tally: MergeTally | None = None) -> MergeTally:
    """Merge each shard into the store with merge_stores (checked, identical duplicates skipped,
    conflicts refused) and remove it; a shard with conflicts or bad entries is kept and named.

    wait_s: wait that long for a shard's writer to end (shards left by an earlier run); None: the
    caller knows its writers are done (this run's own shards)."""
    tally = tally or MergeTally()
    for path in shards:
        if wait_s is not None:
            _wait_free(path, wait_s)
        if _never_committed(path):
            remove_shard(path)
            continue
        merged = merge_stores([path], into, report=report)
        tally.shards += 1
        tally.copied += merged.entries.copied
        tally.identical += merged.entries.identical
        if merged.exit_status:
            tally.kept.append(path)
        else:
            remove_shard(path)
    root = os.path.dirname(shards[0]) if shards else None
    if root and os.path.isdir(root) and not os.listdir(root):
        with contextlib.suppress(OSError):
            os.rmdir(root)
    return tally


def kept_error(tally: MergeTally, into: str) -> SplitVLMError:
    """The one-line error for shards that could not be merged cleanly."""
    names = ", ".join(tally.kept)
    return SplitVLMError(f"{names}: entries in conflict with {into} or bad (listed above); the shard is kept: "
                         f"look with `splitvlm store merge SHARD --into {into}` and remove it when done")
