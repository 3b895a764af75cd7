"""Helpers for integration tests: run the service in-process or as a subprocess, produce, read back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, TopicPartition

from stream.app import Running, run_service
from stream.config import Settings
from stream.kafka import connection_kwargs, ensure_topics, make_producer
from stream.produce import produce_events

REPO = Path(__file__).resolve().parent.parent


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


async def create_topics(settings: Settings) -> None:
    t = settings.topics
    await ensure_topics(settings.kafka, [t.input, t.output, t.dlq], t.partitions)


@asynccontextmanager
async def running_service(settings: Settings, join_timeout: float = 60) -> AsyncIterator[Running]:
    """The real service in this event loop; yields once it owns partitions."""
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_service(settings, on_running=started.set_result, install_signals=False, create_topics=True)
    )
    done, _ = await asyncio.wait({started, task}, timeout=join_timeout, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    running = started.result()

    async def assigned() -> bool:
        if task.done():
            task.result()
        c = running.service.consumer
        return c is not None and bool(c.assignment())

    await wait_until(assigned, join_timeout, "partition assignment")
    try:
        yield running
    finally:
        running.service.stop()
        await asyncio.wait_for(task, timeout=60)


async def produce(settings: Settings, events: list[Any], topic: str | None = None) -> None:
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        await produce_events(producer, topic or settings.topics.input, events)
    finally:
        await producer.stop()


async def read_topic(settings: Settings, topic: str) -> list[ConsumerRecord]:  # type: ignore[type-arg]
    """Every record of the topic, read up to the high-water mark of each partition."""
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **connection_kwargs(settings.kafka))
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[ConsumerRecord] = []  # type: ignore[type-arg]
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=300)
            n = sum(len(v) for v in batch.values())
            idle = idle + 1 if n == 0 else 0
            for msgs in batch.values():
                out.extend(msgs)
        return out
    finally:
        await consumer.stop()


async def committed(settings: Settings) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        group_id=settings.group_id, enable_auto_commit=False, **connection_kwargs(settings.kafka)
    )
    await consumer.start()
    try:
        out = {}
        for p in range(settings.topics.partitions):
            c = await consumer.committed(TopicPartition(settings.topics.input, p))
            out[p] = c if c is not None else 0
        return out
    finally:
        await consumer.stop()


async def classification_rows(settings: Settings) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        rows = await conn.fetch("SELECT event_id, event, source_partition, source_offset FROM classifications")
    finally:
        await conn.close()
    return [
        {"event_id": r["event_id"], "event": orjson.loads(r["event"]), "partition": r["source_partition"],
         "offset": r["source_offset"]}
        for r in rows
    ]


async def count_rows(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        return int(await conn.fetchval("SELECT count(*) FROM classifications"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def service_env(settings: Settings) -> dict[str, str]:
    """The settings as environment variables for a `flexor serve` subprocess."""
    env = dict(os.environ)
    env.update(
        {
            "FLEXOR_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "FLEXOR_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
            "FLEXOR_KAFKA__HEARTBEAT_INTERVAL_MS": str(settings.kafka.heartbeat_interval_ms),
            "DATABASE_URL": settings.database_url.get_secret_value(),
            "FLEXOR_TOPICS__INPUT": settings.topics.input,
            "FLEXOR_TOPICS__OUTPUT": settings.topics.output,
            "FLEXOR_TOPICS__DLQ": settings.topics.dlq,
            "FLEXOR_GROUP_ID": settings.group_id,
            "FLEXOR_QUESTIONS_FILE": str(settings.questions_file),
            "FLEXOR_METRICS_PORT": "0",
            "FLEXOR_BATCH__MAX_WAIT_MS": str(settings.batch.max_wait_ms),
            "FLEXOR_BATCH__MAX_EVENTS": str(settings.batch.max_events),
        }
    )
    return env


def start_serve(settings: Settings, log_path: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    flexor = Path(sys.executable).parent / "flexor"
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(flexor), "serve", "--create-topics"], env=service_env(settings), stdout=log,
            stderr=subprocess.STDOUT, cwd=REPO,
        )


def kill9(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
