"""The Ray side of `encode --ray`: start or join Ray, build the Ray Data pipeline, and count what comes out of it."""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError, first_line
from splitvlm.core.provenance import KeyMaker
from splitvlm.encoder.pipeline import Stats
from splitvlm.encoder.ray_worker import (
    DUPLICATE,
    ENCODED,
    FAILED,
    STOPPED,
    STORED,
    Claims,
    EncodeWorker,
    key_batch,
)

KEY_TASK_CPUS = 0.25  # logical CPUs a keying task asks Ray for (reading and hashing: light)
PROGRESS_PERIOD_S = 5.0  # a plain progress line this often when stderr is not a terminal


@dataclass(frozen=True)
class RayOptions:
    """How `encode --ray` runs: where, on how many workers, in what batches."""

    gpus: int = 0  # one worker per GPU (num_gpus=1 each); 0: CPU workers
    workers: int | None = None  # CPU workers when gpus == 0 (default 1)
    address: str | None = None  # a Ray cluster to join; None: start a local one (or use the one this process has)
    batch_images: int = 32  # inputs per keying task and per call to a worker (see default_batch)
    local_cpus: int | None = None  # logical CPUs of a local cluster started here (None: Ray counts them)
    leftover_wait_s: float = 60.0  # how long to wait for a killed run's worker to let go of its shard

    @staticmethod
    def default_batch(gpus: int) -> int:
        """Inputs per worker call: 256 for a GPU worker (each call runs the Encoder's load -> tower -> write
        from empty; on two H200s at 8630383, 256 gave 138.9 images/s after start against 98.9 for 32),
        32 for CPU workers, whose tower is slow enough that small calls keep the progress moving."""
        return 256 if gpus else 32

    @property
    def pool(self) -> int:
        return self.gpus if self.gpus else (self.workers or 1)


class Progress:
    """Images/s across the cluster on stderr: a bar on a terminal, else a plain line every PROGRESS_PERIOD_S."""

    def __init__(self, total: int, workers: int, enabled: bool):
        self.total, self.workers, self.enabled = total, workers, enabled
        self.t0 = self.last = time.perf_counter()
        self.done = self.encoded = 0
        self.shown = (-1, -1)  # (done, encoded) of the last plain line
        self.bar = tqdm(total=total, unit="img", desc="encode --ray", file=sys.stderr) \
            if enabled and sys.stderr.isatty() else None

    def rate(self) -> float:
        return self.encoded / max(time.perf_counter() - self.t0, 1e-9)

    def line(self) -> str:
        return (f"encode --ray: {self.done}/{self.total} inputs done, {self.encoded} encoded, "
                f"{self.rate():.1f} images/s on {self.workers} workers")

    def update(self, done: int, encoded: int) -> None:
        self.done += done
        self.encoded += encoded
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix_str(f"{self.rate():.1f} images/s")
        elif self.enabled and time.perf_counter() - self.last >= PROGRESS_PERIOD_S:
            self._show()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._show()

    def _show(self) -> None:
        if (self.done, self.encoded) != self.shown:
            print(self.line(), file=sys.stderr, flush=True)
        self.shown, self.last = (self.done, self.encoded), time.perf_counter()


def start_ray(ray: Any, opts: RayOptions) -> bool:
    """Join the cluster at opts.address, or start a local one; False when this process already has Ray."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # workers' logs stay in Ray's session folder
    try:
        if opts.address:
            ray.init(address=opts.address, **quiet)
        else:
            ray.init(num_cpus=opts.local_cpus, include_dashboard=False, **quiet)
    except Exception as exc:
        where = opts.address or "a local Ray cluster"
        raise SplitVLMError(f"{where}: Ray could not start or connect ({type(exc).__name__}: {first_line(exc)})") from None
    for handler in logging.getLogger("ray.data").handlers:  # Ray Data's notes on stderr; its log files keep them
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.CRITICAL)
    return True


def _worker_resources(ray: Any, opts: RayOptions, loader_threads: int) -> dict[str, float]:
    """num_gpus=1 per GPU worker, with CPUs for its loader threads where the cluster has them; CPU workers
    share the cluster's CPUs with room left for the keying tasks (Ray counts CPUs, it does not pin them)."""
    total = ray.cluster_resources()
    cpus = total.get("CPU", 1)
    if opts.gpus:
        have = total.get("GPU", 0)
        if have < opts.gpus:
            raise SplitVLMError(f"--gpus {opts.gpus}: the Ray cluster has {have:g} GPUs")
        return {"num_gpus": 1, "num_cpus": float(max(1, min(loader_threads, int((cpus - 1) // opts.gpus))))}
    return {"num_cpus": min(1.0, cpus / (opts.pool + 1))}


def _no_restarts(ray: Any) -> dict[str, int]:
    """A worker that dies is not restarted (Ray Data would restart it and retry its batch without end): the
    run stops with one error, and the next run merges the shards and resumes. Ray 2.60 takes this only as a
    deprecated extra argument (its named parameters have none); a Ray without that argument keeps its default."""
    params = inspect.signature(ray.data.Dataset.map_batches).parameters.values()
    return {"max_restarts": 0} if any(p.kind is p.VAR_KEYWORD for p in params) else {}


def pipeline(ray: Any, cfg: Config, opts: RayOptions, keys: KeyMaker, paths: list[str], run: tuple[str, str],
             eager: bool) -> Iterator:
    """paths -> keying tasks -> pool of EncodeWorker actors; batches of result rows as they finish.
    eager: each worker starts its engine as it comes up, while the first inputs are keyed."""
    root, run_id = run
    ray.data.DataContext.get_current().enable_progress_bars = False
    claims = ray.remote(num_cpus=0)(Claims).remote()
    # One block, one keying task and one worker call per batch_images inputs: the batches spread over the workers.
    blocks = max(1, math.ceil(len(paths) / opts.batch_images))
    ds = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(paths)], override_num_blocks=blocks)
    ds = ds.map_batches(key_batch, batch_size=opts.batch_images, batch_format="numpy", num_cpus=KEY_TASK_CPUS,
                        fn_kwargs={"keys": keys, "store": cfg.store, "claims": claims})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # RayDeprecationWarning for max_restarts
        ds = ds.map_batches(EncodeWorker, batch_size=opts.batch_images, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=opts.pool),
                            fn_constructor_kwargs={"cfg": cfg, "root": root, "run_id": run_id, "claims": claims,
                                                   "cpu": not opts.gpus, "eager": eager},
                            **_worker_resources(ray, opts, cfg.loader_threads), **_no_restarts(ray))
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def consume(batches: Iterable[dict], stats: Stats, progress: Progress, started: float,
            timeline: dict[str, float] | None = None) -> list[tuple[int, dict]]:
    """Count each row's outcome into stats (figures summed over workers); the failures with their input index.
    timeline gets the first worker's start and the last engine's readiness (time.time()) as workers report them."""
    failures: list[tuple[int, dict]] = []
    timeline = {} if timeline is None else timeline
    for batch in batches:
        for name, pick in (("worker_up_at", min), ("engine_ready_at", max)):
            values = [float(v) for v in batch.get(name, []) if not math.isnan(v)]
            if values:
                timeline[name] = pick(values + ([timeline[name]] if name in timeline else []))
        encoded = 0
        for index, path, status, error in zip(batch["index"], batch["path"], batch["status"], batch["error"]):
            if status == FAILED:
                stats.failed += 1
                failures.append((int(index), {"path": str(path), "error": str(error)}))
                print(f"skipped {error}", file=sys.stderr)
            elif status == ENCODED:
                encoded += 1
            elif status == STORED:
                stats.skipped += 1
            elif status == DUPLICATE:
                stats.duplicates += 1
            elif status == STOPPED:
                raise SplitVLMError(str(error))
        if encoded and stats.first_stored_s is None:
            stats.first_stored_s = time.perf_counter() - started
        stats.encoded += encoded
        stats.tower_seconds += float(batch["tower_s"].sum())
        stats.store_seconds += float(batch["store_s"].sum())
        stats.patches += int(batch["patches"].sum())
        starts = [s for s in batch["engine_start_s"] if not math.isnan(s)]
        if starts:
            stats.engine_start_s = max(starts + [stats.engine_start_s or 0.0])
        reported = [e for e in batch["engine"] if e]
        if reported and not stats.engine:
            stats.engine = json.loads(reported[0])
        progress.update(len(batch["index"]), encoded)
    return failures


def remote_reason(exc: BaseException) -> str:
    """The innermost `SomeError: message` line of a Ray error's remote traceback, else its first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = [line for line in text.splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception)(\(\w+\))?: ", line)]
    return found[0] if found else f"{type(exc).__name__}: {first_line(exc)}"
