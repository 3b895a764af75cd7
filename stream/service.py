"""The stream runtime: consume, micro-batch, classify, produce, store, commit.

Tasks (one event loop):
- poll loop: fetches records, feeds the micro-batcher, hands ready batches to the worker queue,
  pauses every assigned partition while too much work is in flight (and keeps polling, so the
  group membership stays alive), resumes below half the limit;
- worker: processes one batch at a time, in this order: DLQ the invalid records, classify the
  valid ones, produce the output events and await their delivery, upsert the rows in Postgres,
  mark the offsets finished, commit the contiguous finished prefix per partition;
- health: probes Kafka and Postgres for /readyz.

Errors by kind: invalid input goes to the DLQ and is committed; retriable errors (Postgres or
Kafka unreachable) retry the batch with backoff while consumption stays paused; anything else
stops the service without committing past the failed batch.

Delivery modes:
- at-least-once (default): outputs are produced and acknowledged, then rows upserted, then the
  contiguous finished prefix of offsets is committed with the consumer. A crash in between
  replays the batch; replays of an already stored event_id are skipped (its output was acked
  before its row was written), so downstream sees at most a duplicate of the last batch.
- exactly-once (`kafka.exactly_once`): one Kafka transaction per batch holds the DLQ records, the
  output events and the input offsets (`send_offsets_to_transaction`); rows are upserted before
  the transaction commits, so a committed transaction implies stored rows. An aborted or crashed
  transaction leaves nothing visible to `read_committed` readers and its batch is replayed. Exact
  replays are NOT skipped in this mode: a row may exist for a transaction that never committed.
  The transactional id is stable per replica (`kafka.transactional_id`, default
  `<group_id>-<hostname>`), so a restarted replica fences its predecessor and aborts its open
  transaction.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from agents.pipeline import Pipeline
from agents.questions import QuestionRegistry
from agents.types import Conversation
from stream.batching import MicroBatcher
from stream.config import Settings
from stream.kafka import make_consumer, make_producer
from stream.metrics import Metrics
from stream.offsets import OffsetTracker
from stream.results import ResultsRepo
from stream.schemas import (
    InvalidEvent,
    build_classification,
    classification_event_id,
    decode_conversation,
    encode,
)

log = logging.getLogger(__name__)

RETRIABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    # Server shutting down / starting up (admin shutdown, crash recovery, "cannot connect now").
    asyncpg.OperatorInterventionError,
    KafkaError,
)
_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 5.0


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


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: Service) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._service.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._service.tracker.assign(set(assigned))
        log.info("assigned %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class Service:
    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        questions: QuestionRegistry,
        pool: asyncpg.Pool,
        metrics: Metrics,
        models: dict[str, str],
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.questions = questions
        self.pool = pool
        self.metrics = metrics
        self.models = models
        self.results = ResultsRepo(pool)
        self.tracker = OffsetTracker()
        self.batcher: MicroBatcher[Fetched] = MicroBatcher(
            settings.batch.max_events, settings.batch.max_wait_ms / 1000
        )
        self._queue: deque[list[Fetched]] = deque()  # batches cut by the poll loop, oldest first
        self._queued = asyncio.Event()  # set while _queue is not empty
        self._idle = asyncio.Event()  # set while the worker holds no batch
        self._idle.set()
        self._stopping = asyncio.Event()
        self._paused = False
        # True while the worker retries a batch after a retriable error: consumption stays paused.
        self._degraded = False
        self._fetch_position: dict[TopicPartition, int] = {}
        self._epoch: dict[TopicPartition, int] = {}
        self.kafka_ok = False
        self.postgres_ok = False
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.kafka_ok and self.postgres_ok

    def stop(self) -> None:
        self._stopping.set()

    @property
    def exactly_once(self) -> bool:
        return self.settings.kafka.exactly_once

    def transactional_id(self) -> str | None:
        if not self.exactly_once:
            return None
        return self.settings.kafka.transactional_id or f"{self.settings.group_id}-{socket.gethostname()}"

    async def run(self) -> None:
        s = self.settings
        self.producer = make_producer(s.kafka, transactional_id=self.transactional_id())
        self.consumer = make_consumer(s.kafka, s.topics.input, s.group_id, s.batch.max_events)
        self.consumer.subscribe([s.topics.input], listener=_Rebalance(self))
        await self.producer.start()
        try:
            await self.consumer.start()
            try:
                await self._run_tasks()
            finally:
                await self._commit()  # the rebalance listener is not called on stop()
                await self.consumer.stop()
        finally:
            await self.producer.stop()

    async def _run_tasks(self) -> None:
        poll = asyncio.create_task(self._poll_loop(), name="poll")
        work = asyncio.create_task(self._work_loop(), name="work")
        health = asyncio.create_task(self._health_loop(), name="health")
        stop = asyncio.create_task(self._stopping.wait(), name="stop")
        try:
            done, _ = await asyncio.wait({poll, work, stop}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            self._stopping.set()
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)
            # Let the batch in hand finish (its offsets then commit); queued batches are abandoned
            # uncommitted and will be redelivered.
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=30)
            except TimeoutError:
                log.warning("in-flight batch did not finish within 30 s: abandoned uncommitted")
            for t in (work, health, stop):
                t.cancel()
            await asyncio.gather(work, health, stop, return_exceptions=True)

    # -- polling and flow control -------------------------------------------------------------

    async def _poll_loop(self) -> None:
        assert self.consumer is not None
        backoff = _BACKOFF_START_S
        while not self._stopping.is_set():
            wait_ms = max(1, int(self.batcher.time_left() * 1000))
            try:
                records = await self.consumer.getmany(timeout_ms=wait_ms, max_records=self.settings.batch.max_events)
                backoff = _BACKOFF_START_S
            except KafkaError as e:
                log.warning("fetch failed (%s), retrying in %.1f s", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
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
            self._flow_control()
            self._observe_lag()

    def _reset_partition(self, tp: TopicPartition, expected: int, got: int) -> None:
        """Offsets went backwards: the topic was recreated (a memory-only broker restarted) or the
        group's offsets were reset. Positions tracked before mean nothing now: committing them would
        skip the new records. Start the partition's tracking afresh; its unfinished old records are
        dropped (they can no longer be committed)."""
        log.warning("%s/%d: fetched offset %d after %d: partition reset; restarting its offset tracking",
                    tp.topic, tp.partition, got, expected)
        self._drop_queued({tp})
        self._epoch[tp] = self._epoch.get(tp, 0) + 1
        self.tracker.revoke({tp})
        self.tracker.assign({tp})

    def _drop_queued(self, tps: set[TopicPartition]) -> int:
        """Remove not-yet-started records of these partitions; returns how many."""
        dropped = self.batcher.drop(lambda f: f.tp not in tps)
        queued = [[f for f in b if f.tp not in tps] for b in self._queue]
        dropped += sum(len(b) for b in self._queue) - sum(len(b) for b in queued)
        self._queue = deque(b for b in queued if b)
        if not self._queue:
            self._queued.clear()
        return dropped

    def _current(self, f: Fetched) -> bool:
        return self.tracker.owns(f.tp) and f.epoch == self._epoch.get(f.tp, 0)

    def _flow_control(self) -> None:
        assert self.consumer is not None
        in_flight = self.tracker.in_flight
        self.metrics.in_flight.set(in_flight)
        limit = self.settings.batch.max_in_flight
        assignment = self.consumer.assignment()
        if (in_flight >= limit or self._degraded) and assignment:
            if not self._paused:
                why = "retrying a failed batch" if self._degraded else f"limit {limit}"
                log.info("pausing consumption: %d events in flight (%s)", in_flight, why)
            self.consumer.pause(*assignment)  # also pauses partitions assigned since the last call
            self._paused = True
        elif self._paused and not self._degraded and in_flight <= limit // 2:
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

    # -- rebalance --------------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        dropped = self._drop_queued(revoked)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.settings.kafka.session_timeout_ms / 2000)
        except TimeoutError:
            log.warning("revoke: in-flight batch still running; its unfinished offsets stay uncommitted")
        await self._commit(only=revoked)
        self.tracker.revoke(revoked)
        for tp in revoked:
            self._fetch_position.pop(tp, None)
            self._epoch[tp] = self._epoch.get(tp, 0) + 1
        log.info("revoked %d partitions (%d unstarted records dropped)", len(revoked), dropped)

    # -- processing -------------------------------------------------------------------------------

    async def _work_loop(self) -> None:
        while True:
            await self._queued.wait()
            if not self._queue:  # emptied by a revoke after the event woke us
                self._queued.clear()
                continue
            batch = self._queue.popleft()
            # Under backlog the poll loop queues batches cut by max_wait, often small: merge queued
            # ones up to max_events, so a busy worker runs full batches (one model call each).
            while self._queue and len(batch) + len(self._queue[0]) <= self.batcher.max_events:
                batch += self._queue.popleft()
            if not self._queue:
                self._queued.clear()
            self._idle.clear()
            try:
                batch = [f for f in batch if self._current(f)]
                if batch:
                    await self._process_with_retry(batch)
                    await self._commit()
            finally:
                self._idle.set()
                self.metrics.in_flight.set(self.tracker.in_flight)  # also between polls

    async def _process_with_retry(self, batch: list[Fetched]) -> None:
        backoff = _BACKOFF_START_S
        while True:
            try:
                await self._process(batch)
                if self._degraded:
                    log.info("batch succeeded after retries; resuming consumption")
                self._degraded = False
                return
            except RETRIABLE as e:
                kind = type(e).__name__
                self.metrics.retries.labels(kind).inc()
                self._mark_unhealthy(e)
                self._degraded = True
                if self._stopping.is_set():
                    raise
                log.warning("batch failed (%s: %s); retrying in %.1f s", kind, e, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _mark_unhealthy(self, e: BaseException) -> None:
        if isinstance(e, KafkaError):
            self.kafka_ok = False
        else:
            self.postgres_ok = False
        self.metrics.ready.set(0)

    async def _process(self, batch: list[Fetched]) -> None:
        assert self.producer is not None
        started = time.perf_counter()
        self.metrics.batch_size.observe(len(batch))
        self.questions.maybe_reload()
        qset = self.questions.current

        valid: list[tuple[Fetched, Conversation]] = []
        invalid: list[tuple[Fetched, InvalidEvent]] = []
        for f in batch:
            try:
                valid.append((f, decode_conversation(f.record.value, self.settings.limits).to_conversation()))
            except InvalidEvent as e:
                invalid.append((f, e))
        if not self.exactly_once:
            # At-least-once: dead-letter first, once per record even if the batch is retried.
            await self._send_dlq_all([(f, e) for f, e in invalid if not f.dlq_sent])

        todo = await self._drop_seen(valid, qset.version)
        events: list[tuple[Fetched, dict[str, Any]]] = []
        if todo:
            t0 = time.perf_counter()
            result = await self.pipeline.classify(
                [c for _, c, _ in todo], qset,
                timer=lambda stage, s: self.metrics.stage_seconds.labels(stage).observe(s),
            )
            self.metrics.stage_seconds.labels("classify").observe(time.perf_counter() - t0)
            now = time.monotonic()
            for (f, conv, event_id), answers in zip(todo, result.answers, strict=True):
                events.append(
                    (
                        f,
                        build_classification(
                            conv, answers, event_id=event_id, models=self.models,
                            source={"topic": f.tp.topic, "partition": f.tp.partition, "offset": f.record.offset},
                            latency_ms=int((now - f.fetched_at) * 1000),
                        ),
                    )
                )
        if self.exactly_once:
            await self._publish_transaction(batch, invalid, events, qset.version)
        else:
            await self._publish(events, qset.version)
            self._mark_done(batch)

        for _, ev in events:
            for a in ev["answers"]:
                self.metrics.answers.labels(a["question_id"], a["answer"], a["decided_by"]).inc()
        self.metrics.classified.inc(len(events))
        self.metrics.stage_seconds.labels("batch").observe(time.perf_counter() - started)

    def _mark_done(self, batch: list[Fetched]) -> None:
        now = time.monotonic()
        for f in batch:
            if self._current(f):
                self.tracker.done(f.tp, f.record.offset)
            self.metrics.event_latency.observe(now - f.fetched_at)

    async def _send_dlq_all(self, items: list[tuple[Fetched, InvalidEvent]], count: bool = True) -> None:
        sends = [(f, e, await self._send_dlq(f, e)) for f, e in items]
        for f, e, fut in sends:
            await fut
            f.dlq_sent = True
            if count:
                self.metrics.dlq.labels(e.reason.value).inc()

    async def _publish(self, events: list[tuple[Fetched, dict[str, Any]]], qset_version: str) -> None:
        """Produce the output events and await their acknowledgement, then upsert their rows."""
        assert self.producer is not None
        if not events:
            return
        t0 = time.perf_counter()
        futures = [
            await self.producer.send(self.settings.topics.output, encode(ev), key=ev["conversation_id"].encode())
            for _, ev in events
        ]
        await asyncio.gather(*futures)
        self.metrics.stage_seconds.labels("produce").observe(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await self.results.upsert([(ev, qset_version) for _, ev in events])
        self.metrics.stage_seconds.labels("persist").observe(time.perf_counter() - t0)
        self.postgres_ok = True

    async def _publish_transaction(
        self,
        batch: list[Fetched],
        invalid: list[tuple[Fetched, InvalidEvent]],
        events: list[tuple[Fetched, dict[str, Any]]],
        qset_version: str,
    ) -> None:
        """Exactly-once: DLQ records, outputs and input offsets in one transaction; rows stored
        before it commits. Any failure aborts it (nothing becomes visible) and re-raises, so the
        batch is retried whole or the service stops."""
        assert self.producer is not None
        await self.producer.begin_transaction()
        try:
            await self._send_dlq_all(invalid, count=False)  # counted once the transaction commits
            await self._publish(events, qset_version)
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
        for _, e in invalid:
            self.metrics.dlq.labels(e.reason.value).inc()
        self.tracker.committed(positions)
        if positions:
            self.metrics.commits.labels("ok").inc()

    async def _drop_seen(
        self, valid: list[tuple[Fetched, Conversation]], qset_version: str
    ) -> list[tuple[Fetched, Conversation, str]]:
        """Skip revisions older than one already classified, and exact replays (same event_id).

        A replayed event_id is safe to skip at-least-once: its row is written only after its output
        event was acknowledged. Not in exactly-once mode: there a row may belong to a transaction
        that aborted, so the replay must be produced again (in a transaction that commits).
        """
        if not valid:
            return []
        seen = await self.results.seen(sorted({(c.tenant_id, c.conversation_id) for _, c in valid}))
        self.postgres_ok = True
        todo = []
        in_batch: set[str] = set()
        for f, conv in valid:
            event_id = classification_event_id(
                conv.tenant_id, conv.conversation_id, conv.revision, qset_version, self.models
            )
            prior = seen.get((conv.tenant_id, conv.conversation_id))
            if event_id in in_batch:
                # The same revision twice in one batch (a replay, or a producer that reused a
                # revision for other content): the first stands, as it would across batches.
                self.metrics.skipped.labels("duplicate").inc()
            elif prior is not None and conv.revision < prior.max_revision:
                self.metrics.skipped.labels("stale_revision").inc()
            elif prior is not None and event_id in prior.event_ids and not self.exactly_once:
                self.metrics.skipped.labels("duplicate").inc()
            else:
                todo.append((f, conv, event_id))
                in_batch.add(event_id)
        return todo

    async def _send_dlq(self, f: Fetched, e: InvalidEvent) -> asyncio.Future[Any]:
        assert self.producer is not None
        r = f.record
        headers = list(r.headers or ()) + [
            ("error.reason", e.reason.value.encode()),
            ("error.message", e.message[:1000].encode("utf-8", "replace")),
            ("source.topic", r.topic.encode()),
            ("source.partition", str(r.partition).encode()),
            ("source.offset", str(r.offset).encode()),
        ]
        log.info("DLQ %s/%d@%d: %s: %s", r.topic, r.partition, r.offset, e.reason.value, e.message[:200])
        value = r.value
        if value is not None and len(value) > self.settings.limits.max_event_bytes:
            # The DLQ topic may not take what the input topic did; keep the head of the original
            # and say so, rather than fail the partition on a record we can never deliver whole.
            value = value[: self.settings.limits.max_event_bytes]
            headers.append(("error.truncated_from", str(len(r.value)).encode()))
        return await self.producer.send(self.settings.topics.dlq, value, key=r.key, headers=headers)

    # -- commits and health -------------------------------------------------------------------------

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        if self.consumer is None or self.exactly_once:  # exactly-once commits inside transactions
            return
        assignment = self.consumer.assignment()
        positions = {
            tp: pos for tp, pos in self.tracker.to_commit(only).items() if tp in assignment
        }
        if not positions:
            return
        try:
            await self.consumer.commit(positions)
        except (CommitFailedError, KafkaError) as e:
            self.metrics.commits.labels("failed").inc()
            log.warning("commit failed (%s): will retry with the next batch", e)
            return
        self.tracker.committed(positions)
        self.metrics.commits.labels("ok").inc()

    async def _health_loop(self) -> None:
        assert self.producer is not None
        while True:
            try:
                await asyncio.wait_for(self.pool.fetchval("SELECT 1"), timeout=3)
                self.postgres_ok = True
            except Exception:  # any failure means not ready; the reason is in the worker's log
                self.postgres_ok = False
            try:
                await asyncio.wait_for(self.producer.client.fetch_all_metadata(), timeout=3)
                self.kafka_ok = True
            except Exception:
                self.kafka_ok = False
            self.metrics.ready.set(1 if self.ready else 0)
            await asyncio.sleep(2)
