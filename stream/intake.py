"""Consume and flow control: the poll loop, micro-batching, pausing and partition epochs.

The poll loop fetches records, feeds the micro-batcher and queues the batches it cuts for the
worker. While too much work is in flight, or while the worker retries a failed batch, every
assigned partition is paused and the loop keeps polling, so the group membership stays alive;
partitions resume below half the limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from stream.batching import MicroBatcher
from stream.config import Settings
from stream.errors import ErrorKind, FatalError, classify, describe
from stream.metrics import Metrics
from stream.offsets import OffsetTracker

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class Fetched:
    record: ConsumerRecord  # type: ignore[type-arg]
    fetched_at: float
    tp: TopicPartition = field(init=False)
    dlq_sent: bool = False
    # The partition's tracking epoch at fetch time: bumped on revoke and on an offset reset, so a
    # late result of an earlier ownership never marks offsets of the current one finished.
    epoch: int = 0

    def __post_init__(self) -> None:
        self.tp = TopicPartition(self.record.topic, self.record.partition)

    def age_s(self) -> float:
        """Seconds since the record entered Kafka: its timestamp (the producer's CreateTime, or the
        broker's LogAppendTime), or its fetch when it carries none. Each record has its own, unlike
        the fetch time, which a whole poll shares."""
        ts = self.record.timestamp
        if ts is not None and ts > 0:
            return max(0.0, time.time() - ts / 1000)
        return time.monotonic() - self.fetched_at


class Intake:
    def __init__(self, settings: Settings, tracker: OffsetTracker, metrics: Metrics) -> None:
        self.settings = settings
        self.tracker = tracker
        self.metrics = metrics
        self.batcher: MicroBatcher[Fetched] = MicroBatcher(
            settings.batch.max_events, settings.batch.max_wait_ms / 1000
        )
        self.consumer: AIOKafkaConsumer | None = None
        # True while the worker retries a batch after a retriable error: consumption stays paused.
        self.degraded = False
        self._queue: deque[list[Fetched]] = deque()  # batches cut by the poll loop, oldest first
        self._queued = asyncio.Event()  # set while _queue is not empty
        self._paused = False
        self._fetch_position: dict[TopicPartition, int] = {}
        self._epoch: dict[TopicPartition, int] = {}

    # -- polling ----------------------------------------------------------------------------------

    async def poll_loop(self, stopping: asyncio.Event) -> None:
        assert self.consumer is not None
        backoff = BACKOFF_START_S
        while not stopping.is_set():
            wait_ms = max(1, int(self.batcher.time_left() * 1000))
            try:
                records = await self.consumer.getmany(timeout_ms=wait_ms, max_records=self.settings.batch.max_events)
                backoff = BACKOFF_START_S
            except KafkaError as e:
                if classify(e) is ErrorKind.FATAL:  # e.g. not authorised to read the topic or join the group
                    raise FatalError(f"fetch: {describe(e)}") from e
                log.warning("fetch failed (%s), retrying in %.1f s", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            now = time.monotonic()
            for tp, msgs in records.items():
                last = self._fetch_position.get(tp)
                if last is not None and msgs[0].offset < last:
                    self._reset_partition(tp, last, msgs[0].offset)
                self._fetch_position[tp] = msgs[-1].offset + 1
                epoch = self._epoch.get(tp, 0)
                for m in msgs:
                    self.tracker.add(tp, m.offset)
                    self.batcher.append(Fetched(m, now, epoch=epoch))
                self.metrics.consumed.labels(tp.topic).inc(len(msgs))
            while self.batcher.ready():
                self._queue.append(self.batcher.take())
                self._queued.set()
            self.flow_control()
            self._observe_lag()

    async def next_batch(self) -> list[Fetched]:
        """The oldest queued batch, merged with the queued ones after it up to max_events: under
        backlog the poll loop cuts small batches by max_wait, and a busy worker should run full
        ones (one model call each). Records of partitions no longer ours are left out."""
        while True:
            await self._queued.wait()
            if not self._queue:  # emptied by a revoke after the event woke us
                self._queued.clear()
                continue
            batch = self._queue.popleft()
            while self._queue and len(batch) + len(self._queue[0]) <= self.batcher.max_events:
                batch += self._queue.popleft()
            if not self._queue:
                self._queued.clear()
            return [f for f in batch if self.current(f)]

    def current(self, f: Fetched) -> bool:
        """The record belongs to the partition's current ownership (not revoked or reset since)."""
        return self.tracker.owns(f.tp) and f.epoch == self._epoch.get(f.tp, 0)

    # -- partitions -------------------------------------------------------------------------------

    def _reset_partition(self, tp: TopicPartition, expected: int, got: int) -> None:
        """Offsets went backwards: the topic was recreated (a memory-only broker restarted) or the
        group's offsets were reset. Positions tracked before mean nothing now: committing them would
        skip the new records. Start the partition's tracking afresh; its unfinished old records are
        dropped (they can no longer be committed)."""
        log.warning("%s/%d: fetched offset %d after %d: partition reset; restarting its offset tracking",
                    tp.topic, tp.partition, got, expected)
        self.drop_queued({tp})
        self._epoch[tp] = self._epoch.get(tp, 0) + 1
        self.tracker.revoke({tp})
        self.tracker.assign({tp})

    def drop_queued(self, tps: set[TopicPartition]) -> int:
        """Remove not-yet-started records of these partitions; returns how many."""
        dropped = self.batcher.drop(lambda f: f.tp not in tps)
        queued = [[f for f in b if f.tp not in tps] for b in self._queue]
        dropped += sum(len(b) for b in self._queue) - sum(len(b) for b in queued)
        self._queue = deque(b for b in queued if b)
        if not self._queue:
            self._queued.clear()
        return dropped

    def forget(self, tps: set[TopicPartition]) -> None:
        """After a revoke: the partitions' positions mean nothing, and late results of this
        ownership must not count (a new epoch)."""
        for tp in tps:
            self._fetch_position.pop(tp, None)
            self._epoch[tp] = self._epoch.get(tp, 0) + 1

    # -- flow control and lag ---------------------------------------------------------------------

    def flow_control(self) -> None:
        assert self.consumer is not None
        in_flight = self.tracker.in_flight
        self.metrics.in_flight.set(in_flight)
        limit = self.settings.batch.max_in_flight
        assignment = self.consumer.assignment()
        if (in_flight >= limit or self.degraded) and assignment:
            if not self._paused:
                why = "retrying a failed batch" if self.degraded else f"limit {limit}"
                log.info("pausing consumption: %d events in flight (%s)", in_flight, why)
            self.consumer.pause(*assignment)  # also pauses partitions assigned since the last call
            self._paused = True
        elif self._paused and not self.degraded and in_flight <= limit // 2:
            self.consumer.resume(*assignment)
            self._paused = False
            log.info("resumed consumption: %d events in flight", in_flight)
        self.metrics.paused.set(1 if self._paused else 0)

    def _observe_lag(self) -> None:
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)  # the fetch high-water mark: end_offsets is wrong on tansu
            pos = self._fetch_position.get(tp)
            if hw is not None and pos is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, hw - pos))
