"""The `conversations` table: each conversation's latest stored revision (turns, metadata, status),
written in the same transaction as its chunks, and read back as `EmbeddedConversation`s whose
vectors are the stored chunk embeddings, so nothing is embedded again.

A stored conversation is re-chunked with today's chunker (cheap, deterministic) and each chunk's
vector is taken from the stored chunk with the same sequence number. If the chunker changed since
the chunks were stored, the texts differ and the conversation is refused rather than paired with
the wrong vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import numpy as np
import orjson

from agents.chunking import Turn, chunk_turns
from agents.types import Conversation, EmbeddedConversation

Key = tuple[str, str]  # (tenant_id, conversation_id)

_UPSERT_SQL = """
INSERT INTO conversations AS c (tenant_id, conversation_id, revision, status, occurred_at, metadata, turns,
                                embedder)
SELECT t, i, r, s, o, m::jsonb, u::jsonb, $8
FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::timestamptz[], $6::text[], $7::text[])
    AS n(t, i, r, s, o, m, u)
ON CONFLICT (tenant_id, conversation_id) DO UPDATE
SET revision = EXCLUDED.revision, status = EXCLUDED.status, occurred_at = EXCLUDED.occurred_at,
    metadata = EXCLUDED.metadata, turns = EXCLUDED.turns, embedder = EXCLUDED.embedder, stored_at = now()
WHERE c.revision <= EXCLUDED.revision
"""


class StoreMismatch(ValueError):
    """Stored chunks that cannot serve this process: another embedder, or another chunker."""


async def upsert_conversations(conn: asyncpg.Connection, convs: Sequence[Conversation], embedder_id: str) -> None:
    """Store each conversation unless a newer revision of it is stored already (call inside the
    transaction that writes its chunks)."""
    newest: dict[Key, Conversation] = {}
    for c in convs:  # one row per key: ON CONFLICT cannot touch a row twice in one statement
        prior = newest.get((c.tenant_id, c.conversation_id))
        if prior is None or prior.revision <= c.revision:
            newest[(c.tenant_id, c.conversation_id)] = c
    convs = list(newest.values())
    if not convs:
        return
    await conn.execute(
        _UPSERT_SQL,
        [c.tenant_id for c in convs],
        [c.conversation_id for c in convs],
        [c.revision for c in convs],
        [c.status for c in convs],
        [c.occurred_at for c in convs],
        [orjson.dumps(c.metadata).decode() for c in convs],
        [orjson.dumps([(t.turn_id, t.speaker, t.text) for t in c.turns]).decode() for c in convs],
        embedder_id,
    )


@dataclass(frozen=True, slots=True)
class StoredKey:
    tenant_id: str
    conversation_id: str
    revision: int


class ConversationsTable:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def keys(
        self,
        *,
        tenant_id: str | None = None,
        since: datetime | None = None,
        after: Key | None = None,
        limit: int = 1000,
    ) -> list[StoredKey]:
        """Stored conversations in (tenant, conversation) order, a page at a time: pass the last
        key of a page as `after` to get the next one. `since` filters on occurred_at."""
        rows = await self._pool.fetch(
            """
            SELECT tenant_id, conversation_id, revision FROM conversations
            WHERE ($1::text IS NULL OR tenant_id = $1)
              AND ($2::timestamptz IS NULL OR occurred_at >= $2)
              AND ($3::text IS NULL OR (tenant_id, conversation_id) > ($3, $4))
            ORDER BY tenant_id, conversation_id
            LIMIT $5
            """,
            tenant_id, since, after[0] if after else None, after[1] if after else None, limit,
        )
        return [StoredKey(r["tenant_id"], r["conversation_id"], r["revision"]) for r in rows]

    async def revisions(
        self, conversation_ids: Sequence[str], *, tenant_id: str | None = None
    ) -> dict[str, list[tuple[str, int]]]:
        """Conversation id -> [(tenant id, stored revision)] for the ids that are stored (an id may
        be stored under several tenants)."""
        rows = await self._pool.fetch(
            """
            SELECT tenant_id, conversation_id, revision FROM conversations
            WHERE conversation_id = ANY($1::text[]) AND ($2::text IS NULL OR tenant_id = $2)
            ORDER BY conversation_id, tenant_id
            """,
            list(conversation_ids), tenant_id,
        )
        out: dict[str, list[tuple[str, int]]] = {}
        for r in rows:
            out.setdefault(r["conversation_id"], []).append((r["tenant_id"], r["revision"]))
        return out

    async def current(self, keys: Sequence[Key]) -> dict[Key, int]:
        """The revision stored now for each key that is stored."""
        rows = await self._pool.fetch(
            """
            SELECT c.tenant_id, c.conversation_id, c.revision FROM conversations c
            JOIN unnest($1::text[], $2::text[]) AS k(t, i) ON c.tenant_id = k.t AND c.conversation_id = k.i
            """,
            [k[0] for k in keys], [k[1] for k in keys],
        )
        return {(r["tenant_id"], r["conversation_id"]): r["revision"] for r in rows}

    async def scan(
        self, *, tenant_id: str | None = None, after: Key | None = None, limit: int = 1000
    ) -> list[Conversation]:
        """Stored conversations (turns, metadata, no chunks) in (tenant, conversation) order, a page
        at a time like `keys`."""
        rows = await self._pool.fetch(
            """
            SELECT * FROM conversations
            WHERE ($1::text IS NULL OR tenant_id = $1)
              AND ($2::text IS NULL OR (tenant_id, conversation_id) > ($2, $3))
            ORDER BY tenant_id, conversation_id
            LIMIT $4
            """,
            tenant_id, after[0] if after else None, after[1] if after else None, limit,
        )
        return [_conversation(r) for r in rows]

    async def load(self, keys: Sequence[Key], embedder_id: str) -> list[EmbeddedConversation]:
        """The stored conversations for `keys` (those that exist, in the order of `keys`), with
        their stored chunk vectors. Raises StoreMismatch when a conversation's chunks come from
        another embedder than `embedder_id`, or no longer match today's chunker."""
        if not keys:
            return []
        async with self._pool.acquire() as conn:
            convs = await conn.fetch(
                """
                SELECT c.* FROM conversations c
                JOIN unnest($1::text[], $2::text[]) AS k(t, i) ON c.tenant_id = k.t AND c.conversation_id = k.i
                """,
                [k[0] for k in keys], [k[1] for k in keys],
            )
            chunks = await conn.fetch(
                """
                SELECT ch.tenant_id, ch.conversation_id, ch.seq, ch.text, ch.embedder, ch.embedding
                FROM chunks ch
                JOIN conversations c USING (tenant_id, conversation_id, revision)
                JOIN unnest($1::text[], $2::text[]) AS k(t, i) ON c.tenant_id = k.t AND c.conversation_id = k.i
                ORDER BY ch.tenant_id, ch.conversation_id, ch.seq
                """,
                [k[0] for k in keys], [k[1] for k in keys],
            )
        stored: dict[Key, list[asyncpg.Record]] = {}
        for row in chunks:
            stored.setdefault((row["tenant_id"], row["conversation_id"]), []).append(row)
        by_key = {(r["tenant_id"], r["conversation_id"]): r for r in convs}
        out = []
        for key in keys:
            row = by_key.get(key)
            if row is not None:
                out.append(_rebuild(row, stored.get(key, []), embedder_id))
        return out


def _conversation(row: asyncpg.Record) -> Conversation:
    return Conversation(
        tenant_id=row["tenant_id"], conversation_id=row["conversation_id"], revision=row["revision"],
        turns=tuple(Turn(*t) for t in orjson.loads(row["turns"])), metadata=orjson.loads(row["metadata"]),
        status=row["status"], occurred_at=row["occurred_at"],
    )


def _rebuild(row: asyncpg.Record, chunk_rows: list[asyncpg.Record], embedder_id: str) -> EmbeddedConversation:
    name = f"{row['tenant_id']}/{row['conversation_id']}"
    if row["embedder"] != embedder_id or any(c["embedder"] != embedder_id for c in chunk_rows):
        raise StoreMismatch(
            f"stored chunks of {name} were embedded with {row['embedder']}, not {embedder_id}: "
            "re-embed them (replay the conversations) or use that embedder"
        )
    conv = _conversation(row)
    chunks = chunk_turns(conv.turns)
    if [c.text for c in chunks] != [r["text"] for r in chunk_rows]:
        raise StoreMismatch(f"stored chunks of {name} do not match today's chunker: replay the conversation")
    vectors = (
        np.stack([r["embedding"].to_numpy() for r in chunk_rows]).astype(np.float32, copy=False)
        if chunk_rows else np.zeros((0, 0), np.float32)
    )
    return EmbeddedConversation(conv, chunks, vectors)
