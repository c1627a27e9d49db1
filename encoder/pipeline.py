"""Encoder: reader -> loader (threads) -> vision tower (vLLM, batched by patches) -> store writer."""

from __future__ import annotations

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

from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.images import decode_image, read_image_bytes
from splitvlm.core.lock import check_lock
from splitvlm.encoder.inputs import expand_inputs
from splitvlm.encoder.keys import KeyMaker
from splitvlm.store import EmbeddingStore, Entry


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

    @property
    def num_patches(self) -> int:
        return int(self.grid_thw.prod())


class _Writer:
    """Writes batches to the store on its own thread, off the vision tower's path."""

    def __init__(self, store: EmbeddingStore, stats: Stats, overwrite: bool):
        self.store, self.stats, self.overwrite = store, stats, overwrite
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

    def __init__(self, cfg: Config, engine=None):
        if not cfg.store:
            raise SplitVLMError("no store given (--store PATH)")
        if cfg.lock:
            check_lock(cfg.lock)
        self.cfg = cfg
        self.keys = KeyMaker(cfg)
        self._engine = engine

    @property
    def engine(self):
        if self._engine is None:
            from splitvlm.core.engine import Engine

            self._engine = Engine(self.cfg)
        return self._engine

    def _fail(self, stats: Stats, path: str, error: str) -> None:
        stats.failed += 1
        stats.failures.append({"path": path, "error": error})
        print(f"skipped {error}", file=sys.stderr)

    def _keyed(self, paths: list[str], stats: Stats) -> Iterator[tuple[str, bytes, str]]:
        """(path, bytes, key) of every readable input; unreadable ones become failures."""
        def read(path: str):
            try:
                data = read_image_bytes(path)
                return path, data, self.keys(data), None
            except SplitVLMError as exc:
                return path, None, None, str(exc)

        with ThreadPoolExecutor(self.cfg.loader_threads) as pool:
            for path, data, key, error in pool.map(read, paths):
                if error:
                    self._fail(stats, path, error)
                else:
                    yield path, data, key

    def _prepare(self, todo: list[tuple[str, str]]) -> Iterator[Prepared | tuple[str, str]]:
        """Decode and preprocess in threads, a bounded window ahead of the tower."""

        def prepare(item: tuple[str, str]):
            path, key = item
            try:
                data = read_image_bytes(path)
                if self.keys(data) != key:  # the file changed since it was keyed: never store a wrong tensor
                    return path, f"{path}: changed while encoding; run again"
                image = decode_image(data, path)
                pixel_values, grid = self.engine.preprocess(image)
                return Prepared(path, key, pixel_values, grid)
            except SplitVLMError as exc:
                return path, str(exc)
            except Exception as exc:  # the processor's own refusal of an image
                return path, f"{path}: cannot preprocess ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"

        window = max(2, self.cfg.loader_threads * 4)
        with ThreadPoolExecutor(self.cfg.loader_threads) as pool:
            pending = []
            for item in todo:
                pending.append(pool.submit(prepare, item))
                if len(pending) >= window:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()

    def _batches(self, prepared: Iterable, stats: Stats, bar) -> Iterator[list[Prepared]]:
        batch: list[Prepared] = []
        budget = 0
        for item in prepared:
            if isinstance(item, tuple):
                self._fail(stats, *item)
                bar.update(1)
                continue
            if batch and budget + item.num_patches > self.cfg.batch_patches:
                yield batch
                batch, budget = [], 0
            batch.append(item)
            budget += item.num_patches
        if batch:
            yield batch

    def _entries(self, batch: list[Prepared], embeds: list[torch.Tensor], env: dict) -> list[Entry]:
        meta = {
            "model_id": self.keys.model_id,
            "model_fingerprint": self.keys.fingerprint,
            "vllm_version": env["vllm"],
            "torch_version": env["torch"],
            "device": env["device"],
            "profile": self.cfg.profile,
        }
        return [
            Entry(p.key, e, p.grid_thw.reshape(1, 3).to(torch.int64), {**meta, "source": p.path})
            for p, e in zip(batch, embeds)
        ]

    def embed(self, batch: list[Prepared]) -> list[torch.Tensor]:
        pixel_values = torch.cat([p.pixel_values for p in batch])
        grid = torch.cat([p.grid_thw.reshape(1, 3) for p in batch])
        return self.engine.encode(pixel_values, grid)

    def encode(self, inputs: Iterable[str]) -> Stats:
        t0 = time.perf_counter()
        stats = Stats()
        paths = expand_inputs(inputs)
        stats.inputs = len(paths)
        with EmbeddingStore(self.cfg.store) as store:
            todo: dict[str, str] = {}
            for path, _data, key in self._keyed(paths, stats):
                if key in todo:
                    stats.duplicates += 1
                elif key in store and not self.cfg.overwrite:
                    stats.skipped += 1
                else:
                    todo[key] = path
            if todo:
                self._run(store, [(p, k) for k, p in todo.items()], stats)
        stats.seconds = time.perf_counter() - t0
        if self.cfg.failures:
            with open(self.cfg.failures, "w", encoding="utf-8") as f:
                for failure in stats.failures:
                    f.write(json.dumps(failure, ensure_ascii=False) + "\n")
        return stats

    def _run(self, store: EmbeddingStore, todo: list[tuple[str, str]], stats: Stats) -> None:
        env = self.engine.environment()
        writer = _Writer(store, stats, self.cfg.overwrite)
        bar = tqdm(total=len(todo), unit="img", desc="encode", disable=not self.cfg.show_progress, file=sys.stderr)
        try:
            for batch in self._batches(self._prepare(todo), stats, bar):
                t = time.perf_counter()
                embeds = self.embed(batch)
                stats.tower_seconds += time.perf_counter() - t
                stats.patches += sum(p.num_patches for p in batch)
                writer.put(self._entries(batch, embeds, env))
                stats.encoded += len(batch)
                bar.update(len(batch))
        finally:
            bar.close()
            writer.close()
