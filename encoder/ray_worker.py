"""The stages `encode --ray` runs on Ray: keying tasks, the key registry, and encoder actors that write shards.

Rows carry (index, path) in and (index, path, key, status, error) plus the figures of the work out.
Nothing here imports ray at module level: the driver checks that Ray is there first.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from typing import Any

import numpy as np

from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.provenance import KeyMaker
from splitvlm.core.sources import read_bytes
from splitvlm.encoder.pipeline import Encoder
from splitvlm.encoder.shards import take_shard
from splitvlm.store import EmbeddingStore
from splitvlm.store.key import image_digest

NEW, STORED, DUPLICATE, FAILED, ENCODED = "new", "stored", "duplicate", "failed", "encoded"
STOPPED = "stopped"  # the worker could not go on (vLLM did not start, the shard cannot be written): error says why
FIGURES = {"tower_s": np.float64, "store_s": np.float64, "patches": np.int64, "engine_start_s": np.float64,
           "worker_up_at": np.float64, "engine_ready_at": np.float64}  # the last two: time.time(), once per worker
UNSET = ("engine_start_s", "worker_up_at", "engine_ready_at")  # NaN where a batch does not report them


class Claims:
    """A Ray actor: the key registry, and worker numbers.

    Claims are settled in input order, as `encode` meets its inputs: the input with the lowest index
    encodes a key and later ones are duplicates, whatever order the keying tasks finish in, so the
    store records the same `source` as a single-process encode. A keying task claims its batch, a
    contiguous run of input indices, once every lower index is settled. A batch claimed again (a
    retried task) gets the same answers."""

    def __init__(self) -> None:
        self.owner: dict[str, int] = {}  # key -> the input index that encodes it
        self.claimed: set[int] = set()  # indices claimed at or above settled (those below are let go)
        self.settled = 0  # every index below this one is claimed
        self.workers = 0
        self._moved: asyncio.Condition | None = None  # made on the actor's event loop

    async def claim(self, indices: list[int], keys: list[str | None]) -> list[bool]:
        """For each input (None: it could not be keyed): whether it is the one that encodes its key."""
        if self._moved is None:
            self._moved = asyncio.Condition()
        async with self._moved:
            await self._moved.wait_for(lambda: self.settled >= min(indices, default=self.settled))
            won = []
            for index, key in zip(indices, keys):
                if key is not None:
                    won.append(self.owner.setdefault(key, index) == index)
                else:
                    won.append(False)
                if index >= self.settled:
                    self.claimed.add(index)
            while self.settled in self.claimed:  # the set stays as small as the batches in flight
                self.claimed.remove(self.settled)
                self.settled += 1
            self._moved.notify_all()
        return won

    def next_worker(self) -> int:
        self.workers += 1
        return self.workers - 1


def _out(batch: dict[str, np.ndarray], key: list[str], status: list[str], error: list[str],
         figures: dict[str, float] | None = None, engine: str = "") -> dict[str, np.ndarray]:
    """One output batch; the batch's figures ride on its first row (the driver sums them)."""
    n = len(batch["path"])
    out = {"index": np.asarray(batch["index"], dtype=np.int64), "path": np.asarray(batch["path"], dtype=object),
           "key": np.asarray(key, dtype=object), "status": np.asarray(status, dtype=object),
           "error": np.asarray(error, dtype=object), "engine": np.asarray([engine] + [""] * (n - 1), dtype=object)}
    for name, dtype in FIGURES.items():
        column = np.zeros(n, dtype=dtype)
        if name in UNSET:
            column[:] = math.nan
        if figures and n and figures.get(name) is not None:
            column[0] = figures[name]
        out[name] = column
    return out


def key_batch(batch: dict[str, np.ndarray], *, keys: KeyMaker, store: str, claims: Any) -> dict[str, np.ndarray]:
    """Ray Data task: read each image (file, URL or container member) once, key its bytes, and mark what the store holds or another input claimed."""
    import ray

    n = len(batch["path"])
    key, status, error = [""] * n, [FAILED] * n, [""] * n
    for i, path in enumerate(batch["path"]):
        try:
            key[i] = keys.provenance.key_of_digest(image_digest(read_bytes(str(path))))
            status[i] = NEW
        except SplitVLMError as exc:  # the same one-line reason the single-process encoder gives
            error[i] = str(exc)
    keyed = [i for i in range(n) if status[i] == NEW]
    missing: set[str] = set()
    if keyed:
        with EmbeddingStore(store, readonly=True) as target:
            missing = set(target.missing([key[i] for i in keyed]))
    # every input is claimed, keyed or not: later batches wait until each lower index is settled
    won = ray.get(claims.claim.remote([int(x) for x in batch["index"]],
                                      [key[i] if status[i] == NEW else None for i in range(n)]))
    for i in keyed:
        status[i] = DUPLICATE if not won[i] else (NEW if key[i] in missing else STORED)
    return _out(batch, key, status, error)


class EncodeWorker:
    """Ray Data actor: splitvlm's own Encoder (and Engine, started on the first new image) writing one shard.

    A worker Ray restarts after a crash takes over the shard its predecessor left (its lock is free),
    so a retried batch finds what was already committed there and nothing is stored twice."""

    def __init__(self, cfg: Config, root: str, run_id: str, claims: Any, cpu: bool = False, eager: bool = False) -> None:
        """eager: start the engine now, on a thread, while the keying tasks run (the driver asks for it
        when the store may lack some inputs); a failed start is raised by the first call that needs it."""
        import ray

        self.up_at = time.time()
        if cpu:  # --gpus 0: Ray leaves the GPUs visible to workers without any; vLLM must not take one
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.shard, self._lock_fd = take_shard(root, run_id, lambda: ray.get(claims.next_worker.remote()))
        self.encoder = Encoder(cfg.replace(store=self.shard, failures=None, show_progress=False, overwrite=False))
        self.engine_reported = self.timeline_reported = False
        if eager:
            threading.Thread(target=self._start_engine, daemon=True).start()

    def _start_engine(self) -> None:
        try:
            _ = self.encoder.engine  # the property starts it once, under its lock
        except Exception:  # kept by the Encoder, raised again by the call that needs the engine
            pass

    def _timeline(self) -> dict[str, float | None]:
        """When this worker came up and when its engine was ready (time.time()), once per worker."""
        if self.timeline_reported or self.encoder.engine_ready_at is None:
            return {}
        self.timeline_reported = True
        return {"worker_up_at": self.up_at, "engine_ready_at": self.encoder.engine_ready_at}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status = [str(s) for s in batch["status"]]
        error = [str(e) for e in batch["error"]]
        new = [i for i, s in enumerate(status) if s == NEW]
        if not new:
            return _out(batch, list(batch["key"]), status, error)
        paths = [str(batch["path"][i]) for i in new]
        try:
            stats = self.encoder.encode(paths)
        except SplitVLMError as exc:  # one line for the driver to stop the run with (Ray's errors lose the type)
            return _out(batch, list(batch["key"]), [STOPPED] * len(status), [str(exc)] * len(status))
        failed = {f["path"]: f["error"] for f in stats.failures}
        for i, path in zip(new, paths):
            status[i], error[i] = (FAILED, failed[path]) if path in failed else (ENCODED, "")
        figures = {"tower_s": stats.tower_seconds, "store_s": stats.store_seconds, "patches": stats.patches,
                   "engine_start_s": stats.engine_start_s, **self._timeline()}
        engine = ""
        if stats.engine and not self.engine_reported:
            engine, self.engine_reported = json.dumps(stats.engine), True
        return _out(batch, list(batch["key"]), status, error, figures, engine)
