"""The `classifications` table: the idempotent sink (upsert by event_id) and the replay check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson


@dataclass(frozen=True, slots=True)
class Seen:
    max_revision: int
    event_ids: frozenset[str]


class ClassificationsTable:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def seen(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Seen]:
        """Highest classified revision and known event ids per (tenant_id, conversation_id)."""
        if not keys:
            return {}
        rows = await self._pool.fetch(
            """
            SELECT c.tenant_id, c.conversation_id, max(c.revision) AS max_revision,
                   array_agg(c.event_id) AS event_ids
            FROM classifications c
            JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, conversation_id)
              ON c.tenant_id = k.tenant_id AND c.conversation_id = k.conversation_id
            GROUP BY c.tenant_id, c.conversation_id
            """,
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        return {
            (r["tenant_id"], r["conversation_id"]): Seen(r["max_revision"], frozenset(r["event_ids"]))
            for r in rows
        }

    async def upsert(self, events: Sequence[tuple[dict[str, Any], str]]) -> None:
        """(classification event, question-set version) pairs; replays overwrite identical rows."""
        if not events:
            return
        await self._pool.executemany(
            """
            INSERT INTO classifications (event_id, tenant_id, conversation_id, revision, question_set,
                                         answers, event, source_topic, source_partition, source_offset)
            VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8, $9, $10)
            ON CONFLICT (event_id) DO UPDATE
            SET answers = EXCLUDED.answers, event = EXCLUDED.event, source_topic = EXCLUDED.source_topic,
                source_partition = EXCLUDED.source_partition, source_offset = EXCLUDED.source_offset
            """,
            [
                (
                    e["event_id"], e["tenant_id"], e["conversation_id"], e["revision"], qset,
                    orjson.dumps(e["answers"]).decode(), orjson.dumps(e).decode(),
                    e["source"]["topic"], e["source"]["partition"], e["source"]["offset"],
                )
                for e, qset in events
            ],
        )

    async def answers_at(
        self, revisions: Sequence[tuple[str, str, int]], models: dict[str, str]
    ) -> dict[tuple[str, str], dict[tuple[str, int], dict[str, Any]]]:
        """Published answers per (tenant_id, conversation_id) at exactly these revisions, by
        (question id, question version), from events made with these `models` (a backfill reuses
        them instead of answering again)."""
        if not revisions:
            return {}
        rows = await self._pool.fetch(
            """
            SELECT c.tenant_id, c.conversation_id, c.answers
            FROM classifications c
            JOIN unnest($1::text[], $2::text[], $3::int[]) AS k(tenant_id, conversation_id, revision)
              ON c.tenant_id = k.tenant_id AND c.conversation_id = k.conversation_id AND c.revision = k.revision
            WHERE c.event -> 'models' = $4::jsonb
            ORDER BY c.created_at
            """,
            [r[0] for r in revisions], [r[1] for r in revisions], [r[2] for r in revisions],
            orjson.dumps(models).decode(),
        )
        out: dict[tuple[str, str], dict[tuple[str, int], dict[str, Any]]] = {}
        for r in rows:
            by_question = out.setdefault((r["tenant_id"], r["conversation_id"]), {})
            for a in orjson.loads(r["answers"]):
                by_question[(a["question_id"], a["question_version"])] = a
        return out
