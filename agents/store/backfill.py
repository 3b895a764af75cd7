"""Backfill bookkeeping (migration 011): which stored conversations lack answers to a set of
questions, and the jobs and finished work items of `flexor backfill` (progress, resumability)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson

from agents.questions import Question
from agents.store.conversations import Key

# Each stored conversation (latest revision) with the "id@version" of every question that some
# classification of that revision answered. Only ids and versions leave the server, not the
# answers' evidence text.
_SCAN_SQL = """
SELECT c.tenant_id, c.conversation_id, c.metadata, c.status,
       ARRAY(SELECT DISTINCT (a->>'question_id') || '@' || (a->>'question_version')
             FROM classifications k CROSS JOIN LATERAL jsonb_array_elements(k.answers) AS a
             WHERE k.tenant_id = c.tenant_id AND k.conversation_id = c.conversation_id
               AND k.revision = c.revision) AS answered
FROM conversations c
WHERE ($1::text IS NULL OR c.tenant_id = $1)
  AND ($2::timestamptz IS NULL OR c.occurred_at >= $2)
  AND ($3::text IS NULL OR (c.tenant_id, c.conversation_id) > ($3, $4))
ORDER BY c.tenant_id, c.conversation_id
LIMIT $5
"""


async def scan_unanswered(
    pool: asyncpg.Pool,
    questions: Sequence[Question],
    *,
    tenant_id: str | None = None,
    since: datetime | None = None,
    after: Key | None = None,
    limit: int = 1000,
) -> tuple[list[Key], Key | None]:
    """One page of `limit` stored conversations in key order: those that one of `questions`
    applies to (and is asked at the revision's status: an open one answers only real-time
    questions) and whose stored revision has no answer to that question's current version, and
    the last key scanned (pass it as `after` for the next page; None once the scan is over)."""
    rows = await pool.fetch(
        _SCAN_SQL, tenant_id, since, after[0] if after else None, after[1] if after else None, limit
    )
    todo = []
    for r in rows:
        metadata, answered = orjson.loads(r["metadata"]), set(r["answered"])
        if any(q.applies(metadata) and q.asked_at(r["status"]) and f"{q.id}@{q.version}" not in answered
               for q in questions):
            todo.append((r["tenant_id"], r["conversation_id"]))
    last = (rows[-1]["tenant_id"], rows[-1]["conversation_id"]) if len(rows) == limit else None
    return todo, last


@dataclass(frozen=True, slots=True)
class JobProgress:
    job_id: str
    question_set: str
    questions: tuple[str, ...]
    items: int  # enqueued so far
    conversations: int
    enqueued: bool  # every item is enqueued
    items_done: int
    conversations_done: int
    published: int
    skipped: int
    failed_items: int  # dead-lettered (processing_error); counted in items_done

    @property
    def done(self) -> bool:
        return self.enqueued and self.items_done >= self.items


class BackfillJobs:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self, job_id: str, question_set: str, questions: Sequence[str], tenant_id: str | None, since: datetime | None
    ) -> None:
        await self._pool.execute(
            "INSERT INTO backfill_jobs (job_id, question_set, questions, tenant_id, since) VALUES ($1, $2, $3, $4, $5)",
            job_id, question_set, list(questions), tenant_id, since,
        )

    async def add_items(self, job_id: str, items: int, conversations: int) -> None:
        await self._pool.execute(
            "UPDATE backfill_jobs SET items = items + $2, conversations = conversations + $3 WHERE job_id = $1",
            job_id, items, conversations,
        )

    async def finish_enqueue(self, job_id: str) -> None:
        await self._pool.execute("UPDATE backfill_jobs SET enqueued_at = now() WHERE job_id = $1", job_id)

    async def item_done(self, job_id: str, item: int, conversations: int, published: int, skipped: int) -> None:
        """Record a finished item; a redelivered item overwrites its own row, so it counts once."""
        await self._pool.execute(
            """
            INSERT INTO backfill_items (job_id, item, conversations, published, skipped) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (job_id, item) DO UPDATE
            SET conversations = EXCLUDED.conversations, published = EXCLUDED.published,
                skipped = EXCLUDED.skipped, failed = false, done_at = now()
            """,
            job_id, item, conversations, published, skipped,
        )

    async def item_failed(self, job_id: str, item: int) -> None:
        """Record an item that went to the DLQ, so that the job can finish and say so; a replay of
        the item that succeeds overwrites the row (`item_done`)."""
        await self._pool.execute(
            """
            INSERT INTO backfill_items (job_id, item, conversations, published, skipped, failed)
            VALUES ($1, $2, 0, 0, 0, true)
            ON CONFLICT (job_id, item) DO NOTHING
            """,
            job_id, item,
        )

    async def progress(self, job_id: str) -> JobProgress | None:
        row = await self._pool.fetchrow(
            """
            SELECT j.*, coalesce(d.items, 0) AS items_done, coalesce(d.conversations, 0) AS conversations_done,
                   coalesce(d.published, 0) AS published, coalesce(d.skipped, 0) AS skipped,
                   coalesce(d.failed, 0) AS failed_items
            FROM backfill_jobs j
            LEFT JOIN LATERAL (
                SELECT count(*) AS items, sum(conversations) AS conversations, sum(published) AS published,
                       sum(skipped) AS skipped, count(*) FILTER (WHERE failed) AS failed
                FROM backfill_items i WHERE i.job_id = j.job_id
            ) d ON true
            WHERE j.job_id = $1
            """,
            job_id,
        )
        if row is None:
            return None
        return JobProgress(
            row["job_id"], row["question_set"], tuple(row["questions"]), row["items"], row["conversations"],
            row["enqueued_at"] is not None, row["items_done"], int(row["conversations_done"]),
            int(row["published"]), int(row["skipped"]), int(row["failed_items"]),
        )
