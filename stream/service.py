"""The stream runtime: one event loop, three tasks, one batch at a time.

- poll (`stream.intake`): fetch, micro-batch, pause and resume partitions;
- work (here): for each batch, decode it and set the invalid records aside (`stream.dlq`), skip
  replays and stale revisions, classify the rest (`agents.pipeline`), then hand everything to
  the delivery mode (`stream.delivery`: produce, persist, mark finished) and commit;
- health: probe Kafka and Postgres for /readyz.

Errors by kind (`stream.errors`): invalid input goes to the DLQ and is committed; a record whose
classification raises is isolated and dead-lettered (`stream.poison`); retriable errors retry
the failed step with backoff while consumption stays paused; fatal ones stop the service without
committing past the failed batch, with one log line and a non-zero exit.

A batch's work is kept across retries (`BatchWork`): it is decoded and embedded once, classified
once, and a retry of the write steps (produce, persist, commit) never repeats model work.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError
from aiokafka.structs import TopicPartition

from agents.monitor import Monitor
from agents.pipeline import BatchResult, Pipeline
from agents.questions import QuestionRegistry, QuestionSet
from agents.store.classifications import ClassificationsTable
from agents.types import Answer, Conversation, EmbeddedConversation
from stream.config import Settings
from stream.delivery import Delivery, Progress, make_delivery, transactional_id
from stream.dlq import DeadLetters, Invalid, Valid, decode_batch
from stream.errors import ErrorKind, FatalError, classify, describe
from stream.health import DependencyHealth
from stream.intake import BACKOFF_MAX_S, BACKOFF_START_S, Fetched, Intake
from stream.kafka import make_consumer, make_producer
from stream.metrics import Metrics
from stream.offsets import OffsetTracker
from stream.poison import PoisonBudget, isolate
from stream.schemas import InvalidEvent, Reason, build_classification, classification_event_id
from stream.tracing import BatchTracer

log = logging.getLogger(__name__)

T = TypeVar("T")

# SIGTERM lets the batch in hand finish for up to this long (a batch takes seconds on 2 cores).
SHUTDOWN_WAIT_S = 30.0


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RETRYING = "retrying"  # a retriable error: the batch backs off and retries, consumption paused
    FAILED = "failed"  # a fatal error: the service stops
    STOPPING = "stopping"


@dataclass(slots=True)
class Item:
    fetched: Fetched
    conv: Conversation
    event_id: str


@dataclass
class BatchWork:
    """What has been computed for one batch so far: kept across retries, so that a retry repeats
    only the step that failed, never the decode or the model work."""

    qset: QuestionSet
    invalid: Invalid  # decode failures, then records whose classification raised
    todo: list[Item] = field(default_factory=list)  # new revisions, after the replay check
    embedded: dict[int, EmbeddedConversation] = field(default_factory=dict)  # by index into todo
    events: list[tuple[Fetched, dict[str, Any]]] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    # Each classified group of `todo` indices and its pipeline result, for the answer monitors
    # (keyed by the group, so a retried classification replaces its results).
    classified: dict[tuple[int, ...], BatchResult] = field(default_factory=dict)


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
        monitor: Monitor | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.questions = questions
        self.pool = pool
        self.metrics = metrics
        self.models = models
        self.monitor = monitor
        self.results = ClassificationsTable(pool)
        self.tracker = OffsetTracker()
        self.intake = Intake(settings, self.tracker, metrics)
        self._idle = asyncio.Event()  # set while the worker holds no batch
        self._idle.set()
        self._stopping = asyncio.Event()
        self.health = DependencyHealth(metrics)
        self.tracer = BatchTracer(settings.topics.input, settings.group_id)
        self.state = State.STARTING
        self.error: str | None = None  # what the service is retrying, or why it failed
        self.poison = PoisonBudget(settings.batch.max_poison_ratio, settings.batch.poison_window)
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
        return self.state is State.READY and self.kafka_ok and self.postgres_ok

    def readiness(self) -> dict[str, Any]:
        """The /readyz body: ready or not, the state, each dependency, and the error being
        retried or that stopped the service."""
        return {"ready": self.ready, "state": self.state.value, "kafka": self.kafka_ok,
                "postgres": self.postgres_ok, "error": self.error}

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Consume until stopped. A fatal error is logged once and raised as `FatalError`."""
        try:
            await self._run()
        except FatalError as e:
            self._fail(str(e))
            raise
        except Exception as e:
            if classify(e) is not ErrorKind.FATAL:
                raise
            self._fail(describe(e))
            raise FatalError(describe(e)) from e
        finally:
            if self.state is not State.FAILED:
                self.state = State.STOPPING
            self.metrics.ready.set(0)

    def _fail(self, why: str) -> None:
        self.state, self.error = State.FAILED, why
        self.metrics.ready.set(0)
        log.critical("fatal: %s: stopping the service", why)

    async def _run(self) -> None:
        s = self.settings
        self.producer = make_producer(s.kafka, transactional_id=transactional_id(s))
        consumer = make_consumer(s.kafka, s.topics.input, s.group_id, s.batch.max_events)
        self.intake.consumer = consumer
        self.delivery = make_delivery(
            s, producer=self.producer, consumer=consumer, tracker=self.tracker, current=self.intake.current,
            table=self.results, dead_letters=DeadLetters(self.producer, s, self.metrics), metrics=self.metrics,
        )
        await self.producer.start()
        try:
            await self._check_topics()
            consumer.subscribe([s.topics.input], listener=_Rebalance(self))
            await consumer.start()
            self.state = State.READY
            try:
                await self._run_tasks()
            finally:
                if self.monitor is not None:
                    await self.monitor.drain(timeout=30)
                try:
                    await self.delivery.commit()  # the rebalance listener is not called on stop()
                except Exception as e:
                    log.warning("final commit failed (%s): the finished offsets will be redone", describe(e))
                await consumer.stop()
        finally:
            await self.producer.stop()

    async def _missing_topics(self) -> list[str]:
        assert self.producer is not None
        t = self.settings.topics
        # All topics' metadata: asking for the topics by name would make a broker that
        # auto-creates topics create them.
        known = (await self.producer.client.fetch_all_metadata()).topics()
        return [name for name in (t.input, t.output, t.dlq) if name not in known]

    async def _check_topics(self) -> None:
        missing = await self._missing_topics()
        if missing:
            raise FatalError(f"topic {missing[0]!r} does not exist: create it, or start with --create-topics")

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
                await asyncio.wait_for(self._idle.wait(), timeout=SHUTDOWN_WAIT_S)
            except TimeoutError:
                log.warning("in-flight batch did not finish within %.0f s: abandoned uncommitted", SHUTDOWN_WAIT_S)
            for t in (work, health, stop):
                t.cancel()
            await asyncio.gather(work, health, stop, return_exceptions=True)

    # -- rebalance --------------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        assert self.delivery is not None
        dropped = self.intake.drop_queued(revoked)
        # Shorter than the shutdown wait: the whole group stops consuming until this member
        # rejoins, so a slow batch must not hold every replica. Its offsets stay uncommitted and
        # the partitions' new owner redoes them (a duplicate output, not a loss).
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=revoke_wait_s(self.settings))
        except TimeoutError:
            log.warning("revoke: in-flight batch still running; its unfinished offsets stay uncommitted")
        try:
            await self.delivery.commit(only=revoked)
        except Exception as e:
            log.warning("revoke: commit failed (%s): the new owner redoes those offsets", describe(e))
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
                    with self.tracer.batch(batch):
                        await self._process(batch)
                    await self.delivery.commit()
            finally:
                self._idle.set()
                self.metrics.in_flight.set(self.tracker.in_flight)  # also between polls

    async def _retrying(self, step: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one step of a batch; retriable errors back off and run it again (consumption stays
        paused meanwhile), fatal ones become `FatalError`, anything else propagates."""
        backoff = BACKOFF_START_S
        while True:
            try:
                result = await fn()
            except Exception as e:
                kind = classify(e)
                if kind is ErrorKind.RETRIABLE and isinstance(e, UnknownTopicOrPartitionError):
                    kind = await self._unknown_topic_kind()
                if kind is ErrorKind.FATAL:
                    raise FatalError(f"{step}: {describe(e)}") from e
                if kind is not ErrorKind.RETRIABLE:
                    raise
                self.metrics.retries.labels(type(e).__name__).inc()
                self._mark_unhealthy(e)
                # One line when the step first fails; the dependency's state change says the rest.
                (log.debug if self.intake.degraded else log.warning)(
                    "%s failed (%s); retrying in %.1f s", step, describe(e), backoff)
                self.intake.degraded = True
                self.state, self.error = State.RETRYING, f"{step}: {describe(e)}"
                if self._stopping.is_set():
                    raise
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if self.intake.degraded:
                log.info("%s succeeded after retries; resuming consumption", step)
            self.intake.degraded = False
            if self.state is State.RETRYING:
                self.state, self.error = State.READY, None
            return result

    async def _unknown_topic_kind(self) -> ErrorKind:
        """aiokafka marks an unknown topic retriable (metadata may lag a topic's creation); when the
        broker answers and the topic is still not there, it was deleted or never created."""
        try:
            return ErrorKind.FATAL if await self._missing_topics() else ErrorKind.RETRIABLE
        except Exception:
            return ErrorKind.RETRIABLE

    def _mark_unhealthy(self, e: BaseException) -> None:
        self.health.down("kafka" if isinstance(e, KafkaError) else "postgres", e)
        self.metrics.ready.set(0)

    async def _process(self, batch: list[Fetched]) -> None:
        assert self.delivery is not None
        started = time.perf_counter()
        self.metrics.batch_size.observe(len(batch))
        # File and CPU work (a stat, maybe a YAML parse; JSON decode of up to max_events records)
        # runs in a thread: the event loop keeps polling and heartbeating meanwhile.
        await asyncio.to_thread(self.questions.maybe_reload)
        qset = self.questions.current
        with self.tracer.stage("decode"):
            valid, invalid = await asyncio.to_thread(decode_batch, batch, self.settings)
        work = BatchWork(qset, invalid)
        work.todo = await self._retrying("replay check", lambda: self._drop_seen(valid, qset.version))
        if work.todo:
            work.events = await self._retrying("classify", lambda: self._classify(work))
        events = work.events
        with self.tracer.stage("deliver"):
            await self._retrying(
                "deliver", lambda: self.delivery.deliver(batch, work.invalid, events, qset.version, work.progress)
            )
        self.health.up("postgres")
        if self.monitor is not None:
            for idx, result in work.classified.items():
                todo = [work.todo[i] for i in idx]
                await self.monitor.submit([t.event_id for t in todo], [t.conv for t in todo], result, qset)

        for _, ev in events:
            for a in ev["answers"]:
                self.metrics.answers.labels(a["question_id"], a["answer"], a["decided_by"]).inc()
        self.metrics.classified.inc(len(events))
        self.metrics.stage_seconds.labels("batch").observe(time.perf_counter() - started)

    async def _classify(self, work: BatchWork) -> list[tuple[Fetched, dict[str, Any]]]:
        """Classify the batch's new revisions, isolating records whose classification raises."""
        todo = work.todo
        work.classified.clear()  # a retried classification starts over
        t0 = time.perf_counter()
        found = await isolate(len(todo), lambda idx: self._answers(work, idx), self.poison)
        self.metrics.stage_seconds.labels("classify").observe(time.perf_counter() - t0)
        self.poison.record(ok=len(todo) - len(found.errors), failed=len(found.errors))
        for i, e in sorted(found.errors.items()):
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            work.invalid.append((todo[i].fetched, InvalidEvent(Reason.PROCESSING_ERROR, msg, type(e).__name__)))
        events = []
        for i, item in enumerate(todo):
            answers = found.results[i]
            if answers is None:
                continue
            f = item.fetched
            events.append((f, build_classification(
                item.conv, answers, event_id=item.event_id, models=self.models,
                source={"topic": f.tp.topic, "partition": f.tp.partition, "offset": f.record.offset},
                latency_ms=round(f.age_s() * 1000),
            )))
        return events

    async def _answers(self, work: BatchWork, idx: Sequence[int]) -> list[list[Answer]]:
        """Answers for `work.todo[i]` for i in `idx`; embeddings are computed once and kept."""
        missing = [i for i in idx if i not in work.embedded]
        if missing:
            t0 = time.perf_counter()
            embedded = await self.pipeline.embed([work.todo[i].conv for i in missing], work.qset)
            self._stage_timed("embed", time.perf_counter() - t0)
            work.embedded.update(zip(missing, embedded, strict=True))
        result = await self.pipeline.classify(
            [work.todo[i].conv for i in idx], work.qset,
            timer=self._stage_timed, embedded=[work.embedded[i] for i in idx],
        )
        work.classified[tuple(idx)] = result
        return result.answers

    def _stage_timed(self, stage: str, seconds: float) -> None:
        self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.tracer.finished_stage(stage, seconds)

    async def _drop_seen(self, valid: Valid, qset_version: str) -> list[Item]:
        """Skip revisions older than one classified before or fetched before them in this batch,
        and exact replays (same event_id) where the delivery mode allows it (see `stream.delivery`).
        The batch is read in offset order, so the outcome is the one of one record at a time."""
        assert self.delivery is not None
        if not valid:
            return []
        seen = await self.results.seen(sorted({(c.tenant_id, c.conversation_id) for _, c in valid}))
        self.health.up("postgres")
        newest = {key: prior.max_revision for key, prior in seen.items()}
        todo = []
        in_batch: set[str] = set()
        for f, conv in valid:
            key = (conv.tenant_id, conv.conversation_id)
            event_id = classification_event_id(
                conv.tenant_id, conv.conversation_id, conv.revision, qset_version, self.models
            )
            prior = seen.get(key)
            if event_id in in_batch:
                # The same revision twice in one batch (a replay, or a producer that reused a
                # revision for other content): the first stands, as it would across batches.
                self.metrics.skipped.labels("duplicate").inc()
            elif conv.revision < newest.get(key, conv.revision):
                # Revision 3 then 2: the 2 is older than what is (or is about to be) published.
                self.metrics.skipped.labels("stale_revision").inc()
            elif prior is not None and event_id in prior.event_ids and self.delivery.skips_replays:
                self.metrics.skipped.labels("duplicate").inc()
            else:
                todo.append(Item(f, conv, event_id))
                in_batch.add(event_id)
                newest[key] = conv.revision
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


def revoke_wait_s(settings: Settings) -> float:
    """How long a revoke waits for the batch in hand: half the session timeout (5 s by default)."""
    return settings.kafka.session_timeout_ms / 2000
