"""`agents.reembed` on a real Postgres: conversations stored with another chunker (3-turn windows,
or a chunk too many) or another embedder are refused by `ConversationsTable.load` until a reembed
run rewrites them with today's chunks and the configured embedder's vectors; a correct one is not
touched, a second run rewrites nothing, a revision the service stores meanwhile is not clobbered,
a row the service holds makes reembed give up and leave it to a rerun, and a dry run writes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import numpy as np
import pytest

from agents import reembed as reembed_module
from agents.chunking import Turn, chunk_turns
from agents.pipeline import embed_conversations
from agents.reembed import ReembedReport, StoreBusy, reembed
from agents.store import chunks as chunks_module
from agents.store.chunks import PgEvidenceStore
from agents.store.conversations import ConversationsTable, Key, Mismatch, StoreMismatch
from agents.types import Conversation, EmbeddedConversation
from models.embedder import load_embedder

EMBEDDER = load_embedder("onnx-int8")


def conversation(cid: str, n_turns: int, revision: int = 1, tenant: str = "acme") -> Conversation:
    turns = tuple(
        Turn(f"t{i}", "customer" if i % 2 == 0 else "agent", f"turn {i} of {cid}: the parcel {i} never arrived")
        for i in range(n_turns)
    )
    return Conversation(tenant, cid, revision, turns, {"channel": "chat"}, status="closed",
                        occurred_at=datetime(2026, 11, 1, tzinfo=UTC))


def windowed(conv: Conversation) -> EmbeddedConversation:
    """The conversation as the 3-turn-window chunker stored it."""
    chunks = chunk_turns(conv.turns, window=3, stride=1)
    return EmbeddedConversation(conv, chunks, EMBEDDER.embed([c.text for c in chunks]))


async def store(
    pool: asyncpg.Pool, convs: Sequence[EmbeddedConversation], embedder_id: str = EMBEDDER.model_id
) -> None:
    await PgEvidenceStore(pool).upsert(convs, embedder_id)


async def refused(pool: asyncpg.Pool, key: Key) -> str:
    with pytest.raises(StoreMismatch) as e:
        await ConversationsTable(pool).load([key], EMBEDDER.model_id)
    return str(e.value)


async def chunk_rows(pool: asyncpg.Pool, key: Key) -> list[tuple[object, ...]]:
    """Every stored chunk row of a conversation, with its physical identity (ctid, xmin)."""
    rows = await pool.fetch(
        "SELECT ctid::text, xmin::text, revision, seq, text, embedder FROM chunks "
        "WHERE tenant_id = $1 AND conversation_id = $2 ORDER BY revision, seq", *key)
    return [tuple(r) for r in rows]


async def conversation_row(pool: asyncpg.Pool, key: Key) -> tuple[object, ...]:
    row = await pool.fetchrow("SELECT xmin::text, revision, embedder, stored_at FROM conversations "
                              "WHERE tenant_id = $1 AND conversation_id = $2", *key)
    return tuple(row)


def assert_today(got: EmbeddedConversation, conv: Conversation) -> None:
    """Today's chunks of the conversation, with vectors the embedder gives their texts now."""
    expected = chunk_turns(conv.turns)
    assert got.conversation == conv
    assert got.chunks == expected
    np.testing.assert_array_equal(got.vectors, EMBEDDER.embed([c.text for c in expected]))


WINDOWS, OTHER_EMBEDDER, SURPLUS, CORRECT = (("acme", c) for c in ("windows", "other-embedder", "surplus", "correct"))


@pytest.fixture
async def mixed(pool: asyncpg.Pool) -> dict[Key, Conversation]:
    """One conversation of each kind: stored by the 3-turn-window chunker, by another embedder,
    with one chunk row more than today's chunker makes, and as today's service stores it."""
    convs = {key: conversation(key[1], n) for key, n in zip((WINDOWS, OTHER_EMBEDDER, SURPLUS, CORRECT), (6, 4, 3, 5),
                                                            strict=True)}
    await store(pool, [windowed(convs[WINDOWS])])
    await store(pool, embed_conversations(EMBEDDER, [convs[OTHER_EMBEDDER]]), embedder_id="minilm-retired")
    await store(pool, embed_conversations(EMBEDDER, [convs[SURPLUS], convs[CORRECT]]))
    await pool.execute(
        "INSERT INTO chunks SELECT tenant_id, conversation_id, revision, seq + 10, chunk_id || '+', turn_ids,"
        " speakers, char_start, char_end, text, embedder, embedding, open FROM chunks"
        " WHERE conversation_id = 'surplus' AND seq = 0"
    )
    return convs


async def test_refused_conversations_load_after_reembed_and_a_correct_one_is_untouched(
    pool: asyncpg.Pool, mixed: dict[Key, Conversation]
) -> None:
    assert "today's chunker" in await refused(pool, WINDOWS)
    assert "embedded with minilm-retired" in await refused(pool, OTHER_EMBEDDER)
    assert "today's chunker" in await refused(pool, SURPLUS)
    assert "flexor reembed" in await refused(pool, WINDOWS)
    correct_chunks, correct_row = await chunk_rows(pool, CORRECT), await conversation_row(pool, CORRECT)

    seen: list[int] = []
    report = await reembed(pool, EMBEDDER, batch=3, on_batch=lambda r: seen.append(r.scanned))
    assert (report.scanned, report.rewritten, report.skipped) == (4, 3, 0)
    assert report.mismatched == {Mismatch.CHUNKER: 2, Mismatch.EMBEDDER: 1}
    assert seen == [3, 4]  # pages of --batch conversations

    table = ConversationsTable(pool)
    for key in (WINDOWS, OTHER_EMBEDDER, SURPLUS, CORRECT):
        (got,) = await table.load([key], EMBEDDER.model_id)
        assert_today(got, mixed[key])
    assert len(await chunk_rows(pool, SURPLUS)) == len(chunk_turns(mixed[SURPLUS].turns))  # the extra row is gone
    _, revision, embedder_id, _ = await conversation_row(pool, OTHER_EMBEDDER)
    assert (revision, embedder_id) == (1, EMBEDDER.model_id)
    assert await chunk_rows(pool, CORRECT) == correct_chunks  # same row versions: never written
    assert await conversation_row(pool, CORRECT) == correct_row

    # A second run (or a rerun after a crash) finds nothing left to do.
    before = [await chunk_rows(pool, key) for key in mixed]
    again = await reembed(pool, EMBEDDER)
    assert (again.scanned, again.rewritten, again.skipped, sum(again.mismatched.values())) == (4, 0, 0, 0)
    assert [await chunk_rows(pool, key) for key in mixed] == before


async def test_a_tenant_is_reembedded_alone(pool: asyncpg.Pool) -> None:
    acme, beta = conversation("c1", 4, tenant="acme"), conversation("c1", 4, tenant="beta")
    await store(pool, [windowed(acme), windowed(beta)])
    report = await reembed(pool, EMBEDDER, tenant_id="beta")
    assert (report.scanned, report.rewritten) == (1, 1)
    (got,) = await ConversationsTable(pool).load([("beta", "c1")], EMBEDDER.model_id)
    assert_today(got, beta)
    await refused(pool, ("acme", "c1"))


class WritesMeanwhile:
    """The embedder, while the live service stores a newer revision of a conversation (in the
    gap between reembed's scan and its write)."""

    def __init__(self, pool: asyncpg.Pool, newer: Conversation, loop: asyncio.AbstractEventLoop) -> None:
        self.model_id, self.dim = EMBEDDER.model_id, EMBEDDER.dim
        self.pool, self.newer, self.loop = pool, newer, loop

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        service_write = store(self.pool, embed_conversations(EMBEDDER, [self.newer]))
        asyncio.run_coroutine_threadsafe(service_write, self.loop).result(timeout=30)  # we run in a worker thread
        return EMBEDDER.embed(texts)


async def test_a_revision_stored_meanwhile_is_not_clobbered(pool: asyncpg.Pool) -> None:
    old, other = conversation("c1", 6, revision=1), conversation("c2", 6, revision=1)
    await store(pool, [windowed(old), windowed(other)])
    newer = conversation("c1", 7, revision=2)
    embedder = WritesMeanwhile(pool, newer, asyncio.get_running_loop())
    report = await reembed(pool, embedder)
    assert (report.scanned, report.rewritten, report.skipped) == (2, 1, 1)
    table = ConversationsTable(pool)
    (got,) = await table.load([("acme", "c1")], EMBEDDER.model_id)
    assert_today(got, newer)  # the service's revision 2, not revision 1 re-embedded
    assert {r[2] for r in await chunk_rows(pool, ("acme", "c1"))} == {2}
    (got,) = await table.load([("acme", "c2")], EMBEDDER.model_id)
    assert_today(got, other)


@pytest.mark.timeout(60)  # without its lock timeout, reembed would wait on the row for ever
async def test_a_row_the_service_holds_is_waited_for_then_given_up_and_left_to_a_rerun(
    pool: asyncpg.Pool, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv = conversation("c1", 5)
    await store(pool, [windowed(conv)])
    monkeypatch.setattr(reembed_module, "RETRY_S", 0.01)
    service = await asyncpg.connect(database)  # a service transaction that holds the row
    try:
        async with service.transaction():
            await service.execute("SELECT 1 FROM conversations WHERE conversation_id = 'c1' FOR UPDATE")
            with pytest.raises(StoreBusy, match="rerun `flexor reembed`"):
                await reembed(pool, EMBEDDER)
    finally:
        await service.close()
    await refused(pool, ("acme", "c1"))  # the failed batch wrote nothing
    report = await reembed(pool, EMBEDDER)
    assert (report.rewritten, report.skipped) == (1, 0)
    (got,) = await ConversationsTable(pool).load([("acme", "c1")], EMBEDDER.model_id)
    assert_today(got, conv)


async def test_a_dry_run_counts_and_writes_nothing(pool: asyncpg.Pool, mixed: dict[Key, Conversation]) -> None:
    before = [(await chunk_rows(pool, key), await conversation_row(pool, key)) for key in mixed]
    report = await reembed(pool, EMBEDDER, dry_run=True)
    assert report.mismatched == {Mismatch.CHUNKER: 2, Mismatch.EMBEDDER: 1}
    assert (report.scanned, report.rewritten) == (4, 0)
    assert report.line().startswith("reembed (dry run): scanned 4, would rewrite 3 (embedder 1, chunker 2)")
    assert [(await chunk_rows(pool, key), await conversation_row(pool, key)) for key in mixed] == before


def test_the_summary_line_says_what_was_done() -> None:
    r = ReembedReport(scanned=10, rewritten=4, skipped=1, seconds=2.0)
    r.mismatched.update({Mismatch.EMBEDDER: 3, Mismatch.CHUNKER: 2})
    assert r.line() == ("reembed: scanned 10, mismatched 5 (embedder 3, chunker 2), rewritten 4, skipped 1 "
                        "(newer revision), 2.0 s")


@pytest.mark.timeout(60)
async def test_a_revision_the_service_stores_during_a_rewrite_drops_every_chunk_the_rewrite_wrote(
    pool: asyncpg.Pool, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service stores revision 2 while a reembed batch is writing revision 1's chunks. Today's
    chunker makes more chunks of it than the windows did, so the rewrite inserts rows as well as
    updating them: the service's delete of older revisions must see those too, not leave them."""
    old = conversation("c1", 6)
    await store(pool, [windowed(old)])
    assert len(chunk_turns(old.turns)) > len(chunk_turns(old.turns, window=3, stride=1))
    newer = conversation("c1", 7, revision=2)
    service: list[asyncio.Task[None]] = []
    original = chunks_module.upsert_conversations

    async def rewrite_then_the_service(
        conn: asyncpg.Connection, convs: Sequence[Conversation], embedder_id: str
    ) -> None:
        if not service:  # the rewrite's own call, after its chunk rows are written, before it commits
            service.append(asyncio.create_task(store(pool, embed_conversations(EMBEDDER, [newer]))))
            watcher = await asyncpg.connect(database)  # the pool's two connections: the rewrite's, the service's
            try:
                # Until the service's transaction waits on the rewrite's locks (Postgres has no event for that).
                while not await watcher.fetchval(  # noqa: ASYNC110
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                ):
                    await asyncio.sleep(0.02)
            finally:
                await watcher.close()
        await original(conn, convs, embedder_id)

    monkeypatch.setattr(chunks_module, "upsert_conversations", rewrite_then_the_service)
    report = await reembed(pool, EMBEDDER)
    await service[0]
    assert report.rewritten == 1
    assert {r[2] for r in await chunk_rows(pool, ("acme", "c1"))} == {2}  # no revision-1 row left behind
    (got,) = await ConversationsTable(pool).load([("acme", "c1")], EMBEDDER.model_id)
    assert_today(got, newer)
