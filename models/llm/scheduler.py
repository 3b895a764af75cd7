"""Micro-batching in front of an engine: many async callers, few engine calls.

Callers from every conversation and question ``await scheduler.score(prompt)`` (or
``score_many``). One collector task takes requests from a bounded queue in arrival order, closes
a batch when it holds ``max_batch`` prompts or ``max_wait_ms`` after its first prompt, and runs
``engine.score`` on a dedicated single worker thread, so the event loop never blocks and the
engine sees one batch at a time (the next batch gathers meanwhile). Each caller's future is
resolved with its own P(yes); if the engine call fails, every caller of that batch gets the
exception. The queue bound gives backpressure: ``score`` waits while the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from models.llm.engine import YesNoEngine

log = logging.getLogger(__name__)


class SchedulerClosed(RuntimeError):
    """The scheduler was closed before the request ran."""


@dataclass
class _Request:
    prompt: str
    future: asyncio.Future[float]


@dataclass
class SchedulerStats:
    batches: int = 0
    prompts: int = 0
    failed_batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class BatchScheduler:
    def __init__(
        self,
        engine: YesNoEngine,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue(maxsize=max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = SchedulerStats()

    def _ensure_started(self) -> None:
        if self._closed:
            raise SchedulerClosed("the scheduler is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="llm-batch-scheduler")

    async def score(self, prompt: str) -> float:
        """P(yes) for one prompt, batched with whatever else is waiting."""
        self._ensure_started()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(prompt, future))
        if self._closed and self._task is not None and self._task.done() and not future.done():
            # Waited on a full queue while close() ran: nothing will take this request.
            future.set_exception(SchedulerClosed("the scheduler closed before this request ran"))
        return await future

    async def score_many(self, prompts: Sequence[str]) -> np.ndarray:
        """P(yes) for each prompt, in input order."""
        results = await asyncio.gather(*(self.score(p) for p in prompts))
        return np.asarray(results, dtype=np.float64)

    async def _collect(self, first: _Request) -> list[_Request]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:  # close(): run what we have, then stop
                self._queue.put_nowait(None)
                break
            batch.append(item)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [r for r in await self._collect(first) if not r.future.done()]
            if not batch:
                continue
            prompts = [r.prompt for r in batch]
            try:
                scores = await loop.run_in_executor(self._executor, self.engine.score, prompts)
                if len(scores) != len(batch):
                    raise RuntimeError(f"engine returned {len(scores)} scores for {len(batch)} prompts")
            except Exception as e:  # every caller of the batch gets the error
                self.stats.failed_batches += 1
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.prompts += len(batch)
            self.stats.batch_sizes.append(len(batch))
            for r, p in zip(batch, scores, strict=True):
                if not r.future.done():
                    r.future.set_result(float(p))

    async def close(self) -> None:
        """Run what is queued, then stop; later calls raise SchedulerClosed."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            await self._queue.put(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(SchedulerClosed("the scheduler closed before this request ran"))
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> BatchScheduler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
