"""Read conversation files (conversation.v1 JSONL, or the labelled-data format) and produce them."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from stream.schemas import INPUT_SCHEMA


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None


def dataset_of(conversation_id: str) -> str:
    return conversation_id.split("-", 1)[0]


def to_conversation_v1(record: dict[str, Any], tenant_id: str = "eval") -> dict[str, Any]:
    """conversation.v1 as is; labelled-data records converted, dropping `labels` and `meta`
    (ground truth, which must never reach the classifier)."""
    if record.get("schema") == INPUT_SCHEMA:
        return record
    if "conversation_id" not in record or "turns" not in record:
        raise ValueError("record is neither conversation.v1 nor the labelled-data format")
    cid = record["conversation_id"]
    return {
        "schema": INPUT_SCHEMA,
        "event_id": f"{cid}:1",
        "tenant_id": tenant_id,
        "conversation_id": cid,
        "revision": 1,
        "status": "closed",
        "occurred_at": datetime.now(UTC).isoformat(),
        "metadata": {"dataset": dataset_of(cid)},
        "turns": [
            {"turn_id": f"t{i}", "speaker": t["speaker"], "text": t["text"]}
            for i, t in enumerate(record["turns"], 1)
        ],
    }


def load_conversations(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    out = []
    for rec in read_jsonl(path):
        out.append(to_conversation_v1(rec))
        if limit is not None and len(out) >= limit:
            break
    return out


async def produce_events(
    producer: AIOKafkaProducer,
    topic: str,
    events: list[dict[str, Any]] | list[bytes],
    rate: float | None = None,
    on_sent: Any = None,
) -> list[float]:
    """Produce in order (key = conversation_id) at `rate` events/s (None = as fast as possible).
    Returns each event's send time (monotonic), for latency measurements."""
    sent_at: list[float] = []
    start = time.monotonic()
    futures = []
    for i, ev in enumerate(events):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if isinstance(ev, bytes):
            value, key = ev, None
        else:
            value, key = orjson.dumps(ev), str(ev.get("conversation_id", "")).encode()
        sent_at.append(time.monotonic())
        futures.append(await producer.send(topic, value, key=key))
        if on_sent is not None:
            on_sent(i + 1)
    await asyncio.gather(*futures)
    return sent_at
