"""The `chunks` table: each conversation's latest revision, chunked and embedded (written with its
`conversations` row, `agents.store.conversations`), and exact top-k evidence retrieval within one
conversation (pgvector cosine distance, then chunk order)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np

from agents.evidence import EvidenceRequest, chunk_id, to_evidence
from agents.store.conversations import Key, lock_stored, upsert_conversations
from agents.types import EmbeddedConversation, Evidence

_TOP_K_SQL = """
WITH q AS (
    SELECT i, v::vector AS v FROM unnest($1::int[], $2::text[]) AS q(i, v)
), r AS (
    SELECT * FROM unnest($3::int[], $4::text[], $5::text[], $6::int[], $7::int[], $8::int[], $9::text[])
        AS r(req, tenant_id, conversation_id, revision, qi, k, speakers)
)
SELECT r.req, c.seq, 1 - (c.embedding <=> q.v) AS score
FROM r
JOIN q ON q.i = r.qi
CROSS JOIN LATERAL (
    SELECT c.seq, c.embedding FROM chunks c
    WHERE c.tenant_id = r.tenant_id AND c.conversation_id = r.conversation_id AND c.revision = r.revision
      AND (r.speakers = '' OR c.speakers && string_to_array(r.speakers, chr(31)))
    ORDER BY c.embedding <=> q.v, c.seq
    LIMIT r.k
) c
ORDER BY r.req, score DESC, c.seq
"""

_DELETE_OLD_SQL = """
DELETE FROM chunks c USING unnest($1::text[], $2::text[], $3::int[]) AS n(tenant_id, conversation_id, revision)
WHERE c.tenant_id = n.tenant_id AND c.conversation_id = n.conversation_id AND c.revision < n.revision
"""

_INSERT_SQL = """
INSERT INTO chunks (tenant_id, conversation_id, revision, seq, chunk_id, turn_ids, speakers,
                    char_start, char_end, text, embedder, embedding, open)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT (tenant_id, conversation_id, revision, seq) DO UPDATE
SET chunk_id = EXCLUDED.chunk_id, turn_ids = EXCLUDED.turn_ids, speakers = EXCLUDED.speakers,
    char_start = EXCLUDED.char_start, char_end = EXCLUDED.char_end, text = EXCLUDED.text,
    embedder = EXCLUDED.embedder, embedding = EXCLUDED.embedding, open = EXCLUDED.open
"""


# `rewrite` runs beside the live service and gives way to it: rather than wait long for a row the
# service holds (and risk Postgres aborting the service's transaction to break a deadlock), its
# transaction fails with LockNotAvailableError, for the caller to retry.
REWRITE_LOCK_TIMEOUT = "200ms"

# A rewrite of the same revision may make fewer chunks than it replaces (another chunker).
_DELETE_SURPLUS_SQL = """
DELETE FROM chunks c USING unnest($1::text[], $2::text[], $3::int[], $4::int[]) AS n(tenant_id, conversation_id,
                                                                                    revision, kept)
WHERE c.tenant_id = n.tenant_id AND c.conversation_id = n.conversation_id AND c.revision = n.revision
  AND c.seq >= n.kept
"""


def _vector_text(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in v.tolist()) + "]"


def _key(ec: EmbeddedConversation) -> Key:
    return ec.conversation.tenant_id, ec.conversation.conversation_id


def _chunk_rows(convs: Sequence[EmbeddedConversation], embedder_id: str) -> list[tuple[Any, ...]]:
    rows = []
    for ec in convs:
        c = ec.conversation
        for ch, vec in zip(ec.chunks, ec.vectors, strict=True):
            rows.append(
                (
                    c.tenant_id, c.conversation_id, c.revision, ch.seq,
                    chunk_id(c.conversation_id, c.revision, ch.seq),
                    list(ch.turn_ids), list(ch.speakers), ch.char_start, ch.char_end, ch.text,
                    embedder_id, vec, c.status == "open",
                )
            )
    return rows


async def _write(
    conn: asyncpg.Connection, convs: Sequence[EmbeddedConversation], rows: list[tuple[Any, ...]], embedder_id: str
) -> None:
    """Store the conversations and their chunk `rows` (`_chunk_rows`) and drop their older
    revisions' chunks; inside the caller's transaction."""
    await conn.execute(
        _DELETE_OLD_SQL,
        [ec.conversation.tenant_id for ec in convs],
        [ec.conversation.conversation_id for ec in convs],
        [ec.conversation.revision for ec in convs],
    )
    if rows:
        await conn.executemany(_INSERT_SQL, rows)
    await upsert_conversations(conn, [ec.conversation for ec in convs], embedder_id)


class PgEvidenceStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def upsert(self, convs: Sequence[EmbeddedConversation], embedder_id: str) -> None:
        rows = _chunk_rows(convs, embedder_id)
        async with self._pool.acquire() as conn, conn.transaction():
            # The conversation rows first, in key order, as `rewrite` takes them: a `flexor reembed`
            # batch holding one is waited for here, before the delete reads which chunks to drop,
            # so the chunks it wrote at the older revision are dropped too (and the two never
            # deadlock on each other's chunk rows).
            await lock_stored(conn, [_key(ec) for ec in convs])
            await _write(conn, convs, rows, embedder_id)

    async def rewrite(
        self, convs: Sequence[EmbeddedConversation], read: Mapping[Key, datetime], embedder_id: str
    ) -> list[Key]:
        """Replace the stored chunks of each conversation (the revision it carries) by its chunks, in
        one transaction, unless its stored row was written since it was read: `read` holds each
        key's `stored_at` as read. Returns the keys rewritten; the others hold a newer write."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{REWRITE_LOCK_TIMEOUT}'")
            now = await lock_stored(conn, [_key(ec) for ec in convs])
            kept = [ec for ec in convs if now.get(_key(ec)) == (ec.conversation.revision, read.get(_key(ec)))]
            if kept:
                await conn.execute(
                    _DELETE_SURPLUS_SQL,
                    [ec.conversation.tenant_id for ec in kept],
                    [ec.conversation.conversation_id for ec in kept],
                    [ec.conversation.revision for ec in kept],
                    [len(ec.chunks) for ec in kept],
                )
                await _write(conn, kept, _chunk_rows(kept, embedder_id), embedder_id)
        return [_key(ec) for ec in kept]

    async def prune(self, newest: Sequence[tuple[str, str, int]]) -> None:
        if newest:
            await self._pool.execute(_DELETE_OLD_SQL, *(list(col) for col in zip(*newest, strict=True)))

    async def top_k(
        self,
        convs: Sequence[EmbeddedConversation],
        queries: np.ndarray,
        requests: Sequence[EvidenceRequest],
    ) -> list[list[Evidence]]:
        if not requests:
            return []
        used = sorted({r.query for r in requests})
        conv = [convs[r.conv].conversation for r in requests]
        async with self._pool.acquire() as db:
            rows = await db.fetch(
                _TOP_K_SQL,
                used,
                [_vector_text(queries[i]) for i in used],
                list(range(len(requests))),
                [c.tenant_id for c in conv],
                [c.conversation_id for c in conv],
                [c.revision for c in conv],
                [r.query for r in requests],
                [r.k for r in requests],
                ["\x1f".join(r.speakers) for r in requests],
            )
        out: list[list[Evidence]] = [[] for _ in requests]
        for row in rows:
            r = requests[row["req"]]
            ec = convs[r.conv]
            # The rows are this batch's own chunks (just upserted), so the text and offsets come
            # from memory; the database decides only which chunks and their scores.
            out[row["req"]].append(to_evidence(ec, ec.chunks[row["seq"]], float(row["score"])))
        return out
