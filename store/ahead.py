"""An ordered map computed on one worker thread ahead of its consumer, and replayable from the start."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Ahead(Generic[T, R]):
    """fn over items on a worker thread while the caller consumes the results in order.

    put_many hashes entries here (blake3 holds the GIL) while LMDB copies the previous
    ones (its puts drop the GIL). Calling the object again replays the results made so
    far before waiting for more, so a write retried on a grown map hashes nothing twice.
    """

    def __init__(self, fn: Callable[[T], R], items: list[T]):
        self.done: list[R] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="splitvlm-store") if len(items) > 1 else None
        self.pending = self.pool.map(fn, items) if self.pool else map(fn, items)

    def __call__(self) -> Iterator[R]:
        yield from list(self.done)
        for result in self.pending:
            self.done.append(result)
            yield result

    def __enter__(self) -> Ahead[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
