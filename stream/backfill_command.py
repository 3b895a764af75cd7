"""`flexor backfill`: answer stored conversations for new or changed questions.

The command plans and watches; the service's replicas do the work (stream/backfill.py). It scans
the stored conversations (optionally one tenant's, or those that occurred since a date), keeps
those that a selected question applies to and whose stored revision has no answer to that
question's current version, and enqueues them on `topics.backfill` in work items of
`backfill.item_size` conversations. It then follows the job's progress until every item is done
(`--no-wait` returns at once; `--job ID` follows a job again).

Running the same command again resumes: conversations answered meanwhile are no longer selected,
and an item enqueued twice is answered once (the second time its events exist already).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from aiokafka.errors import KafkaError

from agents.questions import Question, QuestionSet, load_questions
from agents.store import open_database
from agents.store.backfill import BackfillJobs, JobProgress, scan_unanswered
from agents.store.conversations import Key
from stream.backfill import encode_item
from stream.config import ConfigError, Settings, load_settings, redact_url
from stream.kafka import ensure_topics, make_producer

SCAN_PAGE = 1000
STALL_HINT_S = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config file (environment variables override it)")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (overrides config)")
    p.add_argument("--question", dest="questions", action="append", metavar="ID",
                   help="answer this question (repeatable; default: every question in the questions file)")
    p.add_argument("--tenant", help="only this tenant's conversations")
    p.add_argument("--since", type=_date, metavar="DATE",
                   help="only conversations that occurred at or after DATE (ISO 8601, UTC unless given)")
    p.add_argument("--no-wait", action="store_true", help="enqueue the work and return without following it")
    p.add_argument("--job", metavar="ID", help="follow the progress of an earlier job instead of starting one")


def _date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date such as 2026-11-01") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, **{"kafka.bootstrap_servers": args.bootstrap_servers})
    qset: QuestionSet | None = None
    selected: list[Question] = []
    if args.job is None:
        qset = load_questions(settings.questions_file)
        known = qset.by_id()
        unknown = [q for q in args.questions or [] if q not in known]
        if unknown:
            raise ConfigError(f"unknown question {unknown[0]!r} in {settings.questions_file}; "
                              f"known: {', '.join(sorted(known))}")
        selected = [known[q] for q in dict.fromkeys(args.questions)] if args.questions else list(qset.questions)
    try:
        return asyncio.run(_run(args, settings, qset, selected))
    except (OSError, asyncpg.PostgresError) as e:
        raise ConfigError(f"database {redact_url(settings.database_url.get_secret_value())}: {e}") from None
    except KafkaError as e:
        raise ConfigError(f"Kafka at {settings.kafka.bootstrap_servers}: {e}") from None


async def _run(
    args: argparse.Namespace, settings: Settings, qset: QuestionSet | None, selected: list[Question]
) -> int:
    dsn = settings.database_url.get_secret_value()
    pool = await open_database(dsn, where=redact_url(dsn), max_size=2)
    try:
        jobs = BackfillJobs(pool)
        if args.job is not None:
            job_id = args.job
            if await jobs.progress(job_id) is None:
                raise ConfigError(f"no backfill job {job_id!r} in this database")
        else:
            assert qset is not None
            job_id = await enqueue(settings, pool, qset.version, selected, tenant_id=args.tenant, since=args.since)
            if args.no_wait:
                print(f"follow it with: flexor backfill --job {job_id}")
                return 0
        final = await follow(jobs, job_id, settings.topics.backfill)
        print(f"backfill {job_id} done: {final.conversations_done} conversations, {final.published} events "
              f"published, {final.skipped} skipped (answered already, newer revision, or not usable)")
        if final.failed_items:
            print(f"backfill {job_id}: {final.failed_items} work items raised twice and went to the DLQ "
                  "(flexor dlq summary; flexor dlq replay --reason processing_error once the cause is fixed)",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        await pool.close()


async def enqueue(
    settings: Settings,
    pool: asyncpg.Pool,
    qset_version: str,
    questions: list[Question],
    *,
    tenant_id: str | None = None,
    since: datetime | None = None,
    job_id: str | None = None,
) -> str:
    """Create a job that answers `questions` (of the question set `qset_version`) and enqueue its
    work items; returns the job id."""
    job_id = job_id or uuid.uuid4().hex[:12]
    jobs = BackfillJobs(pool)
    await jobs.create(job_id, qset_version, [f"{q.id}@{q.version}" for q in questions], tenant_id, since)
    await ensure_topics(settings.kafka, settings.topics)
    size = settings.backfill.item_size
    producer = make_producer(settings.kafka)
    await producer.start()
    items = conversations = 0
    try:
        pending: list[Key] = []
        after: Key | None = None
        scanning = True
        while scanning:
            page, after = await scan_unanswered(pool, questions, tenant_id=tenant_id, since=since, after=after,
                                                limit=SCAN_PAGE)
            scanning = after is not None
            pending.extend(page)
            sends, in_batch = [], 0
            while len(pending) >= size or (pending and not scanning):
                keys, pending = pending[:size], pending[size:]
                item = items + len(sends)
                sends.append(await producer.send(
                    settings.topics.backfill, encode_item(job_id, item, qset_version, keys),
                    key=f"{job_id}:{item}".encode(),
                ))
                in_batch += len(keys)
            if sends:
                await asyncio.gather(*sends)
                await jobs.add_items(job_id, len(sends), in_batch)
                items, conversations = items + len(sends), conversations + in_batch
        await jobs.finish_enqueue(job_id)
    finally:
        await producer.stop()
    print(f"backfill {job_id}: {conversations} conversations in {items} work items on {settings.topics.backfill} "
          f"(questions: {', '.join(q.id for q in questions)})")
    return job_id


async def follow(jobs: BackfillJobs, job_id: str, topic: str, poll_s: float = 1.0) -> JobProgress:
    """Print progress until every item of the job is done."""
    tty = sys.stdout.isatty()
    started = last_change = time.monotonic()
    last: tuple[int, int] | None = None
    hinted = False
    while True:
        p = await jobs.progress(job_id)
        assert p is not None
        now = time.monotonic()
        if (p.items_done, p.items) != last:
            last, last_change = (p.items_done, p.items), now
            rate = p.conversations_done / max(now - started, 1e-9)
            line = (f"backfill {job_id}: {p.conversations_done}/{p.conversations} conversations, "
                    f"{p.items_done}/{p.items} items, {rate:.0f} conv/s")
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        if p.done:
            if tty:
                print()
            return p
        if not hinted and now - last_change > STALL_HINT_S:
            hinted = True
            print(f"\nno progress for {STALL_HINT_S:.0f} s: is `flexor serve` running with topics.backfill = "
                  f"{topic} and this database?", file=sys.stderr)
        await asyncio.sleep(poll_s)
