"""The sink: produce the output events, persist their rows, mark offsets finished and commit.

The delivery mode is one strategy object, chosen once at start:

- `AtLeastOnce` (default): dead letters and output events are produced and acknowledged, then
  the rows upserted, then the offsets marked finished; `commit()` commits the contiguous finished
  prefix per partition with the consumer. A crash in between replays the batch; a replayed
  event_id whose row exists is skipped (its output was acknowledged before its row was written),
  so downstream sees at most a duplicate of the last batch.
- `ExactlyOnce` (`kafka.exactly_once`): one Kafka transaction per batch holds the dead letters,
  the output events and the input offsets (`send_offsets_to_transaction`); rows are upserted
  before the transaction commits, so a committed transaction implies stored rows. An aborted or
  crashed transaction leaves nothing visible to `read_committed` readers and its batch is
  replayed. Exact replays are NOT skipped in this mode: a row may exist for a transaction that
  never committed. The transactional id is stable per replica, so a restarted replica fences its
  predecessor and aborts its open transaction.

Commit order (as quix-streams writes it down): produce and await delivery, write Postgres, then
commit offsets. A step that fails is retried by the service with the batch's results kept
(`Progress` says what an earlier attempt finished): at-least-once does not produce the output
again once it was acknowledged; a transaction starts over, since an aborted one left nothing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from agents.store.classifications import ClassificationsTable
from stream.config import Settings
from stream.dlq import DeadLetters, Invalid
from stream.errors import REBALANCE_ERRORS, ErrorKind, FatalError, classify, describe
from stream.headers import classification_headers
from stream.intake import Fetched
from stream.metrics import Metrics
from stream.offsets import OffsetTracker
from stream.schemas import encode

log = logging.getLogger(__name__)

Events = Sequence[tuple[Fetched, dict[str, Any]]]


@dataclass
class Progress:
    """What earlier attempts at delivering a batch already finished."""

    produced: bool = False  # the output events were acknowledged by the broker


def transactional_id(settings: Settings) -> str | None:
    if not settings.kafka.exactly_once:
        return None
    return settings.kafka.transactional_id or f"{settings.group_id}-{socket.gethostname()}"


class Delivery:
    """What both modes share: produce + persist, and marking a batch's offsets finished."""

    #: A replayed event_id with a stored row may be acknowledged without output.
    skips_replays: bool = True

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
        tracker: OffsetTracker,
        current: Callable[[Fetched], bool],
        table: ClassificationsTable,
        dead_letters: DeadLetters,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.consumer = consumer
        self.tracker = tracker
        self.current = current
        self.table = table
        self.dead_letters = dead_letters
        self.metrics = metrics

    async def deliver(
        self, batch: Sequence[Fetched], invalid: Invalid, events: Events, qset_version: str, progress: Progress
    ) -> None:
        raise NotImplementedError

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        raise NotImplementedError

    async def _produce(self, events: Events) -> None:
        """Produce the output events and await their acknowledgement."""
        if not events:
            return
        t0 = time.perf_counter()
        futures = [
            await self.producer.send(
                self.settings.topics.output, encode(ev), key=ev["conversation_id"].encode(),
                headers=classification_headers(
                    ev["event_id"], ev["conversation_id"], self.settings.group_id, f.record.headers
                ),
            )
            for f, ev in events
        ]
        await asyncio.gather(*futures)
        self.metrics.stage_seconds.labels("produce").observe(time.perf_counter() - t0)

    async def _persist(self, events: Events, qset_version: str) -> None:
        """Upsert the events' rows."""
        if not events:
            return
        t0 = time.perf_counter()
        await self.table.upsert([(ev, qset_version) for _, ev in events])
        self.metrics.stage_seconds.labels("persist").observe(time.perf_counter() - t0)

    def _mark_done(self, batch: Sequence[Fetched]) -> None:
        for f in batch:
            if self.current(f):
                self.tracker.done(f.tp, f.record.offset)

    def _observe_latency(self, events: Events) -> None:
        """Per classified event, once its output is delivered; dead letters and skipped replays
        have no output and do not count."""
        for f, _ in events:
            self.metrics.event_latency.observe(f.age_s())


class AtLeastOnce(Delivery):
    async def deliver(
        self, batch: Sequence[Fetched], invalid: Invalid, events: Events, qset_version: str, progress: Progress
    ) -> None:
        # Once per record even if the batch is retried.
        await self.dead_letters.send_all([(f, e) for f, e in invalid if not f.dlq_sent])
        if not progress.produced:
            await self._produce(events)
            progress.produced = True
        await self._persist(events, qset_version)
        self._mark_done(batch)
        self._observe_latency(events)

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        assignment = self.consumer.assignment()
        positions = {tp: pos for tp, pos in self.tracker.to_commit(only).items() if tp in assignment}
        if not positions:
            return
        try:
            await self.consumer.commit(positions)
        except KafkaError as e:
            self.metrics.commits.labels("failed").inc()
            if not isinstance(e, REBALANCE_ERRORS) and classify(e) is ErrorKind.FATAL:
                raise FatalError(f"commit: {describe(e)}") from e
            log.warning("commit failed (%s): will retry with the next batch", e)
            return
        self.tracker.committed(positions)
        self.metrics.commits.labels("ok").inc()


class ExactlyOnce(Delivery):
    skips_replays = False

    async def deliver(
        self, batch: Sequence[Fetched], invalid: Invalid, events: Events, qset_version: str, progress: Progress
    ) -> None:
        """Dead letters, outputs and input offsets in one transaction; rows stored before it
        commits. Any failure aborts it (nothing becomes visible) and re-raises, so the delivery is
        retried whole (`progress` does not apply) or the service stops."""
        await self.producer.begin_transaction()
        try:
            await self.dead_letters.send_all(invalid, count=False)  # counted once the transaction commits
            await self._produce(events)
            await self._persist(events, qset_version)
            self._mark_done(batch)
            positions = {tp: pos for tp, pos in self.tracker.to_commit().items() if self.tracker.owns(tp)}
            if positions:
                await self.producer.send_offsets_to_transaction(positions, self.settings.group_id)
            t0 = time.perf_counter()
            await self.producer.commit_transaction()
            self.metrics.stage_seconds.labels("commit").observe(time.perf_counter() - t0)
        except BaseException:
            self.metrics.transactions.labels("aborted").inc()
            try:
                await asyncio.shield(self.producer.abort_transaction())
            except Exception as abort_error:
                log.warning("abort_transaction failed (%s); the broker aborts it on timeout or when "
                            "this transactional id starts again", abort_error)
            raise
        self.metrics.transactions.labels("committed").inc()
        self._observe_latency(events)
        for _, e in invalid:
            self.metrics.dlq.labels(e.reason.value).inc()
        self.tracker.committed(positions)
        if positions:
            self.metrics.commits.labels("ok").inc()

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        return None  # offsets commit inside each batch's transaction


def make_delivery(settings: Settings, **parts: Any) -> Delivery:
    cls = ExactlyOnce if settings.kafka.exactly_once else AtLeastOnce
    return cls(settings, **parts)
