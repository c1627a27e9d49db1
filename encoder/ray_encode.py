"""`encode --ray`: one Ray Data pipeline (keying tasks -> encoder actors writing shards), then the shards merged into the store."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError, first_line
from splitvlm.core.lock import check_lock
from splitvlm.core.provenance import KeyMaker
from splitvlm.encoder.inputs import expand_inputs
from splitvlm.encoder.pipeline import Stats
from splitvlm.encoder.ray_pipeline import (
    Progress,
    RayOptions,
    consume,
    pipeline,
    remote_reason,
    start_ray,
)
from splitvlm.encoder.shards import (
    kept_error,
    merge_shards,
    new_run_id,
    shard_root,
    shards_in,
    store_lock,
)
from splitvlm.store import EmbeddingStore

__all__ = ["RayOptions", "encode_with_ray", "import_ray"]


def import_ray() -> Any:
    """The ray module with Ray Data, or the one-line error that says how to get it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise SplitVLMError(f"--ray needs Ray Data, which cannot be imported here ({first_line(exc)}); "
                            "pip install 'splitvlm[ray]'") from None
    return ray


def encode_with_ray(cfg: Config, opts: RayOptions, inputs: Iterable[str]) -> tuple[Stats, dict]:
    """Encode inputs on Ray into cfg.store: each worker writes a shard, merged (checked) into the store at the end.

    Shards an earlier, killed run left are merged first. Returns the run's Stats, as a single-process
    encode gives them, and what the Ray side did."""
    ray = import_ray()
    if cfg.lock:
        check_lock(cfg.lock)
    started, started_at = time.perf_counter(), time.time()
    paths = expand_inputs(inputs)
    stats = Stats(inputs=len(paths))
    store = os.path.realpath(cfg.store or "")
    cfg = cfg.replace(store=store)
    with EmbeddingStore(store) as target:  # made when missing, as encode does; the keying tasks read it
        eager = len(target) < len(paths)  # something may be new: workers start their engines at once
    keys = KeyMaker(cfg)
    root, run_id = shard_root(store), new_run_id()
    info: dict[str, Any] = {"run_id": run_id, "address": opts.address, "gpus": opts.gpus, "workers": opts.pool,
                            "batch_images": opts.batch_images, "shards": root}
    with store_lock(store):
        earlier = merge_shards(shards_in(root), store, _report, wait_s=opts.leftover_wait_s)
        if earlier.kept:
            raise kept_error(earlier, store)
        info["earlier_shards"] = {"merged": earlier.shards, "copied": earlier.copied, "identical": earlier.identical}
        progress = Progress(len(paths), opts.pool, cfg.show_progress)
        joined = start_ray(ray, opts)
        timeline = {"ray_started_at": time.time()}
        try:
            failures = consume(pipeline(ray, cfg, opts, keys, paths, (root, run_id), eager), stats, progress,
                               started, timeline)
        except BaseException as exc:
            if joined:
                ray.shutdown()  # this run's workers end with it; keep what they committed (after Ctrl-C: the next run)
                if isinstance(exc, Exception):
                    _salvage(shards_in(root, run_id), store, opts.leftover_wait_s)
            if isinstance(exc, (SplitVLMError, KeyboardInterrupt)) or not isinstance(exc, Exception):
                raise
            raise SplitVLMError(f"the Ray pipeline stopped ({remote_reason(exc)})") from None
        if joined:
            ray.shutdown()
        progress.close()
        own = merge_shards(shards_in(root, run_id), store, _report)
    info["shards_merged"] = {"merged": own.shards, "copied": own.copied, "identical": own.identical}
    info["eager_engines"] = eager
    # seconds from the start of the run: where the time before the first stored entry went
    info["timeline_s"] = {name.removesuffix("_at"): round(at - started_at, 3) for name, at in timeline.items()}
    stats.failures = [f for _, f in sorted(failures, key=lambda x: x[0])]
    stats.seconds = time.perf_counter() - started
    if cfg.failures:
        with open(cfg.failures, "w", encoding="utf-8") as f:
            for failure in stats.failures:
                f.write(json.dumps(failure, ensure_ascii=False) + "\n")
    if own.kept:
        raise kept_error(own, store)
    return stats, info


def _report(line: str) -> None:
    print(line, file=sys.stderr)


def _salvage(shards: list[str], store: str, wait_s: float) -> None:
    """After a failed run: merge what its workers committed; whatever cannot be merged now, the next run merges."""
    try:
        tally = merge_shards(shards, store, _report, wait_s=wait_s)
    except SplitVLMError as exc:
        _report(f"{exc}; the next run merges the shards left in {shard_root(store)}")
        return
    if tally.copied or tally.kept:
        _report(f"kept {tally.copied} entries this run encoded before it stopped"
                + (f"; {len(tally.kept)} shards left in {shard_root(store)}" if tally.kept else ""))
