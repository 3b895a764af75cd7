"""Feedback: reviewers' answers (feedback.v1 on `topics.feedback`) become `human` labels.

A consumer of its own (group `<group_id>.feedback`) runs beside the conversation flow, which it
does not touch. Per batch: decode every record; send the bad ones to the DLQ topic with their
reason, as bad conversations are; upsert the good ones into the labels table (source `human`,
given by the reviewer); only then commit the batch's offsets. Delivery is at least once and the
upsert is idempotent, so a redelivered batch changes nothing. A retriable error (Postgres or
Kafka unreachable) retries the batch with backoff; its offsets stay uncommitted meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from agents.store.labels import HUMAN, Label, LabelsTable
from stream.config import Settings
from stream.dlq import DeadLetters, Invalid
from stream.errors import ErrorKind, FatalError, classify, describe
from stream.intake import BACKOFF_MAX_S, BACKOFF_START_S, Fetched
from stream.kafka import make_consumer, make_producer
from stream.metrics import Metrics
from stream.poison import PoisonBudget, isolate
from stream.schemas import InvalidEvent, Reason, decode_feedback

log = logging.getLogger(__name__)

def feedback_group(settings: Settings) -> str:
    return f"{settings.group_id}.feedback"


def decode_batch(
    records: Sequence[ConsumerRecord], settings: Settings  # type: ignore[type-arg]
) -> tuple[list[tuple[Fetched, Label]], Invalid]:
    labels: list[tuple[Fetched, Label]] = []
    invalid: Invalid = []
    now = time.monotonic()
    for r in records:
        try:
            fb = decode_feedback(r.value, settings.limits)
        except InvalidEvent as e:
            invalid.append((Fetched(r, now), e))
            continue
        labels.append((Fetched(r, now), Label(fb.tenant_id, fb.conversation_id, fb.revision, fb.question_id,
                                              fb.question_version, fb.answer, HUMAN, fb.reviewer)))
    return labels, invalid


class FeedbackConsumer:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self.settings = settings
        self.labels = LabelsTable(pool)
        self.metrics = metrics
        self.poison = PoisonBudget(settings.batch.max_poison_ratio, settings.batch.poison_window)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        s = self.settings
        consumer = make_consumer(s.kafka, s.topics.feedback, feedback_group(s), s.batch.max_events)
        producer = make_producer(s.kafka)
        dead_letters = DeadLetters(producer, s, self.metrics)
        await producer.start()
        try:
            await consumer.start()
            try:
                backoff = BACKOFF_START_S
                while not self._stopping.is_set():
                    try:
                        fetched = await consumer.getmany(timeout_ms=500, max_records=s.batch.max_events)
                        backoff = BACKOFF_START_S
                    except KafkaError as e:
                        log.warning("feedback fetch failed (%s), retrying in %.1f s", e, backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, BACKOFF_MAX_S)
                        continue
                    if not fetched:
                        continue
                    records = [m for msgs in fetched.values() for m in msgs]
                    if not await self._handle_with_retry(records, dead_letters):
                        return  # stopping mid-retry: the batch stays uncommitted
                    await self._commit(consumer, {tp: msgs[-1].offset + 1 for tp, msgs in fetched.items()})
            finally:
                await consumer.stop()
        finally:
            await producer.stop()

    async def _handle_with_retry(self, records: list[ConsumerRecord], dead_letters: DeadLetters) -> bool:  # type: ignore[type-arg]
        """Store the batch's labels and dead-letter its bad records. Retriable errors back off and
        retry, fatal ones stop the service; a label whose storing raises goes to the DLQ as
        `processing_error` (`stream.poison`), under the same budget as the live path."""
        labels, invalid = decode_batch(records, self.settings)
        backoff = BACKOFF_START_S
        while True:
            try:
                if invalid:
                    await dead_letters.send_all([(f, e) for f, e in invalid if not f.dlq_sent])
                found = await isolate(len(labels), self._store(labels), self.poison)
                break
            except FatalError:
                raise
            except Exception as e:
                kind = classify(e)
                if kind is ErrorKind.FATAL:
                    raise FatalError(f"feedback: {describe(e)}") from e
                if kind is not ErrorKind.RETRIABLE:
                    raise
                if self._stopping.is_set():
                    return False
                log.warning("feedback batch failed (%s); retrying in %.1f s", describe(e), backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        self.poison.record(ok=len(labels) - len(found.errors), failed=len(found.errors))
        poisoned: Invalid = []
        for i, e in sorted(found.errors.items()):
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            poisoned.append((labels[i][0], InvalidEvent(Reason.PROCESSING_ERROR, msg, type(e).__name__)))
        if poisoned:
            await dead_letters.send_all(poisoned)
        self.metrics.feedback.labels("stored").inc(len(labels) - len(poisoned))
        self.metrics.feedback.labels("dlq").inc(len(invalid) + len(poisoned))
        return True

    def _store(self, labels: list[tuple[Fetched, Label]]) -> Callable[[Sequence[int]], Awaitable[list[None]]]:
        async def run(idx: Sequence[int]) -> list[None]:
            await self.labels.upsert([labels[i][1] for i in idx])
            return [None] * len(idx)

        return run

    async def _commit(self, consumer, offsets: dict[TopicPartition, int]) -> None:  # type: ignore[no-untyped-def]
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as e:
            # A rebalance took the partitions: their new owner gets the batch again, and storing
            # the same labels twice changes nothing.
            log.warning("feedback commit failed (%s): the batch will be redelivered", e)
