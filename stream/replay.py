"""`flexor dlq summary` and `flexor dlq replay`: put dead letters back once their cause is fixed.

Replay re-produces each chosen dead letter's original key, bytes and headers (`stream.headers`
undoes what the DLQ added) to the input topic (dead feedback and backfill work items to their own
topics):

- at most once per DLQ offset: each record is claimed in the `dlq_replays` table before it is
  produced, so neither a second run nor another filter sends it again (a crash between the claim
  and the acknowledgement loses that batch's replay; the log names its offsets first);
- in its own consumer group (`<group_id>-dlq-replay`) on the DLQ topic, whose committed position
  is where the next run starts reading: it moves past records that were replayed or can never be
  (cut to `limits.max_event_bytes`), and stops at the first record a filter left out, so a later
  run with other filters still sees that one.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from agents.store import open_database
from agents.store.dlq_replays import DlqReplaysTable
from stream.config import ConfigError, Settings, redact_url
from stream.headers import original_headers
from stream.kafka import connection_kwargs, make_producer

log = logging.getLogger(__name__)

Record = ConsumerRecord  # type: ignore[type-arg]
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (`2026-11-20T10:00:00Z`; UTC when no zone is given) or an age (`90m`, `2h`, `1d`)."""
    m = _DURATION.match(text.strip())
    if m:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"--since {text!r} is neither an ISO 8601 time nor an age like 90m, 2h or 1d") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def header(record: Record, name: str) -> str | None:
    for k, v in record.headers or ():
        if k == name:
            return bytes(v).decode("utf-8", "replace")
    return None


def reason_of(record: Record) -> str:
    return header(record, "error.reason") or "unknown"


def time_of(record: Record) -> datetime:
    return datetime.fromtimestamp(record.timestamp / 1000, UTC)


async def read_to_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> AsyncIterator[list[Record]]:
    """Batches of records from the current positions up to each partition's fetch high-water mark
    (what the broker says in fetch responses; Tansu's ListOffsets answer is wrong)."""
    idle = 0
    while True:
        fetched = await consumer.getmany(*tps, timeout_ms=500, max_records=500)
        records = sorted((r for rs in fetched.values() for r in rs), key=lambda r: (r.partition, r.offset))
        if records:
            idle = 0
            yield records
        else:
            idle += 1
        at_end = True
        for tp in tps:
            hw = consumer.highwater(tp)
            at_end = at_end and hw is not None and await consumer.position(tp) >= hw
        if at_end or idle >= 4:
            return


async def _open(settings: Settings, group_id: str | None) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    consumer = AIOKafkaConsumer(
        group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed" if settings.kafka.exactly_once else "read_uncommitted",
        **connection_kwargs(settings.kafka),
    )
    try:
        await consumer.start()
    except KafkaError as e:
        await consumer.stop()
        raise ConfigError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers} ({e}): check "
                          "KAFKA_BOOTSTRAP_SERVERS and the kafka.* security settings") from None
    topic = settings.topics.dlq
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()  # a topic created since start(); no public way
        parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    for tp in tps:
        position = await consumer.committed(tp) if group_id else None
        if position is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, position)
    return consumer, tps


# -- summary ------------------------------------------------------------------------------------------


@dataclass
class ReasonSummary:
    count: int = 0
    oldest: datetime | None = None
    newest: datetime | None = None

    def add(self, t: datetime) -> None:
        self.count += 1
        self.oldest = t if self.oldest is None else min(self.oldest, t)
        self.newest = t if self.newest is None else max(self.newest, t)


async def summarize(settings: Settings) -> dict[str, ReasonSummary]:
    consumer, tps = await _open(settings, None)
    out: dict[str, ReasonSummary] = {}
    try:
        async for batch in read_to_end(consumer, tps):
            for r in batch:
                out.setdefault(reason_of(r), ReasonSummary()).add(time_of(r))
    finally:
        await consumer.stop()
    return dict(sorted(out.items()))


def format_summary(topic: str, by_reason: dict[str, ReasonSummary]) -> str:
    total = sum(s.count for s in by_reason.values())
    lines = [f"{topic}: {total} dead letter(s)"]
    if total:
        width = max(len("reason"), *(len(r) for r in by_reason))
        lines.append(f"{'reason':<{width}}  {'count':>7}  {'oldest':<20}  newest")
        for reason, s in by_reason.items():
            lines.append(f"{reason:<{width}}  {s.count:>7}  {_iso(s.oldest):<20}  {_iso(s.newest)}")
    return "\n".join(lines)


def _iso(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else "-"


# -- replay -------------------------------------------------------------------------------------------


@dataclass
class ReplayReport:
    dry_run: bool
    replayed: Counter[str] = field(default_factory=Counter)  # by reason (would be, with dry_run)
    already: int = 0  # chosen, but replayed before
    left_out: int = 0  # not chosen by --reason / --since
    truncated: int = 0  # chosen, but cut to the size limit: its original bytes are gone

    def line(self, input_topic: str) -> str:
        n = sum(self.replayed.values())
        by = ", ".join(f"{r}: {c}" for r, c in sorted(self.replayed.items()))
        verb = "would replay" if self.dry_run else "replayed"
        return (f"{verb} {n} dead letter(s) to {input_topic}" + (f" ({by})" if by else "")
                + f"; {self.already} replayed before, {self.left_out} left out by the filters, "
                f"{self.truncated} not replayable (truncated)")


async def replay(
    settings: Settings, *, reason: str | None = None, since: datetime | None = None, dry_run: bool = False,
    group_id: str | None = None,
) -> ReplayReport:
    group_id = group_id or f"{settings.group_id}-dlq-replay"
    dsn = settings.database_url.get_secret_value()
    pool = await open_database(dsn, where=redact_url(dsn), max_size=2)
    report = ReplayReport(dry_run)
    try:
        table = DlqReplaysTable(pool)
        consumer, tps = await _open(settings, group_id)
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            blocked: set[int] = set()  # partitions whose position stops at a record left out
            async for batch in read_to_end(consumer, tps):
                commit = await _replay_batch(batch, settings, table, producer, report, reason, since, blocked)
                if commit and not dry_run:
                    await consumer.commit(commit)
        finally:
            await producer.stop()
            await consumer.stop()
    finally:
        await pool.close()
    return report


async def _replay_batch(
    batch: list[Record], settings: Settings, table: DlqReplaysTable, producer: Any, report: ReplayReport,
    reason: str | None, since: datetime | None, blocked: set[int],
) -> dict[TopicPartition, int]:
    """Replay the chosen records of one batch; returns the positions the replay group may commit."""
    topic, target = settings.topics.dlq, settings.topics.input
    chosen: list[Record] = []
    commit: dict[TopicPartition, int] = {}
    for r in batch:
        if (reason is not None and reason_of(r) != reason) or (since is not None and time_of(r) < since):
            report.left_out += 1
            blocked.add(r.partition)
            continue
        if r.partition not in blocked:
            commit[TopicPartition(r.topic, r.partition)] = r.offset + 1
        if header(r, "error.truncated_from") is not None:
            report.truncated += 1
        else:
            chosen.append(r)
    # Bad feedback and failed backfill items share the DLQ topic: each goes back to the topic it
    # came from, the rest to the input.
    own = {settings.topics.feedback, settings.topics.backfill}
    by_target: dict[str, list[Record]] = {}
    for r in chosen:
        source = header(r, "source.topic")
        by_target.setdefault(source if source in own else target, []).append(r)
    for to, records in by_target.items():
        keys = [(r.partition, r.offset) for r in records]
        if report.dry_run:
            fresh = set(keys) - await table.replayed(topic, keys)
        else:
            fresh = await table.claim(topic, to, [(r.partition, r.offset, reason_of(r)) for r in records])
        report.already += len(keys) - len(fresh)
        send = [r for r in records if (r.partition, r.offset) in fresh]
        for r in send:
            report.replayed[reason_of(r)] += 1
        if send and not report.dry_run:
            log.info("replaying %s to %s", ", ".join(f"{topic}/{r.partition}@{r.offset}" for r in send), to)
            futures = [await producer.send(to, r.value, key=r.key, headers=original_headers(r.headers)) for r in send]
            await asyncio.gather(*futures)
    return commit
