"""Backfill inside the service: answer stored conversations for new or changed questions.

`flexor backfill` (stream/backfill_command.py) enqueues work items on `topics.backfill`, each a
list of stored conversations. Every replica runs a `BackfillWorker` beside its live consumer, in
its own consumer group (`<group_id>.backfill`), so N replicas share a backfill the way they share
the input topic, and an item whose offset was not committed is redelivered after a crash.

Per item: load the stored revisions with their stored chunk vectors (nothing is embedded again),
skip those already answered under the current question set and models (same event_id) or
replaced by a newer revision, answer the questions that have no answer yet at that revision, and
publish one complete classification.v1 event per conversation: the answers to every current
question that applies, the ones answered before copied from the stored event made with the same
models. Its event_id is the one the live path gives that revision under the current question set
(`classification_event_id`), so a rerun, a redelivered item and a live replay all name the same
event. Then upsert the rows, record the item as done (progress) and commit its offset.

Delivery is at-least-once in both delivery modes: an item cut short by a crash is answered again
and may publish an event twice, with the same event_id. A pacer caps the conversations per
second so that live traffic keeps its latency (`backfill.max_rate`); model work shares the
pipeline's worker thread with the live batches.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import BaseModel, ConfigDict, Field

from agents.pipeline import Pipeline
from agents.questions import Question, QuestionRegistry, QuestionSet
from agents.store.backfill import BackfillJobs
from agents.store.classifications import ClassificationsTable
from agents.store.conversations import ConversationsTable, Key, StoreMismatch
from agents.types import EmbeddedConversation
from stream.config import Settings
from stream.dlq import DeadLetters
from stream.errors import ErrorKind, FatalError, classify, describe
from stream.headers import classification_headers
from stream.intake import BACKOFF_MAX_S, BACKOFF_START_S, Fetched
from stream.kafka import make_consumer, make_producer
from stream.metrics import Metrics
from stream.schemas import (
    InvalidEvent,
    Reason,
    build_classification,
    classification_event_id,
    encode,
    parse_envelope,
    validate_fields,
)

log = logging.getLogger(__name__)

ITEM_SCHEMA = "backfill.v1"


class WorkItem(BaseModel):
    """A backfill work item on `topics.backfill`: stored conversations for a replica to answer."""

    model_config = ConfigDict(extra="ignore", strict=True)

    schema_: Literal["backfill.v1"] = Field(alias="schema")
    job_id: str = Field(min_length=1, max_length=64)
    item: int = Field(ge=0)
    question_set: str  # the version the job was planned with (replicas answer with their own)
    # [tenant_id, conversation_id] pairs
    conversations: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = Field(min_length=1, max_length=1000)


def encode_item(job_id: str, item: int, question_set: str, keys: Sequence[Key]) -> bytes:
    return orjson.dumps(
        {"schema": ITEM_SCHEMA, "job_id": job_id, "item": item, "question_set": question_set,
         "conversations": [list(k) for k in keys]}
    )


def decode_item(raw: bytes | None) -> WorkItem:
    return validate_fields(WorkItem, parse_envelope(raw, ITEM_SCHEMA))


class Pacer:
    """At most `rate` conversations per second, in item-sized steps (0 = no limit). Written out
    rather than taken from a limiter library: it is a deadline that moves by n / rate, and it
    must give way to a stop request while it waits."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()

    async def take(self, n: int, stopping: asyncio.Event) -> bool:
        """Wait for the budget of `n` conversations; False if a stop came first."""
        if self.rate <= 0:
            return not stopping.is_set()
        now = time.monotonic()
        self._next = max(self._next, now)  # idle time earns no burst
        wait = self._next - now
        self._next += n / self.rate
        if wait > 0:
            try:
                await asyncio.wait_for(stopping.wait(), timeout=wait)
            except TimeoutError:
                pass
        return not stopping.is_set()


class _Stopped(Exception):
    pass


class BackfillWorker:
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
        self.metrics = metrics
        self.models = models
        self.stored = ConversationsTable(pool)
        self.results = ClassificationsTable(pool)
        self.jobs = BackfillJobs(pool)
        self.pacer = Pacer(settings.backfill.max_rate)
        self._stopping = asyncio.Event()
        self._warned_jobs: set[str] = set()
        self.consumer: AIOKafkaConsumer | None = None

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        s = self.settings
        producer = make_producer(s.kafka)
        consumer = make_consumer(s.kafka, s.topics.backfill, f"{s.group_id}.backfill", max_records=1)
        self.consumer = consumer
        dead_letters = DeadLetters(producer, s, self.metrics)
        await producer.start()
        try:
            await consumer.start()
            try:
                while not self._stopping.is_set():
                    try:
                        records = await consumer.getmany(timeout_ms=200, max_records=1)
                    except KafkaError as e:
                        log.warning("backfill fetch failed (%s); retrying", e)
                        await asyncio.sleep(BACKOFF_START_S)
                        continue
                    for tp, msgs in records.items():
                        for m in msgs:
                            try:
                                await self._handle_with_retry(m, producer, dead_letters)
                            except _Stopped:
                                return  # uncommitted: the item is redelivered
                            await self._commit(consumer, tp, m.offset + 1)
            finally:
                await consumer.stop()
        finally:
            await producer.stop()

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, position: int) -> None:
        try:
            await consumer.commit({tp: position})
        except KafkaError as e:
            # Revoked meanwhile: the new owner answers the item again and finds it done.
            log.warning("backfill commit of %s/%d failed (%s)", tp.topic, tp.partition, e)

    async def _handle_with_retry(
        self, record: ConsumerRecord, producer: AIOKafkaProducer, dead_letters: DeadLetters  # type: ignore[type-arg]
    ) -> None:
        try:
            item = decode_item(record.value)
        except InvalidEvent as e:
            await dead_letters.send_all([(Fetched(record, time.monotonic()), e)])
            self.metrics.backfill_items.labels("invalid").inc()
            return
        if not await self.pacer.take(len(item.conversations), self._stopping):
            raise _Stopped
        backoff = BACKOFF_START_S
        failed_once = False
        while True:
            try:
                published, skipped = await self._answer(item, record, producer)
                await self.jobs.item_done(item.job_id, item.item, len(item.conversations), published, skipped)
                self.metrics.backfill_items.labels("done").inc()
                return
            except Exception as e:
                kind = classify(e)
                if kind is ErrorKind.FATAL:
                    raise FatalError(f"backfill: {describe(e)}") from e
                if kind is ErrorKind.PROCESSING:
                    if failed_once:
                        # Raised twice on the same item: dead-letter it rather than retry forever;
                        # `flexor dlq replay` puts it back once the cause is fixed.
                        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                        await dead_letters.send_all(
                            [(Fetched(record, time.monotonic()),
                              InvalidEvent(Reason.PROCESSING_ERROR, msg, type(e).__name__))]
                        )
                        await self.jobs.item_failed(item.job_id, item.item)
                        self.metrics.backfill_items.labels("failed").inc()
                        return
                    failed_once = True
                if self._stopping.is_set():
                    raise _Stopped from e
                log.warning("backfill item %s/%d failed (%s: %s); retrying in %.1f s",
                            item.job_id, item.item, type(e).__name__, e, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _answer(
        self, item: WorkItem, record: ConsumerRecord, producer: AIOKafkaProducer  # type: ignore[type-arg]
    ) -> tuple[int, int]:
        """Answer one item; returns (events published, conversations skipped)."""
        started = time.monotonic()
        await asyncio.to_thread(self.questions.maybe_reload)  # file checks off the event loop
        qset = self.questions.current
        if item.question_set != qset.version and item.job_id not in self._warned_jobs:
            self._warned_jobs.add(item.job_id)
            log.warning("backfill job %s was planned with question set %s; this replica answers with %s",
                        item.job_id, item.question_set, qset.version)
        keys = list(dict.fromkeys((t, c) for t, c in item.conversations))
        loaded = await self._load(keys)
        todo = await self._unanswered(loaded, qset.version)
        events = await self._events(todo, qset, record, started)
        events = await self._still_current(events)
        if events:
            futures = [
                await producer.send(
                    self.settings.topics.output, encode(ev), key=ev["conversation_id"].encode(),
                    headers=classification_headers(
                        ev["event_id"], ev["conversation_id"], self.settings.group_id, record.headers
                    ),
                )
                for ev in events
            ]
            await asyncio.gather(*futures)
            await self.results.upsert([(ev, qset.version) for ev in events])
        self.metrics.backfill.labels("published").inc(len(events))
        self.metrics.stage_seconds.labels("backfill").observe(time.monotonic() - started)
        return len(events), len(keys) - len(events)

    async def _load(self, keys: list[Key]) -> list[EmbeddedConversation]:
        """The stored conversations; one whose chunks this process cannot use is left out."""
        try:
            return await self.stored.load(keys, self.pipeline.embedder.model_id)
        except StoreMismatch:
            pass
        out = []
        for key in keys:  # find the culprits one by one (rare: after an embedder or chunker change)
            try:
                out.extend(await self.stored.load([key], self.pipeline.embedder.model_id))
            except StoreMismatch as e:
                log.warning("backfill: %s", e)
                self.metrics.backfill.labels("refused").inc()
        return out

    async def _unanswered(self, loaded: list[EmbeddedConversation], qset_version: str) -> list[EmbeddedConversation]:
        seen = await self.results.seen([(e.conversation.tenant_id, e.conversation.conversation_id) for e in loaded])
        todo = []
        for e in loaded:
            c = e.conversation
            prior = seen.get((c.tenant_id, c.conversation_id))
            event_id = self._event_id(e, qset_version)
            if prior is not None and event_id in prior.event_ids:
                self.metrics.backfill.labels("answered_already").inc()
            elif prior is not None and c.revision < prior.max_revision:
                self.metrics.backfill.labels("stale").inc()
            else:
                todo.append(e)
        return todo

    def _event_id(self, e: EmbeddedConversation, qset_version: str) -> str:
        c = e.conversation
        return classification_event_id(c.tenant_id, c.conversation_id, c.revision, qset_version, self.models)

    async def _events(
        self, todo: list[EmbeddedConversation], qset: QuestionSet, record: ConsumerRecord, started: float  # type: ignore[type-arg]
    ) -> list[dict[str, Any]]:
        if not todo:
            return []
        earlier = await self.results.answers_at(
            [(e.conversation.tenant_id, e.conversation.conversation_id, e.conversation.revision) for e in todo],
            self.models,
        )
        wanted: list[list[Question]] = []
        for e in todo:
            c = e.conversation
            have = earlier.get((c.tenant_id, c.conversation_id), {})
            applicable = asked(qset, e)
            wanted.append([q for q in applicable if (q.id, q.version) not in have])
        missing = {q.id: q for qs in wanted for q in qs}
        computed: list[list[dict[str, Any]]] = [[] for _ in todo]
        if missing:
            subset = QuestionSet(questions=[q for q in qset.questions if q.id in missing])
            # The stored vectors are in memory already: rank them there (pgvector's order), which
            # keeps a backfill's retrieval off the database that live traffic uses.
            answers = (await self.pipeline.answer(todo, subset, evidence_in_memory=True)).answers
            computed = [[a.as_dict() for a in row] for row in answers]
        events = []
        latency_ms = int((time.monotonic() - started) * 1000)
        source = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        for e, fresh in zip(todo, computed, strict=True):
            c = e.conversation
            by_question = {**earlier.get((c.tenant_id, c.conversation_id), {}),
                           **{(a["question_id"], a["question_version"]): a for a in fresh}}
            ev = build_classification(c, [], event_id=self._event_id(e, qset.version), models=self.models,
                                      source=source, latency_ms=latency_ms)
            ev["answers"] = [by_question[(q.id, q.version)] for q in asked(qset, e)]
            events.append(ev)
        return events

    async def _still_current(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drop events whose conversation got a newer stored revision while they were answered:
        the live path answers that one."""
        if not events:
            return []
        stored = await self.stored.current([(ev["tenant_id"], ev["conversation_id"]) for ev in events])
        current = [ev for ev in events if stored.get((ev["tenant_id"], ev["conversation_id"])) == ev["revision"]]
        self.metrics.backfill.labels("stale").inc(len(events) - len(current))
        return current


def asked(qset: QuestionSet, e: EmbeddedConversation) -> list[Question]:
    """The questions the live path answers for this stored revision, in question order: those that
    apply to it, and for an open revision only the real-time ones."""
    c = e.conversation
    return [q for q in qset.questions if q.applies(c.metadata) and q.asked_at(c.status) and e.chunks]
