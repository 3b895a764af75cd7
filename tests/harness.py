"""Helpers for integration tests: run the service in-process or as a subprocess, produce, read back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, TopicPartition

from stream.app import Running, run_service
from stream.config import Settings, settings_env
from stream.dev.produce import produce_events
from stream.kafka import connection_kwargs, ensure_topics, make_producer

REPO = Path(__file__).resolve().parent.parent


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


async def create_topics(settings: Settings) -> None:
    await ensure_topics(settings.kafka, settings.topics)


@asynccontextmanager
async def running_service(
    settings: Settings, join_timeout: float = 60, create_topics: bool = True
) -> AsyncIterator[Running]:
    """The real service in this event loop; yields once it owns partitions."""
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_service(settings, on_running=started.set_result, install_signals=False, create_topics=create_topics)
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


async def read_topic(  # type: ignore[type-arg]
    settings: Settings, topic: str, isolation_level: str = "read_uncommitted"
) -> list[ConsumerRecord]:
    """Every record of the topic, read up to the high-water mark of each partition."""
    consumer = AIOKafkaConsumer(
        enable_auto_commit=False, isolation_level=isolation_level,
        # librdkafka's mock cluster writes transactional batches whose CRC aiokafka rejects.
        check_crcs=False, **connection_kwargs(settings.kafka),
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
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
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    return {**env, **settings_env(settings)}


def start_serve(settings: Settings, log_path: Path, create_topics: bool = True) -> subprocess.Popen:  # type: ignore[type-arg]
    flexor = Path(sys.executable).parent / "flexor"
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(flexor), "serve", *(["--create-topics"] if create_topics else [])], env=service_env(settings),
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )


def kill9(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def revision_key(e: dict[str, Any]) -> tuple[str, str, int]:
    return (e["tenant_id"], e["conversation_id"], e["revision"])


async def check_delivery(
    settings: Settings,
    inputs: list[dict[str, Any]],
    *,
    previous: list[dict[str, Any]] | None = None,
    all_committed: bool = True,
    registry: Any = None,
    isolation_level: str = "read_uncommitted",
) -> list[dict[str, Any]]:
    """The delivery invariant. Every input revision has output events with exactly one distinct
    event_id, Postgres agrees with the topic, the committed offsets cover only finished work, and
    (`all_committed`) nothing is left in flight: every partition is committed to its end, and the
    service's in-flight gauge (when its `registry` is given) is 0. Returns one event per key.

    `previous`: inputs classified before the broker lost its (memory-only) topics; their rows may
    be in Postgres without events in the topic.
    """
    outputs = [
        orjson.loads(r.value)
        for r in await read_topic(settings, settings.topics.output, isolation_level=isolation_level)
    ]
    ids: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for ev in outputs:
        ids[revision_key(ev)].add(ev["event_id"])
    expected = {revision_key(e) for e in inputs}
    missing, unexpected = expected - set(ids), set(ids) - expected
    assert not missing and not unexpected, f"{len(missing)} revisions missing, {len(unexpected)} unexpected"
    assert all(len(v) == 1 for v in ids.values()), "a revision has two different event_ids"

    rows = {r["event_id"]: r for r in await classification_rows(settings)}
    by_id = {ev["event_id"]: ev for ev in outputs}
    earlier = {revision_key(e) for e in previous or []}
    topic_rows = {i: r for i, r in rows.items() if i in by_id or revision_key(r["event"]) not in earlier}
    assert set(topic_rows) == set(by_id), "Postgres rows and topic events differ"
    for event_id, row in topic_rows.items():
        assert row["event"]["answers"] == by_id[event_id]["answers"]
    row_ids: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for i, r in rows.items():
        row_ids[revision_key(r["event"])].add(i)
    assert all(len(row_ids[k]) == 1 for k in earlier), "an earlier revision lacks its row or has two"

    # Every input below a committed position is finished: DLQ'd, or classified at this revision or
    # a newer one (replays and stale revisions are acknowledged without output).
    dlq = {
        (int(dict(r.headers)["source.partition"]), int(dict(r.headers)["source.offset"]))
        for r in await read_topic(settings, settings.topics.dlq, isolation_level=isolation_level)
    }
    newest: dict[tuple[str, str], int] = {}
    for row in rows.values():
        k = revision_key(row["event"])
        newest[k[:2]] = max(newest.get(k[:2], -1), k[2])
    records = {(r.partition, r.offset): r for r in await read_topic(settings, settings.topics.input)}
    ends: dict[int, int] = defaultdict(int)
    for p, o in records:
        ends[p] = max(ends[p], o + 1)
    positions = await committed(settings)
    for partition, position in positions.items():
        for offset in range(position):
            if (partition, offset) in dlq:
                continue
            k = revision_key(orjson.loads(records[(partition, offset)].value))
            assert newest.get(k[:2], -1) >= k[2], f"committed past unfinished {partition}@{offset}"
    if all_committed:
        assert positions == {p: ends[p] for p in positions}, f"left in flight: committed {positions}, ends {ends}"
        if registry is not None:
            assert registry.get_sample_value("flexor_in_flight_events") == 0, "the service reports work in flight"
    return list(by_id.values())


def record_outcome(name: str, **data: Any) -> None:
    """A fault test's measured outcome: printed, and appended as a JSON line to $FAULTS_REPORT."""
    line = json.dumps({"fault": name, **data}, sort_keys=True)
    print(f"FAULT-OUTCOME {line}")
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def metric(registry: Any, name: str, labels: dict[str, str] | None = None) -> float:
    return float(registry.get_sample_value(name, labels or {}) or 0.0)
