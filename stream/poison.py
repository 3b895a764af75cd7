"""Poison records: find the records of a batch whose classification raises, so the rest go on.

A record that passes validation can still make the pipeline raise (a tokenizer edge case, a head
error, a bug). Failing the whole batch would stop the service on the same offsets at every
restart. Instead, when classification raises a processing error (`stream.errors`), the batch is
retried once whole (the error may not come back), then split in halves, and every half that still
raises is split again, until the records that raise on their own are known. Those go to the DLQ
with reason `processing_error`; every other record keeps the result of the part it succeeded in.
For k poison records among n the cost is one more pass over the batch plus about 2·k·log2(n)
smaller ones.

A burst is not poison: after a bad deploy every record raises, and the topic must not drain into
the DLQ. `PoisonBudget` stops the service (`FatalError`) as soon as more than
`batch.max_poison_ratio` × `batch.poison_window` of the last `batch.poison_window` classified
records raised: counted as they are found, before any record of the batch is dead-lettered.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from stream.errors import ErrorKind, FatalError, classify, describe

log = logging.getLogger(__name__)

R = TypeVar("R")


class PoisonBudget:
    """How many of the recent records may raise before the service stops instead."""

    def __init__(self, max_ratio: float, window: int) -> None:
        self.window = window
        self.limit = int(max_ratio * window)
        self._recent: deque[bool] = deque(maxlen=window)  # True: the record raised

    @property
    def recent_failures(self) -> int:
        return sum(self._recent)

    def check(self, found: int, last: BaseException) -> None:
        """`found` records of the current batch raised so far: stop if that is one too many."""
        failures = self.recent_failures + found
        if failures > self.limit:
            raise FatalError(
                f"{failures} of the last {self.window} records raised while being classified (limit "
                f"{self.limit}, batch.max_poison_ratio): a systematic failure, not a poison record; "
                f"last: {describe(last)}"
            )

    def record(self, ok: int, failed: int) -> None:
        self._recent.extend([False] * ok + [True] * failed)


class Isolated(Generic[R]):
    """Per item, its result, or the exception it raised alone."""

    def __init__(self, n: int) -> None:
        self.results: list[R | None] = [None] * n
        self.errors: dict[int, BaseException] = {}


async def isolate(
    n: int, run: Callable[[Sequence[int]], Awaitable[Sequence[R]]], budget: PoisonBudget
) -> Isolated[R]:
    """Run items 0..n-1 through `run` (which takes indices and returns results aligned with them),
    isolating the items that raise processing errors. Retriable and fatal errors propagate: they
    are about the infrastructure, not a record."""
    out: Isolated[R] = Isolated(n)
    every = list(range(n))
    pending, retried = [every], False
    while pending:
        part = pending.pop()
        try:
            _store(out, part, await run(part))
            continue
        except Exception as e:
            if classify(e) is not ErrorKind.PROCESSING:
                raise
            error = e
        if part is every and not retried:
            log.warning("classifying a batch of %d raised (%s): retrying it once", n, describe(error))
            pending.append(every)
            retried = True
        elif len(part) == 1:
            out.errors[part[0]] = error
            budget.check(len(out.errors), error)
        else:
            if part is every:
                log.warning("the batch raised again (%s): isolating the records that raise", describe(error))
            half = len(part) // 2
            pending += [part[half:], part[:half]]
    return out


def _store(out: Isolated[R], idx: Sequence[int], results: Sequence[R]) -> None:
    for i, r in zip(idx, results, strict=True):
        out.results[i] = r
