"""Stored conversations on a real Postgres: what the service writes beside the chunks comes back as
the same conversation with the same chunks and vectors, and mismatches are refused."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import asyncpg
import numpy as np
import pytest

from agents.chunking import Turn
from agents.pipeline import embed_conversations
from agents.store.chunks import PgEvidenceStore
from agents.store.conversations import ConversationsTable, StoreMismatch
from agents.types import Conversation
from models.embedder import load_embedder

EMBEDDER = load_embedder("onnx-int8")


def conversation(cid: str, revision: int, n_turns: int, tenant: str = "acme", day: int = 1) -> Conversation:
    turns = tuple(
        Turn(f"t{i}", "customer" if i % 2 == 0 else "agent", f"turn {i} of {cid}: my card was charged twice")
        for i in range(n_turns)
    )
    return Conversation(tenant, cid, revision, turns, {"channel": "chat", "n": n_turns},
                        status="open" if revision < 3 else "closed", occurred_at=datetime(2026, 11, day, tzinfo=UTC))


async def store(pool: asyncpg.Pool, convs: list[Conversation], embedder_id: str = EMBEDDER.model_id) -> None:
    await PgEvidenceStore(pool).upsert(embed_conversations(EMBEDDER, convs), embedder_id)


async def test_stored_conversations_come_back_with_their_chunks_and_vectors(pool: asyncpg.Pool) -> None:
    convs = [conversation("c1", 3, 7), conversation("c2", 1, 2, day=5)]
    expected = embed_conversations(EMBEDDER, convs)
    await store(pool, convs)
    table = ConversationsTable(pool)
    got = await table.load([("acme", "c2"), ("acme", "missing"), ("acme", "c1")], EMBEDDER.model_id)
    assert [g.conversation.conversation_id for g in got] == ["c2", "c1"]
    for g, e in zip(got, [expected[1], expected[0]], strict=True):
        assert g.conversation == e.conversation  # turns, metadata, status and occurred_at
        assert g.chunks == e.chunks
        np.testing.assert_array_equal(g.vectors, e.vectors)  # float4 in pgvector: exact


async def test_an_older_revision_does_not_replace_a_newer_one(pool: asyncpg.Pool) -> None:
    await store(pool, [conversation("c1", 3, 7)])
    await store(pool, [conversation("c1", 2, 4)])  # arrives late
    (got,) = await ConversationsTable(pool).load([("acme", "c1")], EMBEDDER.model_id)
    assert (got.conversation.revision, len(got.conversation.turns)) == (3, 7)
    assert len(got.chunks) == len(got.vectors) == 7  # one per turn of the newer revision's chunks, not the late ones
    await store(pool, [conversation("c1", 4, 8)])
    (got,) = await ConversationsTable(pool).load([("acme", "c1")], EMBEDDER.model_id)
    assert (got.conversation.revision, len(got.conversation.turns)) == (4, 8)


async def test_one_batch_with_two_revisions_of_a_conversation_keeps_the_newest(pool: asyncpg.Pool) -> None:
    await store(pool, [conversation("c1", 3, 7), conversation("c1", 2, 4), conversation("c1", 3, 7)])
    (got,) = await ConversationsTable(pool).load([("acme", "c1")], EMBEDDER.model_id)
    assert (got.conversation.revision, len(got.conversation.turns)) == (3, 7)


async def test_chunks_of_another_embedder_are_refused(pool: asyncpg.Pool) -> None:
    await store(pool, [conversation("c1", 1, 4)], embedder_id="other-embedder")
    with pytest.raises(StoreMismatch, match=r"embedded with other-embedder, not all-MiniLM"):
        await ConversationsTable(pool).load([("acme", "c1")], EMBEDDER.model_id)


async def test_chunks_that_no_longer_match_the_chunker_are_refused(pool: asyncpg.Pool) -> None:
    await store(pool, [conversation("c1", 1, 4)])
    await pool.execute("UPDATE chunks SET text = text || ' (edited)' WHERE seq = 1")
    with pytest.raises(StoreMismatch, match="today's chunker"):
        await ConversationsTable(pool).load([("acme", "c1")], EMBEDDER.model_id)


async def test_keys_page_in_order_with_filters(pool: asyncpg.Pool) -> None:
    convs = [conversation(f"c{i}", 1, 2, tenant="acme" if i % 2 else "beta", day=1 + i) for i in range(7)]
    await store(pool, convs)
    table = ConversationsTable(pool)
    pages, after = [], None
    while page := await table.keys(limit=3, after=after):
        pages.append(page)
        after = (page[-1].tenant_id, page[-1].conversation_id)
    assert [len(p) for p in pages] == [3, 3, 1]
    flat = [(k.tenant_id, k.conversation_id) for p in pages for k in p]
    assert flat == sorted((c.tenant_id, c.conversation_id) for c in convs)
    assert {k.conversation_id for k in await table.keys(tenant_id="acme")} == {"c1", "c3", "c5"}
    since = datetime(2026, 11, 5, tzinfo=UTC)
    assert {k.conversation_id for k in await table.keys(since=since)} == {"c4", "c5", "c6"}
    assert dataclasses.asdict((await table.keys(tenant_id="beta", limit=1))[0]) == {
        "tenant_id": "beta", "conversation_id": "c0", "revision": 1}
