"""Backfill bookkeeping on a real Postgres: which stored conversations lack an answer to a question's
current version (by tenant, date and the question's metadata selector), and job progress that
counts a redelivered item once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from agents.chunking import Turn
from agents.pipeline import embed_conversations
from agents.questions import Question
from agents.store.backfill import BackfillJobs, scan_unanswered
from agents.store.chunks import PgEvidenceStore
from agents.store.classifications import ClassificationsTable
from agents.types import Conversation
from models.embedder import load_embedder

EMBEDDER = load_embedder("onnx-int8")
QUESTION = Question(id="q_new", version=2, text="Did the customer ask for a refund?", applies_to={"channel": "chat"})


def conversation(tenant: str, cid: str, revision: int, channel: str, day: int) -> Conversation:
    turns = (Turn("t1", "customer", f"hello from {cid}"), Turn("t2", "agent", "how can I help?"))
    return Conversation(tenant, cid, revision, turns, {"channel": channel},
                        occurred_at=datetime(2026, 11, day, tzinfo=UTC))


def event(c: Conversation, revision: int, answered: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "event_id": f"{c.conversation_id}-{revision}-{len(answered)}", "tenant_id": c.tenant_id,
        "conversation_id": c.conversation_id, "revision": revision,
        "answers": [{"question_id": q, "question_version": v, "answer": "no", "p_yes": 0.1, "decided_by": "head",
                     "evidence": []} for q, v in answered],
        "models": {}, "source": {"topic": "in", "partition": 0, "offset": 0},
    }


async def test_scan_selects_stored_revisions_without_an_answer_to_the_current_version(pool: asyncpg.Pool) -> None:
    c1 = conversation("acme", "c1", 1, "chat", 1)  # answered at the current version
    c2 = conversation("acme", "c2", 1, "email", 5)  # the question does not apply
    c3 = conversation("beta", "c3", 2, "chat", 6)  # answered only at an older revision
    c4 = conversation("acme", "c4", 1, "chat", 7)  # answered only by the question's older version
    c5 = conversation("acme", "c5", 1, "chat", 8)  # never classified
    await PgEvidenceStore(pool).upsert(embed_conversations(EMBEDDER, [c1, c2, c3, c4, c5]), EMBEDDER.model_id)
    await ClassificationsTable(pool).upsert([
        (event(c1, 1, [("other", 1), ("q_new", 2)]), "v2"),
        (event(c1, 1, [("other", 1)]), "v1"),
        (event(c3, 1, [("q_new", 2)]), "v2"),
        (event(c3, 2, [("other", 1)]), "v1"),
        (event(c4, 1, [("q_new", 1)]), "v1"),
    ])

    async def scan(**kw: Any) -> list[tuple[str, str]]:
        todo, after = await scan_unanswered(pool, [QUESTION], **kw)
        assert after is None
        return todo

    assert await scan() == [("acme", "c4"), ("acme", "c5"), ("beta", "c3")]
    assert await scan(tenant_id="acme") == [("acme", "c4"), ("acme", "c5")]
    assert await scan(since=datetime(2026, 11, 7, tzinfo=UTC)) == [("acme", "c4"), ("acme", "c5")]
    everywhere = QUESTION.model_copy(update={"applies_to": {}})
    assert (await scan_unanswered(pool, [everywhere]))[0] == [("acme", "c2"), ("acme", "c4"), ("acme", "c5"),
                                                             ("beta", "c3")]
    # Page by page: each page says where the next one starts, until the scan is over.
    todo, after, pages = [], None, 0
    while True:
        page, after = await scan_unanswered(pool, [QUESTION], after=after, limit=2)
        todo, pages = todo + page, pages + 1
        if after is None:
            break
    assert (todo, pages) == ([("acme", "c4"), ("acme", "c5"), ("beta", "c3")], 3)


async def test_progress_counts_a_redelivered_item_once(pool: asyncpg.Pool) -> None:
    jobs = BackfillJobs(pool)
    await jobs.create("j1", "v2", ["q_new@2"], None, None)
    await jobs.add_items("j1", 2, 70)
    await jobs.item_done("j1", 0, 64, 60, 4)
    await jobs.item_done("j1", 0, 64, 0, 64)  # redelivered after a crash: found answered
    p = await jobs.progress("j1")
    assert p is not None
    assert (p.items, p.conversations, p.items_done, p.conversations_done, p.published, p.skipped) == (
        2, 70, 1, 64, 0, 64)
    assert not p.done
    await jobs.item_done("j1", 1, 6, 6, 0)
    assert not (await jobs.progress("j1")).done  # type: ignore[union-attr]  # still enqueueing
    await jobs.finish_enqueue("j1")
    assert (await jobs.progress("j1")).done  # type: ignore[union-attr]
    assert await jobs.progress("nope") is None
