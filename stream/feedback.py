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
from collections.abc import Sequence

import asyncpg
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from agents.store.labels import HUMAN, Label, LabelsTable
from stream.config import Settings
from stream.dlq import DeadLetters, Invalid
from stream.intake import BACKOFF_MAX_S, BACKOFF_START_S, Fetched
from stream.kafka import make_consumer, make_producer
from stream.metrics import Metrics
from stream.schemas import InvalidEvent, decode_feedback

log = logging.getLogger(__name__)

RETRIABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
             asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError, asyncpg.OperatorInterventionError,
             KafkaError)


def feedback_group(settings: Settings) -> str:
    return f"{settings.group_id}.feedback"


def decode_batch(records: Sequence[ConsumerRecord], settings: Settings) -> tuple[list[Label], Invalid]:  # type: ignore[type-arg]
    labels: list[Label] = []
    invalid: Invalid = []
    now = time.monotonic()
    for r in records:
        try:
            fb = decode_feedback(r.value, settings.limits)
        except InvalidEvent as e:
            invalid.append((Fetched(r, now), e))
            continue
        labels.append(Label(fb.tenant_id, fb.conversation_id, fb.revision, fb.question_id, fb.question_version,
                            fb.answer, HUMAN, fb.reviewer))
    return labels, invalid


class FeedbackConsumer:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self.settings = settings
        self.labels = LabelsTable(pool)
        self.metrics = metrics
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
        labels, invalid = decode_batch(records, self.settings)
        backoff = BACKOFF_START_S
        while True:
            try:
                if invalid:
                    await dead_letters.send_all([(f, e) for f, e in invalid if not f.dlq_sent])
                if labels:
                    await self.labels.upsert(labels)
                break
            except RETRIABLE as e:
                if self._stopping.is_set():
                    return False
                log.warning("feedback batch failed (%s: %s); retrying in %.1f s", type(e).__name__, e, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        self.metrics.feedback.labels("stored").inc(len(labels))
        self.metrics.feedback.labels("dlq").inc(len(invalid))
        return True

    async def _commit(self, consumer, offsets: dict[TopicPartition, int]) -> None:  # type: ignore[no-untyped-def]
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as e:
            # A rebalance took the partitions: their new owner gets the batch again, and storing
            # the same labels twice changes nothing.
            log.warning("feedback commit failed (%s): the batch will be redelivered", e)
