"""Micro-batching by count and age: a batch is ready at `max_events` records or `max_wait` seconds
after its first record, whichever comes first."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(
        self, max_events: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_events < 1 or max_wait_s <= 0:
            raise ValueError("max_events must be >= 1 and max_wait_s > 0")
        self.max_events = max_events
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: list[T] = []
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    def append(self, item: T) -> None:
        if self._opened_at is None:
            self._opened_at = self._clock()
        self._items.append(item)

    def time_left(self) -> float:
        """Seconds until the open batch is due (max_wait when empty)."""
        if self._opened_at is None:
            return self.max_wait_s
        return max(0.0, self._opened_at + self.max_wait_s - self._clock())

    def ready(self) -> bool:
        return bool(self._items) and (len(self._items) >= self.max_events or self.time_left() == 0.0)

    def take(self) -> list[T]:
        """Up to max_events items, oldest first; the rest start a new batch aged from now."""
        batch, self._items = self._items[: self.max_events], self._items[self.max_events :]
        self._opened_at = self._clock() if self._items else None
        return batch

    def drop(self, keep: Callable[[T], bool]) -> int:
        """Remove items for which keep() is false (records of revoked partitions); returns how many."""
        before = len(self._items)
        self._items = [i for i in self._items if keep(i)]
        if not self._items:
            self._opened_at = None
        return before - len(self._items)
