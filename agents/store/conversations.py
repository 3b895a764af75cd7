"""The `conversations` table: each conversation's latest stored revision (turns, metadata, status),
written in the same transaction as its chunks, and read back as `EmbeddedConversation`s whose
vectors are the stored chunk embeddings, so nothing is embedded again.

A stored conversation is re-chunked with today's chunker (cheap, deterministic) and each chunk's
vector is taken from the stored chunk with the same sequence number. If the chunker changed since
the chunks were stored, the texts differ and the conversation is refused rather than paired with
the wrong vectors. `flexor reembed` (`agents/reembed.py`) rewrites such chunks from the stored turns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg
import numpy as np
import orjson

from agents.chunking import Chunk, Turn, chunk_turns
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


# One page of `scan` and `scan_chunks` (conversations aliased `c`): a tenant's or everyone's, after
# a key, in key order. Arguments: `_page_args`.
_PAGE_SQL = """
WHERE ($1::text IS NULL OR c.tenant_id = $1)
  AND ($2::text IS NULL OR (c.tenant_id, c.conversation_id) > ($2, $3))
ORDER BY c.tenant_id, c.conversation_id
LIMIT $4
"""


def _page_args(tenant_id: str | None, after: Key | None, limit: int) -> tuple[str | None, str | None, str | None, int]:
    return tenant_id, after[0] if after else None, after[1] if after else None, limit


class StoreMismatch(ValueError):
    """Stored chunks that cannot serve this process: another embedder, or another chunker."""


class Mismatch(StrEnum):
    """Why a conversation's stored chunks cannot serve this process."""

    EMBEDDER = "embedder"  # embedded by another embedder than the configured one
    CHUNKER = "chunker"  # their texts are not what today's chunker makes of the stored turns


def mismatch(
    stored_embedders: Iterable[str], stored_texts: Sequence[str], chunks: Sequence[Chunk], embedder_id: str
) -> Mismatch | None:
    """The test `load` makes before it pairs stored vectors with today's chunks (and `flexor
    reembed` makes to find what to rewrite): `stored_embedders` are the conversation row's and its
    chunks' embedder ids, `stored_texts` its chunk texts in sequence order, `chunks` today's
    chunker's chunks of its stored turns."""
    if any(e != embedder_id for e in stored_embedders):
        return Mismatch.EMBEDDER
    if [c.text for c in chunks] != list(stored_texts):
        return Mismatch.CHUNKER
    return None


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


@dataclass(frozen=True, slots=True)
class StoredChunks:
    """A stored conversation with what `mismatch` needs of its chunks (not their vectors)."""

    conversation: Conversation
    stored_at: datetime  # changes with every write of the row: a rewrite checks it is still the one read
    embedders: tuple[str, ...]  # the row's embedder id, then its chunks' distinct ids
    texts: tuple[str, ...]  # chunk texts in sequence order

    @property
    def key(self) -> Key:
        return self.conversation.tenant_id, self.conversation.conversation_id

    def mismatch(self, embedder_id: str) -> Mismatch | None:
        return mismatch(self.embedders, self.texts, chunk_turns(self.conversation.turns), embedder_id)


async def lock_stored(conn: asyncpg.Connection, keys: Sequence[Key]) -> dict[Key, tuple[int, datetime]]:
    """Lock the stored rows of `keys` until the transaction ends and return each one's (revision,
    stored_at). Locked in key order, so two callers with overlapping keys wait rather than deadlock."""
    rows = await conn.fetch(
        """
        SELECT c.tenant_id, c.conversation_id, c.revision, c.stored_at FROM conversations c
        JOIN unnest($1::text[], $2::text[]) AS k(t, i) ON c.tenant_id = k.t AND c.conversation_id = k.i
        ORDER BY c.tenant_id, c.conversation_id
        FOR UPDATE OF c
        """,
        [k[0] for k in keys], [k[1] for k in keys],
    )
    return {(r["tenant_id"], r["conversation_id"]): (r["revision"], r["stored_at"]) for r in rows}


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
        rows = await self._pool.fetch("SELECT c.* FROM conversations c" + _PAGE_SQL,
                                      *_page_args(tenant_id, after, limit))
        return [_conversation(r) for r in rows]

    async def count(self, *, tenant_id: str | None = None) -> int:
        return int(await self._pool.fetchval(
            "SELECT count(*) FROM conversations WHERE $1::text IS NULL OR tenant_id = $1", tenant_id
        ))

    async def scan_chunks(
        self, *, tenant_id: str | None = None, after: Key | None = None, limit: int = 1000
    ) -> list[StoredChunks]:
        """Like `scan`, with each conversation's stored chunk texts and embedder ids (of its stored
        revision), so `mismatch` can be tested without reading vectors."""
        rows = await self._pool.fetch(
            """
            SELECT c.*, ch.texts, ch.embedders FROM conversations c
            CROSS JOIN LATERAL (
                SELECT coalesce(array_agg(x.text ORDER BY x.seq), '{}') AS texts,
                       coalesce(array_agg(DISTINCT x.embedder), '{}') AS embedders
                FROM chunks x
                WHERE x.tenant_id = c.tenant_id AND x.conversation_id = c.conversation_id AND x.revision = c.revision
            ) ch
            """ + _PAGE_SQL,
            *_page_args(tenant_id, after, limit),
        )
        return [
            StoredChunks(_conversation(r), r["stored_at"], (r["embedder"], *r["embedders"]), tuple(r["texts"]))
            for r in rows
        ]

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
    conv = _conversation(row)
    chunks = chunk_turns(conv.turns)
    why = mismatch([row["embedder"], *(c["embedder"] for c in chunk_rows)], [r["text"] for r in chunk_rows], chunks,
                   embedder_id)
    if why is Mismatch.EMBEDDER:
        raise StoreMismatch(
            f"stored chunks of {name} were embedded with {row['embedder']}, not {embedder_id}: "
            "run `flexor reembed` to re-embed them with the configured embedder, or use that embedder"
        )
    if why is Mismatch.CHUNKER:
        raise StoreMismatch(f"stored chunks of {name} do not match today's chunker: run `flexor reembed` to "
                            "re-chunk them")
    vectors = (
        np.stack([r["embedding"].to_numpy() for r in chunk_rows]).astype(np.float32, copy=False)
        if chunk_rows else np.zeros((0, 0), np.float32)
    )
    return EmbeddedConversation(conv, chunks, vectors)
