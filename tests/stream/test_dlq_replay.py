"""`flexor dlq summary` and `flexor dlq replay` (issue 15) on the real broker and Postgres: dead
letters go back to the input topic with their original key, bytes and headers, at most once per DLQ
offset whatever filters follow, the replay group resumes where it stopped, and once the cause is
fixed the service classifies what came back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka.structs import TopicPartition

from stream.cli import main
from stream.config import Settings
from stream.dev.produce import load_conversations
from stream.kafka import make_producer
from stream.replay import parse_since
from tests.conftest import EXAMPLES
from tests.harness import create_topics, metric, read_topic, running_service, wait_until


def write_config(settings: Settings, path: Path) -> Path:
    data: dict[str, Any] = settings.model_dump(mode="json", exclude={"questions_file", "models"})
    data["database_url"] = settings.database_url.get_secret_value()
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def restore_log_levels() -> Iterator[None]:
    """The CLI, run in-process, sets logger levels for its own run; later tests need them back."""
    loggers = [logging.getLogger(name) for name in ("", "aiokafka", "kafka")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


async def flexor(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(args))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


async def replay_position(settings: Settings) -> dict[int, int | None]:
    from aiokafka import AIOKafkaConsumer

    from stream.kafka import connection_kwargs

    consumer = AIOKafkaConsumer(group_id=f"{settings.group_id}-dlq-replay", enable_auto_commit=False,
                                **connection_kwargs(settings.kafka))
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(settings.topics.dlq, p))
                for p in range(settings.topics.partitions)}
    finally:
        await consumer.stop()


def test_since_accepts_times_and_ages() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_since("2h", now) == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert parse_since("2026-11-30T08:00:00", now) == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither an ISO 8601 time nor an age"):
        parse_since("yesterday", now)


async def test_summary_replay_once_and_resume(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strict = settings.model_copy(update={"limits": settings.limits.model_copy(update={"max_chars_per_turn": 10})})
    long_ones = load_conversations(EXAMPLES / "conversations.jsonl", 2)  # turns longer than 10 characters
    headers = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("content-type", b"x/y")]
    await create_topics(strict)
    async with running_service(strict) as running:
        producer = make_producer(strict.kafka)
        await producer.start()
        try:
            sent = [await producer.send(strict.topics.input, orjson.dumps(e), key=e["conversation_id"].encode(),
                                        headers=headers) for e in long_ones]
            sent.append(await producer.send(strict.topics.input, b"not json", key=b"k-bad", headers=headers))
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        reg = running.metrics.registry

        async def dead() -> bool:
            return metric(reg, "flexor_dlq_events_total", {"reason": "text_too_long"}) == 2 and metric(
                reg, "flexor_dlq_events_total", {"reason": "not_json"}) == 1

        await wait_until(dead, 60, "three dead letters")
    originals = {(r.key, r.value): r for r in await read_topic(strict, strict.topics.input)}
    config = ["--config", str(write_config(strict, tmp_path / "flexor.yaml"))]

    summary = await flexor(capsys, "dlq", "summary", *config)
    rows = {line.split()[0]: line.split() for line in summary.splitlines()[2:]}
    assert summary.startswith(f"{strict.topics.dlq}: 3 dead letter(s)")
    assert (rows["not_json"][1], rows["text_too_long"][1]) == ("1", "2")

    dry = await flexor(capsys, "dlq", "replay", "--reason", "text_too_long", "--dry-run", *config)
    assert dry.startswith("would replay 2 dead letter(s)")
    assert len(await read_topic(strict, strict.topics.input)) == 3, "a dry run sent something"

    once = await flexor(capsys, "dlq", "replay", "--reason", "text_too_long", *config)
    assert once.startswith("replayed 2 dead letter(s)") and "1 left out by the filters" in once
    first = {(r.partition, r.offset) for r in originals.values()}
    replayed = [r for r in await read_topic(strict, strict.topics.input) if (r.partition, r.offset) not in first]
    assert sorted(r.key for r in replayed) == sorted(e["conversation_id"].encode() for e in long_ones)
    for r in replayed:  # the same key and bytes (the lookup), and the original headers, nothing the DLQ added
        assert list(r.headers) == list(originals[(r.key, r.value)].headers) == headers

    # The replay group stopped at the not_json record the filter left out, and past the others.
    bad = next(r for r in await read_topic(strict, strict.topics.dlq) if r.key == b"k-bad")
    position = await replay_position(strict)
    assert (position[bad.partition] or 0) == bad.offset  # None: nothing committed, it starts at the beginning
    assert all(position[p] == r.offset + 1 for r in await read_topic(strict, strict.topics.dlq)
               if r.partition != bad.partition for p in [r.partition])

    again = await flexor(capsys, "dlq", "replay", *config)  # no filter: only what was never replayed
    assert again.startswith("replayed 1 dead letter(s)") and "(not_json: 1)" in again
    assert len(await read_topic(strict, strict.topics.input)) == 6
    assert (await flexor(capsys, "dlq", "replay", *config)).startswith("replayed 0 dead letter(s)")
    # Another group reads the whole DLQ again, and still sends nothing twice.
    fresh = await flexor(capsys, "dlq", "replay", "--group", f"{strict.group_id}-other", *config)
    assert fresh.startswith("replayed 0 dead letter(s)") and "3 replayed before" in fresh
    assert len(await read_topic(strict, strict.topics.input)) == 6
    dlq_ends = {r.partition: r.offset + 1 for r in await read_topic(strict, strict.topics.dlq)}
    assert {p: o for p, o in (await replay_position(strict)).items() if p in dlq_ends} == dlq_ends

    # The cause fixed (a realistic turn limit), the service classifies the replayed conversations.
    fixed = settings.model_copy(update={"topics": strict.topics, "group_id": strict.group_id})
    async with running_service(fixed, create_topics=False) as running:
        async def classified() -> bool:
            return metric(running.metrics.registry, "flexor_conversations_classified_total") == 2

        await wait_until(classified, 120, "the replayed conversations classified")
    outputs = [orjson.loads(r.value)["conversation_id"] for r in await read_topic(strict, strict.topics.output)]
    assert sorted(outputs) == sorted(e["conversation_id"] for e in long_ones)


def test_unreachable_broker_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["dlq", "summary", "--bootstrap-servers", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("flexor dlq: error: cannot reach Kafka at 127.0.0.1:1")
