"""Encoder: reader -> loader (threads: read, key, decode, preprocess) -> vision tower (vLLM, batched by patches) -> store writer."""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from splitvlm.core.batching import by_budget
from splitvlm.core.config import Config
from splitvlm.core.errors import EngineStartError, SplitVLMError, first_line
from splitvlm.core.images import image_from_bytes, image_pixels, read_image_bytes
from splitvlm.core.lock import check_lock
from splitvlm.core.provenance import KeyMaker
from splitvlm.core.sources import is_path, read_bytes
from splitvlm.encoder.inputs import Inputs, Item
from splitvlm.store import EmbeddingStore, Entry
from splitvlm.store.key import image_digest

PIXEL_BUDGET = 150_000_000  # decoded pixels in flight across all loader threads at once


class PixelBudget:
    """At most `limit` decoded pixels held at once; an image over the whole limit is held alone."""

    def __init__(self, limit: int):
        self.limit, self.in_use, self.peak = limit, 0, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Wait until `pixels` fit beside those held (or nothing is held), and hold them for the block."""
        with self._cond:
            self._cond.wait_for(lambda: self.in_use == 0 or self.in_use + pixels <= self.limit)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


@dataclass
class Stats:
    inputs: int = 0
    encoded: int = 0
    skipped: int = 0  # already in the store
    duplicates: int = 0  # same key as another input of this run
    failed: int = 0
    seconds: float = 0.0
    tower_seconds: float = 0.0
    store_seconds: float = 0.0
    patches: int = 0
    engine_start_s: float | None = None  # None: no engine was needed
    first_stored_s: float | None = None  # from the run's start to the first entry committed
    engine: dict = field(default_factory=dict)  # the engine's settings as vLLM reported them
    failures: list[dict] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"encoded {self.encoded}, skipped {self.skipped} already stored, "
            f"{self.duplicates} duplicates, failed {self.failed}; "
            f"{self.seconds:.1f} s, {self.images_per_s:.1f} images/s"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images_per_s"] = self.images_per_s
        return d


@dataclass
class Prepared:
    path: str
    key: str
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    digest: bytes = b""  # blake3 of the file's bytes, recorded in the entry

    @property
    def num_patches(self) -> int:
        return int(self.grid_thw.prod())


class _Writer:
    """Writes batches to the store on its own thread, off the vision tower's path."""

    def __init__(self, store: EmbeddingStore, stats: Stats, overwrite: bool, started: float):
        self.store, self.stats, self.overwrite, self.started = store, stats, overwrite, started
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (entries := self.queue.get()) is not None:
            if self.error is not None:
                continue
            t0 = time.perf_counter()
            try:
                self.store.put_many(entries, overwrite=self.overwrite)
                if self.stats.first_stored_s is None:
                    self.stats.first_stored_s = time.perf_counter() - self.started
            except BaseException as exc:  # re-raised on the main thread by close()
                self.error = exc
            self.stats.store_seconds += time.perf_counter() - t0

    def put(self, entries: list[Entry]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(entries)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class Encoder:
    """Pre-encode images into the store with vLLM's own Qwen2-VL vision tower."""

    def __init__(self, cfg: Config, engine=None, pixel_budget: int = PIXEL_BUDGET):
        if not cfg.store:
            raise SplitVLMError("no store given (--store PATH)")
        if cfg.lock:
            check_lock(cfg.lock)
        self.cfg = cfg
        self.keys = KeyMaker(cfg)
        self._engine = engine
        self._engine_error: EngineStartError | None = None
        self.engine_start_s: float | None = None
        self.engine_ready_at: float | None = None  # time.time() when the engine was up (Ray's timeline)
        self._engine_lock = threading.Lock()
        self.pixels = PixelBudget(pixel_budget)  # bounds the loader threads' decoded images

    @property
    def engine(self):
        """The engine, started once on first need; a failed start is raised again, never retried."""
        with self._engine_lock:  # loader threads ask for it; start it once, and only when needed
            if self._engine_error is not None:
                raise self._engine_error
            if self._engine is None:
                from splitvlm.core.engine import Engine, encoder_only_for

                t0 = time.perf_counter()
                try:
                    self._engine = Engine(self.cfg, encoder_only=encoder_only_for(self.cfg))
                    self.engine_start_s = time.perf_counter() - t0
                    self.engine_ready_at = time.time()
                except EngineStartError as exc:
                    self._engine_error = exc
                    raise
        return self._engine

    def _fail(self, stats: Stats, path: str, error: str) -> None:
        stats.failed += 1
        stats.failures.append({"path": path, "error": error})
        print(f"skipped {error}", file=sys.stderr)

    def _load(self, item: Item, store: EmbeddingStore) -> Prepared | tuple[str, str, str]:
        """Read once (or take the bytes a streamed source read), key those bytes, and decode and
        preprocess the same bytes unless already stored.

        Returns a Prepared image, ("stored", path, key) or ("failed", path, reason).
        """
        path, data = (item, None) if isinstance(item, str) else item
        try:
            if isinstance(data, SplitVLMError):  # the source could not read this one
                raise data
            if data is None:
                data = read_image_bytes(path) if is_path(path) else read_bytes(path)
            digest = image_digest(data)
            key = self.keys.provenance.key_of_digest(digest)
            if not self.cfg.overwrite and key in store:
                return "stored", path, key
            engine = self.engine  # started (if need be) before any pixels are held
            with self.pixels.hold(image_pixels(data)):  # decoded once, at full size, within the budget
                pixel_values, grid = engine.preprocess(image_from_bytes(data, path, self.cfg.image_loader))
            return Prepared(path, key, pixel_values, grid, digest)
        except EngineStartError:
            raise  # not this image's fault: the run stops
        except SplitVLMError as exc:
            return "failed", path, str(exc)
        except Exception as exc:  # the processor's own refusal of an image
            return "failed", path, f"{path}: cannot preprocess ({type(exc).__name__}: {first_line(exc)})"

    def _loaded(self, items: Iterable[Item], store: EmbeddingStore) -> Iterator[Prepared | tuple[str, str, str]]:
        """_load on loader threads, in input order, a bounded window ahead of the tower (a streamed
        source is read on this thread as the window moves: at most the window's images are held)."""
        window = max(2, self.cfg.loader_threads * 4)
        with ThreadPoolExecutor(self.cfg.loader_threads) as pool:
            pending = []
            for item in items:
                pending.append(pool.submit(self._load, item, store))
                if len(pending) >= window:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()

    def _batches(self, loaded: Iterable, stats: Stats, bar) -> Iterator[list[Prepared]]:
        """Batches of new images by patch budget; stored, duplicate and failed inputs counted on the way."""
        seen: set[str] = set()

        def new_images() -> Iterator[Prepared]:
            for item in loaded:
                stats.inputs += 1
                if isinstance(item, tuple):
                    kind, path, detail = item
                    if kind == "failed":
                        self._fail(stats, path, detail)
                    elif detail in seen:
                        stats.duplicates += 1
                    else:
                        seen.add(detail)
                        stats.skipped += 1
                    bar.update(1)
                    continue
                if item.key in seen:
                    stats.duplicates += 1
                    bar.update(1)
                    continue
                seen.add(item.key)
                yield item

        yield from by_budget(new_images(), lambda p: p.num_patches, self.cfg.batch_patches)

    def _entries(self, batch: list[Prepared], embeds: list[torch.Tensor], env: dict) -> list[Entry]:
        meta = {
            "vllm_version": env["vllm"],
            "torch_version": env["torch"],
            "device": env["device"],
            "profile": self.cfg.profile,
            "tower_kernels": env["tower_kernels"],
        }
        return [
            Entry(p.key, e, p.grid_thw.reshape(1, 3).to(torch.int64),
                  {**meta, **self.keys.provenance.meta(p.digest), "source": p.path})
            for p, e in zip(batch, embeds)
        ]

    def embed(self, batch: list[Prepared]) -> list[torch.Tensor]:
        pixel_values = torch.cat([p.pixel_values for p in batch])
        grid = torch.cat([p.grid_thw.reshape(1, 3) for p in batch])
        return self.engine.run_tower(pixel_values, grid)

    def encode(self, inputs: Iterable[str] | Inputs) -> Stats:
        """Encode image files, URLs, member references and container sources (Inputs: checked already,
        with column names) into the store; per-image failures are counted and reported, one line each."""
        t0 = time.perf_counter()
        stats = Stats()
        items = inputs if isinstance(inputs, Inputs) else Inputs(inputs)
        with EmbeddingStore(self.cfg.store) as store:
            self._run(store, items, stats, t0)
        stats.seconds = time.perf_counter() - t0
        stats.engine_start_s = self.engine_start_s
        if self._engine is not None:
            stats.engine = self._engine.reported()
        if self.cfg.failures:
            with open(self.cfg.failures, "w", encoding="utf-8") as f:
                for failure in stats.failures:
                    f.write(json.dumps(failure, ensure_ascii=False) + "\n")
        return stats

    def _run(self, store: EmbeddingStore, items: Inputs, stats: Stats, started: float) -> None:
        writer = _Writer(store, stats, self.cfg.overwrite, started)
        bar = tqdm(total=items.total, unit="img", desc="encode", disable=None if self.cfg.show_progress else True, file=sys.stderr)
        try:
            for batch in self._batches(self._loaded(items, store), stats, bar):
                t = time.perf_counter()
                embeds = self.embed(batch)
                stats.tower_seconds += time.perf_counter() - t
                stats.patches += sum(p.num_patches for p in batch)
                writer.put(self._entries(batch, embeds, self.engine.environment()))
                stats.encoded += len(batch)
                bar.update(len(batch))
        finally:
            bar.close()
            writer.close()
