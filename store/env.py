"""One LMDB environment per process and store path, shared by every EmbeddingStore open on it.

LMDB forbids opening one environment twice in a process (its locks belong to the process),
and its map may only be resized while this process has no transaction open. SharedEnv
counts open transactions so a resize waits for them, grows the map when a write finds it
full, and adopts a map that another process grew. A read-only open never creates a file, and
falls back to LMDB without its lock file where it may not write that file (see open_env).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import lmdb

from splitvlm.core.errors import first_line
from splitvlm.store.errors import StoreError

EMBEDDINGS_DB = b"embeddings"
RESULTS_DB = b"results"  # reserved for the result cache
MAX_DBS = 8
MAX_READERS = 1024
DEFAULT_MAP_SIZE = 1 << 30
DISK_RESERVE = 64 << 20
MIB = 1 << 20
LOCK_FILE = "lock.mdb"
NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}  # why a lock file cannot be opened for writing
T = TypeVar("T")

_registry: dict[str, SharedEnv] = {}
_registry_lock = threading.Lock()
_registry_pid = os.getpid()
_inherited: set[str] = set()  # paths the parent had open when this process forked


def _reason(exc: lmdb.Error) -> str:
    """What went wrong, without the path lmdb puts in front (our messages name it already)."""
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) and reason else first_line(exc)


def _writable(path: str) -> bool:
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK, effective_ids=effective)


def open_env(path: str, readonly: bool, map_size: int) -> tuple[lmdb.Environment, bool]:
    """The LMDB environment of the store at path, and whether it uses LMDB's lock file.

    Writers always lock. Readers lock too where they can: their slot in lock.mdb stops a writer in
    another process from reusing the pages they read. Where a reader may not write lock.mdb (a store
    owned by another user, a read-only mount) or lock.mdb is absent (LMDB would create it, and a
    read-only open creates no file), it opens with lock=False instead. That is safe while no one
    writes the store, the usual case for such stores: LMDB pages are only ever rewritten by a
    writer. The risk is a writer elsewhere during the read: nothing coordinates it with this
    reader, whose pages it may reuse, so reads may fail (get and check catch damaged values by
    their checksums; ls and stats may show torn headers; LMDB may report corruption). Such errors
    go away when the read is run again after the writer is done; the store itself is unharmed.
    """
    options = dict(
        map_size=map_size, subdir=True, readonly=readonly, max_dbs=MAX_DBS, max_readers=MAX_READERS,
        create=not readonly,
        writemap=not readonly,  # puts copy straight into the file's pages: about 1.5x faster
    )
    lock_file = os.path.join(path, LOCK_FILE)
    if readonly and not (os.path.exists(lock_file) and _writable(lock_file)):
        return lmdb.open(path, lock=False, **options), False
    try:
        return lmdb.open(path, lock=True, **options), True
    except lmdb.Error as exc:  # the lock file refused us after all (NFS root squashing, say)
        if not readonly or getattr(exc, "code", None) not in NO_WRITE:
            raise
    return lmdb.open(path, lock=False, **options), False


class SharedEnv:
    def __init__(self, path: str, readonly: bool, map_size: int):
        self.path = path
        self.readonly = readonly
        self.pid = os.getpid()
        self.users = 0
        self._write_lock = threading.Lock()
        self._cond = threading.Condition()
        self._active = 0  # transactions open in this process
        self._resizing = False
        try:
            self.env, self.locked = open_env(path, readonly, map_size)
        except lmdb.Error as exc:
            how = "" if readonly else " for writing"
            raise StoreError(f"{path}: cannot open the store{how} ({_reason(exc)})") from None
        try:
            if not readonly:
                self.env.reader_check()  # free reader slots of processes that died
            self.embeddings = self._open_db(EMBEDDINGS_DB)
            self.results = self._open_db(RESULTS_DB, required=False)
        except BaseException:
            self.env.close()
            raise

    def _open_db(self, name: bytes, required: bool = True):
        if not self.readonly:
            return self.env.open_db(name, create=True)
        for _ in range(2):
            try:
                return self.env.open_db(name, create=False)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.NotFoundError:
                if required:
                    raise StoreError(f"{self.path}: not an embedding store (no {name.decode()} database)") from None
                return None
        raise StoreError(f"{self.path}: the map keeps growing under us; try again")

    # -- transactions, counted so that a resize can wait for them --
    def _enter(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1

    def _leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _begin(self, write: bool) -> lmdb.Transaction:
        while True:
            self._enter()
            try:
                return self.env.begin(write=write, buffers=True)
            except lmdb.MapResizedError:  # another process grew the map past ours
                self._leave()
                self.resize(0)
            except BaseException:
                self._leave()
                raise

    def resize(self, size: int) -> None:
        """Set the map size (0: adopt the size another process set) once no transaction is open here."""
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            try:
                while self._active:
                    self._cond.wait()
                self.env.set_mapsize(size)
            finally:
                self._resizing = False
                self._cond.notify_all()

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction (buffers: values are memoryviews valid only inside it)."""
        txn = self._begin(write=False)
        try:
            yield txn
        finally:
            txn.abort()
            self._leave()

    def write(self, fn: Callable[[lmdb.Transaction], T], size_hint: int = 0) -> T:
        """fn in one write transaction, committed; a full map is grown and fn run again from the start."""
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")
        self._check_disk(size_hint)
        with self._write_lock:
            while True:
                txn = self._begin(write=True)
                try:
                    result = fn(txn)
                    txn.commit()
                    return result
                except lmdb.MapFullError:
                    pass
                except lmdb.Error as exc:
                    raise StoreError(f"{self.path}: write failed ({first_line(exc)})") from None
                finally:
                    txn.abort()  # no-op after a commit
                    self._leave()
                current = self.env.info()["map_size"]
                grown = max(2 * current, current + 2 * size_hint)
                self.resize(-(-grown // MIB) * MIB)

    def _check_disk(self, size: int) -> None:
        """Refuse a write the disk cannot hold: with writemap, a full disk would kill us with SIGBUS."""
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        if free < size + DISK_RESERVE:
            raise StoreError(
                f"{self.path}: {free / 2**20:.0f} MiB free on its disk; this write needs "
                f"{(size + DISK_RESERVE) / 2**20:.0f} MiB (with a {DISK_RESERVE >> 20} MiB reserve)"
            )

    def map_size(self) -> int:
        return self.env.info()["map_size"]


def acquire(path: str | os.PathLike, readonly: bool, map_size: int = DEFAULT_MAP_SIZE) -> SharedEnv:
    """The process's environment for path, opened on first use; release() it when done."""
    global _registry_pid, _inherited
    path = os.path.realpath(os.fspath(path))
    if readonly:
        try:
            os.stat(os.path.join(path, "data.mdb"))
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(f"{path}: no store there") from None
        except OSError as exc:
            raise StoreError(f"{path}: cannot read the store ({exc.strerror or exc})") from None
    if not readonly:
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f"{path}: is a file, a store is a folder")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the store ({exc.strerror or exc})") from None
    with _registry_lock:
        if _registry_pid != os.getpid():  # a forked child must not use its parent's environments
            _inherited = set(_registry)
            _registry.clear()
            _registry_pid = os.getpid()
        shared = _registry.get(path)
        if shared is None and path in _inherited:
            raise StoreError(
                f"{path}: open in the parent when this process forked, and LMDB cannot open it again "
                "here; open stores after forking, or start workers with the 'spawn' method"
            )
        if shared is not None and shared.readonly and not readonly:
            raise StoreError(f"{path}: already open read-only in this process; close that first")
        if shared is None:
            shared = _registry[path] = SharedEnv(path, readonly, map_size)
        shared.users += 1
        return shared


def release(shared: SharedEnv) -> None:
    with _registry_lock:
        shared.users -= 1
        if shared.users == 0:
            if _registry.get(shared.path) is shared:
                del _registry[shared.path]
            shared.env.close()
