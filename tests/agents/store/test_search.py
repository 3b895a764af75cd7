"""Corpus search on a real Postgres + pgvector: a planted conversation's chunk comes back first for a
query about it, with its conversation id and transcript offsets; a tenant filter keeps to that
tenant; the migration builds an HNSW index; `flexor search` prints the same hit."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import orjson
import pytest

from agents.chunking import Turn, transcript
from agents.pipeline import embed_conversations
from agents.store.chunks import PgEvidenceStore
from agents.store.search import CorpusSearch
from agents.types import Conversation
from models.embedder import load_embedder
from stream.config import LimitsConfig
from stream.dev.produce import load_conversations
from stream.schemas import decode_conversation
from tests.conftest import EXAMPLES, REPO

EMBEDDER = load_embedder("onnx-int8")

PLANTED_TURNS = (
    Turn("t1", "customer", "Hi, I need help with my account settings."),
    Turn("t2", "agent", "Sure, what would you like to change?"),
    Turn("t3", "customer", "The notification emails, please."),
    Turn("t4", "customer", "Also, my pet iguana climbed onto the keyboard and ordered forty kilos of kale."),
    Turn("t5", "agent", "Oh no! An iguana ordered kale? I can cancel the kale order for you."),
    Turn("t6", "customer", "Yes please cancel the lizard's vegetable order."),
)
QUERY = "my iguana ordered kale by walking on the keyboard"


@pytest.fixture
async def pool(pool: asyncpg.Pool) -> asyncpg.Pool:
    """The migrated pool (tests/conftest.py) with the stored conversations."""
    await _store(pool)
    return pool


async def _store(pool: asyncpg.Pool) -> None:
    examples = [decode_conversation(orjson.dumps(e), LimitsConfig()).to_conversation()
                for e in load_conversations(EXAMPLES / "conversations.jsonl")[:40]]
    planted = Conversation("zoo", "c-iguana", 2, PLANTED_TURNS, {"channel": "chat"})
    embedded = await asyncio.to_thread(embed_conversations, EMBEDDER, [*examples, planted])
    await PgEvidenceStore(pool).upsert(embedded, EMBEDDER.model_id)


async def test_the_planted_chunk_comes_first_with_its_offsets(pool: asyncpg.Pool) -> None:
    query = EMBEDDER.embed([QUERY])[0]
    hits = await CorpusSearch(pool).search(query, EMBEDDER.model_id, k=5)
    top = hits[0]
    assert (top.tenant_id, top.conversation_id, top.revision, top.chunk_id) == ("zoo", "c-iguana", 2, "c-iguana:2:3")
    assert top.turn_ids == ("t4",)
    assert top.text == transcript(PLANTED_TURNS)[top.char_start : top.char_end]
    assert "iguana climbed onto the keyboard" in top.text
    assert top.score > hits[1].score
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    exact = await CorpusSearch(pool).search(query, EMBEDDER.model_id, k=5, exact=True)
    assert [h.chunk_id for h in exact] == [h.chunk_id for h in hits]
    # Chunks of another embedder are not comparable, so not searched.
    assert await CorpusSearch(pool).search(query, "other-embedder", k=5) == []


async def test_a_tenant_filter_keeps_to_that_tenant(pool: asyncpg.Pool) -> None:
    query = EMBEDDER.embed([QUERY])[0]
    hits = await CorpusSearch(pool).search(query, EMBEDDER.model_id, k=7, tenant_id="acme")
    assert len(hits) == 7 and {h.tenant_id for h in hits} == {"acme"}
    assert "c-iguana" not in {h.conversation_id for h in hits}


async def test_the_migration_builds_an_hnsw_cosine_index(pool: asyncpg.Pool) -> None:
    ddl = await pool.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = 'chunks_embedding_hnsw'")
    assert "USING hnsw (embedding vector_cosine_ops) WHERE (NOT open)" in ddl


async def test_an_open_revision_is_stored_for_evidence_but_not_searched(pool: asyncpg.Pool) -> None:
    # The same words in a chat that is still open: its chunks serve its own evidence, but stay out
    # of the search index (migration 012), so search finds only the closed conversation.
    growing = Conversation("zoo", "c-growing", 5, PLANTED_TURNS[:4], {"channel": "chat"}, status="open")
    embedded = await asyncio.to_thread(embed_conversations, EMBEDDER, [growing])
    await PgEvidenceStore(pool).upsert(embedded, EMBEDDER.model_id)
    assert await pool.fetchval("SELECT count(*) FROM chunks WHERE conversation_id = 'c-growing' AND open") == 4
    query = EMBEDDER.embed([QUERY])[0]
    for exact in (False, True):
        hits = await CorpusSearch(pool).search(query, EMBEDDER.model_id, k=5, exact=exact)
        assert hits[0].conversation_id == "c-iguana"
        assert "c-growing" not in {h.conversation_id for h in hits}


async def test_flexor_search_prints_the_planted_chunk(pool: asyncpg.Pool, database: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXOR_") and k != "DATABASE_URL"}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "flexor"), "search", QUERY, "--k", "3", "--json",
        env={**env, "DATABASE_URL": database}, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert len(lines) == 3
    assert (lines[0]["conversation_id"], lines[0]["chunk_id"], lines[0]["turn_ids"]) == (
        "c-iguana", "c-iguana:2:3", ["t4"])
