"""The stream runtime: one event loop, three tasks, one batch at a time.

- poll (`stream.intake`): fetch, micro-batch, pause and resume partitions;
- work (here): for each batch, decode it and set the invalid records aside (`stream.dlq`), skip
  replays and stale revisions, classify the rest (`agents.pipeline`), then hand everything to
  the delivery mode (`stream.delivery`: produce, persist, mark finished) and commit;
- health: probe Kafka and Postgres for /readyz.

Errors by kind: invalid input goes to the DLQ and is committed; retriable errors (Postgres or
Kafka unreachable) retry the batch with backoff while consumption stays paused; anything else
stops the service without committing past the failed batch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from agents.pipeline import Pipeline
from agents.questions import QuestionRegistry
from agents.store.classifications import ClassificationsTable
from agents.types import Conversation
from stream.config import Settings
from stream.delivery import Delivery, make_delivery, transactional_id
from stream.dlq import DeadLetters, Valid, decode_batch
from stream.health import DependencyHealth
from stream.intake import BACKOFF_MAX_S, BACKOFF_START_S, Fetched, Intake
from stream.kafka import make_consumer, make_producer
from stream.metrics import Metrics
from stream.offsets import OffsetTracker
from stream.schemas import build_classification, classification_event_id
from stream.tracing import BatchTracer

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
        self.results = ClassificationsTable(pool)
        self.tracker = OffsetTracker()
        self.intake = Intake(settings, self.tracker, metrics)
        self._idle = asyncio.Event()  # set while the worker holds no batch
        self._idle.set()
        self._stopping = asyncio.Event()
        self.health = DependencyHealth(metrics)
        self.tracer = BatchTracer(settings.topics.input, settings.group_id)
        self.producer: AIOKafkaProducer | None = None
        self.delivery: Delivery | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        return self.intake.consumer

    @property
    def kafka_ok(self) -> bool:
        return self.health.is_up("kafka")

    @property
    def postgres_ok(self) -> bool:
        return self.health.is_up("postgres")

    @property
    def ready(self) -> bool:
        return self.kafka_ok and self.postgres_ok

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        s = self.settings
        self.producer = make_producer(s.kafka, transactional_id=transactional_id(s))
        consumer = make_consumer(s.kafka, s.topics.input, s.group_id, s.batch.max_events)
        consumer.subscribe([s.topics.input], listener=_Rebalance(self))
        self.intake.consumer = consumer
        self.delivery = make_delivery(
            s, producer=self.producer, consumer=consumer, tracker=self.tracker, current=self.intake.current,
            table=self.results, dead_letters=DeadLetters(self.producer, s, self.metrics), metrics=self.metrics,
        )
        await self.producer.start()
        try:
            await consumer.start()
            try:
                await self._run_tasks()
            finally:
                await self.delivery.commit()  # the rebalance listener is not called on stop()
                await consumer.stop()
        finally:
            await self.producer.stop()

    async def _run_tasks(self) -> None:
        poll = asyncio.create_task(self.intake.poll_loop(self._stopping), name="poll")
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

    # -- rebalance --------------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        assert self.delivery is not None
        dropped = self.intake.drop_queued(revoked)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.settings.kafka.session_timeout_ms / 2000)
        except TimeoutError:
            log.warning("revoke: in-flight batch still running; its unfinished offsets stay uncommitted")
        await self.delivery.commit(only=revoked)
        self.tracker.revoke(revoked)
        self.intake.forget(revoked)
        log.info("revoked %d partitions (%d unstarted records dropped)", len(revoked), dropped)

    # -- processing -------------------------------------------------------------------------------

    async def _work_loop(self) -> None:
        assert self.delivery is not None
        while True:
            batch = await self.intake.next_batch()
            self._idle.clear()
            try:
                if batch:
                    await self._process_with_retry(batch)
                    await self.delivery.commit()
            finally:
                self._idle.set()
                self.metrics.in_flight.set(self.tracker.in_flight)  # also between polls

    async def _process_with_retry(self, batch: list[Fetched]) -> None:
        backoff = BACKOFF_START_S
        while True:
            try:
                with self.tracer.batch(batch):
                    await self._process(batch)
                if self.intake.degraded:
                    log.info("batch succeeded after retries; resuming consumption")
                self.intake.degraded = False
                return
            except RETRIABLE as e:
                kind = type(e).__name__
                self.metrics.retries.labels(kind).inc()
                self._mark_unhealthy(e)
                # One line when the batch first fails; the dependency's state change says the rest.
                (log.debug if self.intake.degraded else log.warning)(
                    "batch failed (%s: %s); retrying in %.1f s", kind, e, backoff)
                self.intake.degraded = True
                if self._stopping.is_set():
                    raise
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _mark_unhealthy(self, e: BaseException) -> None:
        self.health.down("kafka" if isinstance(e, KafkaError) else "postgres", e)
        self.metrics.ready.set(0)

    async def _process(self, batch: list[Fetched]) -> None:
        assert self.delivery is not None
        started = time.perf_counter()
        self.metrics.batch_size.observe(len(batch))
        self.questions.maybe_reload()
        qset = self.questions.current

        with self.tracer.stage("decode"):
            valid, invalid = decode_batch(batch, self.settings)
        todo = await self._drop_seen(valid, qset.version)
        events: list[tuple[Fetched, dict[str, Any]]] = []
        if todo:
            t0 = time.perf_counter()
            result = await self.pipeline.classify(
                [c for _, c, _ in todo], qset,
                timer=self._stage_timed,
            )
            self.metrics.stage_seconds.labels("classify").observe(time.perf_counter() - t0)
            for (f, conv, event_id), answers in zip(todo, result.answers, strict=True):
                events.append(
                    (
                        f,
                        build_classification(
                            conv, answers, event_id=event_id, models=self.models,
                            source={"topic": f.tp.topic, "partition": f.tp.partition, "offset": f.record.offset},
                            latency_ms=round(f.age_s() * 1000),
                        ),
                    )
                )
        with self.tracer.stage("deliver"):
            await self.delivery.deliver(batch, invalid, events, qset.version)
        self.health.up("postgres")

        for _, ev in events:
            for a in ev["answers"]:
                self.metrics.answers.labels(a["question_id"], a["answer"], a["decided_by"]).inc()
        self.metrics.classified.inc(len(events))
        self.metrics.stage_seconds.labels("batch").observe(time.perf_counter() - started)

    def _stage_timed(self, stage: str, seconds: float) -> None:
        self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.tracer.finished_stage(stage, seconds)

    async def _drop_seen(self, valid: Valid, qset_version: str) -> list[tuple[Fetched, Conversation, str]]:
        """Skip revisions older than one already classified, and exact replays (same event_id)
        where the delivery mode allows it (see `stream.delivery`)."""
        assert self.delivery is not None
        if not valid:
            return []
        seen = await self.results.seen(sorted({(c.tenant_id, c.conversation_id) for _, c in valid}))
        self.health.up("postgres")
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
            elif prior is not None and event_id in prior.event_ids and self.delivery.skips_replays:
                self.metrics.skipped.labels("duplicate").inc()
            else:
                todo.append((f, conv, event_id))
                in_batch.add(event_id)
        return todo

    # -- health -----------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        assert self.producer is not None
        while True:
            try:
                await asyncio.wait_for(self.pool.fetchval("SELECT 1"), timeout=3)
                self.health.up("postgres")
            except Exception as e:  # any failure means not ready
                self.health.down("postgres", e)
            try:
                await asyncio.wait_for(self.producer.client.fetch_all_metadata(), timeout=3)
                self.health.up("kafka")
            except Exception as e:
                self.health.down("kafka", e)
            self.metrics.ready.set(1 if self.ready else 0)
            await asyncio.sleep(2)
