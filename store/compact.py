"""Compaction: LMDB never shrinks its data file, so a compacting copy gives the pages of removed entries back.

In place, the copy is written to a sibling folder while this process holds the store's write lock,
checked, synced, and swapped in with one atomic rename (renameat2 RENAME_EXCHANGE where the
filesystem has it, else two renames); the old store is removed only after the swap. Anything that
fails before the swap leaves the old store as it was. See docs/store-format.md.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import lmdb

from splitvlm.core.errors import first_line
from splitvlm.store.env import LOCK_FILE
from splitvlm.store.errors import StoreError
from splitvlm.store.store import EmbeddingStore

DATA_FILE = "data.mdb"
STORE_FILES = {DATA_FILE, LOCK_FILE}
AT_FDCWD = -100
RENAME_EXCHANGE = 2
NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}  # fall back to two renames


@dataclass
class Compacted:
    """What a compaction did: data file bytes on disk before and after, and what the copy holds."""

    path: str
    before: int
    after: int
    entries: int
    results: int
    readers: list[int] = field(default_factory=list)  # other processes still reading the old store


def disk_bytes(path: str) -> int:
    """Bytes the store's data file takes on disk (the file is sparse: its apparent size is the map size)."""
    st = os.stat(os.path.join(path, DATA_FILE))
    return min(st.st_size, st.st_blocks * 512)


def openers(data_file: str) -> list[tuple[int, bool]]:
    """(pid, opened for writing) of each other process with data_file open, as far as /proc shows.

    Linux only; processes of other users or in other PID namespaces are not visible.
    """
    target = os.stat(data_file)
    found: dict[int, bool] = {}
    proc = "/proc"
    for name in os.listdir(proc) if os.path.isdir(proc) else []:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            fds = os.listdir(f"{proc}/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{proc}/{name}/fd/{fd}")
                if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
                    continue
                with open(f"{proc}/{name}/fdinfo/{fd}") as f:
                    flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
            except (OSError, StopIteration, ValueError, IndexError):
                continue
            found[int(name)] = found.get(int(name), False) or (flags & os.O_ACCMODE) != os.O_RDONLY
    return sorted(found.items())


def _refuse_writers(path: str, data_file: str) -> list[int]:
    """The pids reading data_file; StoreError naming a process that has it open for writing."""
    seen = openers(data_file)
    writers = [pid for pid, writing in seen if writing]
    if writers:
        raise StoreError(f"{path}: process {writers[0]} has the store open for writing; compact when no one writes it")
    return [pid for pid, _ in seen]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> None:
    """Swap two folders atomically (renameat2 RENAME_EXCHANGE), or by three renames where it is missing.

    An OSError means nothing changed; a half-done fallback raises StoreError naming where each folder is.
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in NO_EXCHANGE:
            raise OSError(code, os.strerror(code), b)
    aside = f"{a}.old"
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except OSError:
        try:
            os.rename(aside, b)
        except OSError:
            raise StoreError(f"{b}: swap stopped midway; the store is at {aside}, its compacted copy at {a}") from None
        raise
    try:
        os.rename(aside, a)
    except OSError:
        raise StoreError(f"{b}: compacted, but the old store is left at {aside}; remove it") from None


def _copy(store: EmbeddingStore, folder: str, like: str) -> tuple[int, int]:
    """LMDB's compacting copy of store into the empty folder (modes as in the folder like), synced;
    (entries, results) the copy holds."""
    try:
        store.env.copy(folder, compact=True)
    except lmdb.Error as exc:
        raise StoreError(f"{folder}: compacting copy failed ({first_line(exc)})") from None
    shutil.copymode(like, folder)
    shutil.copymode(os.path.join(like, DATA_FILE), os.path.join(folder, DATA_FILE))
    lock = os.path.join(folder, LOCK_FILE)  # empty, with the old one's mode: LMDB fills it on first open
    os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    if os.path.exists(os.path.join(like, LOCK_FILE)):
        shutil.copymode(os.path.join(like, LOCK_FILE), lock)
    _fsync(os.path.join(folder, DATA_FILE))
    _fsync(folder)
    with EmbeddingStore(folder, readonly=True) as copy:
        results = copy.results_db()
        with copy.read() as txn:
            return len(copy), 0 if results is None else txn.stat(results)["entries"]


def _sibling(path: str) -> str:
    parent, name = os.path.split(path)
    try:
        return tempfile.mkdtemp(prefix=f".{name}.compact-", dir=parent)
    except OSError as exc:
        raise StoreError(f"{parent}: cannot make a folder for the copy ({exc.strerror or exc})") from None


def compact_store(path: str | os.PathLike, into: str | os.PathLike | None = None) -> Compacted:
    """Compact the store at path in place, or (into) write a compacted copy to a new folder and leave it be."""
    path = os.path.realpath(os.fspath(path))
    if not os.path.isfile(os.path.join(path, DATA_FILE)):
        raise StoreError(f"{path}: no store there")
    if into is not None:
        return _compact_into(path, os.path.realpath(os.fspath(into)))
    extra = sorted(set(os.listdir(path)) - STORE_FILES)
    if extra:
        raise StoreError(f"{path}: holds {extra[0]!r} besides the store; move it out before compacting in place")
    data = os.path.join(path, DATA_FILE)
    _refuse_writers(path, data)
    before = disk_bytes(path)
    tmp = _sibling(path)
    keep = False  # True while tmp may hold the old store: then nothing is removed
    try:
        with EmbeddingStore(path) as store:
            if store.shared.users > 1:
                raise StoreError(f"{path}: open elsewhere in this process; close it before compacting")
            results = store.results_db()

            def copy_and_swap(txn: lmdb.Transaction) -> tuple[int, int, list[int]]:
                nonlocal keep
                # this write transaction holds the store's write lock: no writer commits until the swap is done
                want = txn.stat(store.shared.embeddings)["entries"], 0 if results is None else txn.stat(results)["entries"]
                readers = _refuse_writers(path, data)
                got = _copy(store, tmp, path)
                if got != want:
                    raise StoreError(f"{tmp}: the copy holds {got} (entries, results), the store {want}")
                keep = True  # from here on tmp may hold the old store: nothing is removed on errors
                try:
                    _exchange(tmp, path)
                except OSError as exc:
                    keep = False  # nothing changed
                    raise StoreError(f"{path}: cannot swap in the compacted copy ({exc.strerror or exc})") from None
                _fsync(os.path.dirname(path))
                late = [pid for pid, writing in openers(os.path.join(tmp, DATA_FILE)) if writing]
                if late:  # opened the old store after our check; its writes wait for our lock: give it back
                    _exchange(tmp, path)
                    _fsync(os.path.dirname(path))
                    keep = False
                    raise StoreError(f"{path}: process {late[0]} opened the store for writing during compaction")
                keep = False
                return *got, readers

            entries, n_results, readers = store.write(copy_and_swap)
    except OSError as exc:
        where = f"the old store is kept at {tmp}" if keep else "the store is as it was"
        raise StoreError(f"{exc.filename or path}: compaction failed ({exc.strerror or exc}); {where}") from None
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return Compacted(path, before, disk_bytes(path), entries, n_results, readers)


def _compact_into(path: str, into: str) -> Compacted:
    """The compacted copy of path written to the new folder into (created; an empty folder will do)."""
    if into == path:
        raise StoreError(f"{into}: is the store itself; leave out --into to compact in place")
    if os.path.exists(into) and (not os.path.isdir(into) or os.listdir(into)):
        raise StoreError(f"{into}: exists and is not an empty folder; --into makes a new store")
    tmp = _sibling(into)
    try:
        with EmbeddingStore(path, readonly=True) as store:
            entries, results = _copy(store, tmp, path)
        os.rename(tmp, into)
        _fsync(os.path.dirname(into))
    except OSError as exc:
        raise StoreError(f"{exc.filename or into}: cannot write the copy ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return Compacted(into, disk_bytes(path), disk_bytes(into), entries, results)
