"""Decode and dead-letter: split a batch into valid conversations and invalid records, and send
the invalid ones to the DLQ topic with the original key, bytes and headers plus the reason."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

from agents.types import Conversation
from stream.config import Settings
from stream.headers import dead_letter_headers
from stream.intake import Fetched
from stream.metrics import Metrics
from stream.schemas import InvalidEvent, decode_conversation

log = logging.getLogger(__name__)

Valid = list[tuple[Fetched, Conversation]]
Invalid = list[tuple[Fetched, InvalidEvent]]


def decode_batch(batch: Sequence[Fetched], settings: Settings) -> tuple[Valid, Invalid]:
    valid: Valid = []
    invalid: Invalid = []
    for f in batch:
        try:
            valid.append((f, decode_conversation(f.record.value, settings.limits).to_conversation()))
        except InvalidEvent as e:
            invalid.append((f, e))
    return valid, invalid


class DeadLetters:
    def __init__(self, producer: AIOKafkaProducer, settings: Settings, metrics: Metrics) -> None:
        self.producer = producer
        self.topic = settings.topics.dlq
        self.group_id = settings.group_id
        self.max_bytes = settings.limits.max_event_bytes
        self.metrics = metrics

    async def send_all(self, items: Invalid, count: bool = True) -> None:
        """Send every record and await the acknowledgements; `count=False` leaves the metric to
        the caller (a transaction counts them once it commits)."""
        sends = [(f, e, await self._send(f, e)) for f, e in items]
        for f, e, fut in sends:
            await fut
            f.dlq_sent = True
            if count:
                self.metrics.dlq.labels(e.reason.value).inc()

    async def _send(self, f: Fetched, e: InvalidEvent) -> asyncio.Future[Any]:
        r = f.record
        log.info("DLQ %s/%d@%d: %s: %s", r.topic, r.partition, r.offset, e.reason.value, e.message[:200])
        value, truncated_from = r.value, None
        if value is not None and len(value) > self.max_bytes:
            # The DLQ topic may not take what the input topic did; keep the head of the original
            # and say so, rather than fail the partition on a record we can never deliver whole.
            value, truncated_from = value[: self.max_bytes], len(value)
        headers = dead_letter_headers(
            r.headers, topic=r.topic, partition=r.partition, offset=r.offset, group_id=self.group_id,
            reason=e.reason.value, message=e.message, truncated_from=truncated_from, error_type=e.error_type,
        )
        return await self.producer.send(self.topic, value, key=r.key, headers=headers)
