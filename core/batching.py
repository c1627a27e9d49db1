"""The two ways splitvlm cuts work into batches: jobs by count, images by a patch budget."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def chunks(n: int, size: int) -> Iterator[range]:
    """Index ranges of at most size over n items, in order (the --batch-jobs loop)."""
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def by_budget(items: Iterable[T], cost: Callable[[T], int], budget: int) -> Iterator[list[T]]:
    """Consecutive items in batches whose costs add up to at most budget; an item that alone is
    over the budget makes a batch of its own (the --batch-patches loop of the tower)."""
    batch: list[T] = []
    spent = 0
    for item in items:
        c = cost(item)
        if batch and spent + c > budget:
            yield batch
            batch, spent = [], 0
        batch.append(item)
        spent += c
    if batch:
        yield batch
