"""Growing chats through the service: open revisions answer only real-time questions, the closing
revision answers all, and each window is embedded once (real broker, real Postgres)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import yaml

from agents.chunking import Turn, chunk_turns
from agents.questions import load_questions
from stream.config import Settings
from tests.conftest import EXAMPLES
from tests.harness import check_delivery, count_rows, create_topics, metric, produce, running_service, wait_until

TURNS = [
    ("customer", "Hi, I was charged twice for my subscription this month."),
    ("agent", "Sorry about that. Could you confirm the email on the account?"),
    ("customer", "It's jo@example.com. This is the third time this happens, I'm really annoyed."),
    ("agent", "I see both charges. I have refunded the second one."),
    ("customer", "Fine. If it happens again I'm cancelling."),
]


def revision(cid: str, k: int, status: str, channel: str, turns: int) -> dict[str, Any]:
    return {
        "schema": "conversation.v1", "event_id": f"{cid}:{k}", "tenant_id": "acme", "conversation_id": cid,
        "revision": k, "status": status, "metadata": {"channel": channel},
        "turns": [{"turn_id": f"t{i + 1}", "speaker": s, "text": t} for i, (s, t) in enumerate(TURNS[:turns])],
    }


def windows(event: dict[str, Any]) -> list[str]:
    return [c.text for c in chunk_turns([Turn(t["turn_id"], t["speaker"], t["text"]) for t in event["turns"]])]


async def test_open_revisions_answer_real_time_questions_and_the_closing_one_all(
    settings: Settings, tmp_path: Path
) -> None:
    # customer_angry is real-time on chat; nothing is real-time on email.
    questions = load_questions(EXAMPLES / "questions.yaml").questions
    data = [q.model_dump(mode="json") for q in questions]
    for q in data:
        q["on"] = ["closed"]
        if q["id"] == "customer_angry":
            q.update(on=["open", "closed"], applies_to={"channel": "chat"})
    path = tmp_path / "questions.yaml"
    path.write_text(yaml.safe_dump({"questions": data}))
    settings = settings.model_copy(update={"questions_file": path})
    everyone = {q.id for q in questions}

    chat = [revision("chat-1", k, "open", "chat", k + 1) for k in (1, 2, 3)]
    chat.append(revision("chat-1", 4, "closed", "chat", 4))
    mail = [revision("mail-1", 1, "open", "email", 3), revision("mail-1", 2, "closed", "email", 5)]
    inputs = chat + mail
    await create_topics(settings)
    async with running_service(settings) as running:
        await produce(settings, inputs)

        async def all_rows() -> bool:
            return await count_rows(settings) == len(inputs)

        await wait_until(all_rows, 120, "every revision classified")
        registry = running.metrics.registry
        embedded = metric(registry, "flexor_texts_embedded_total")
        hits = metric(registry, "flexor_embedding_cache_total", {"result": "hit"})
        misses = metric(registry, "flexor_embedding_cache_total", {"result": "miss"})
    events = {(e["conversation_id"], e["revision"]): e for e in await check_delivery(settings, inputs)}

    for k in (1, 2, 3):
        assert {a["question_id"] for a in events[("chat-1", k)]["answers"]} == {"customer_angry"}
    assert {a["question_id"] for a in events[("chat-1", 4)]["answers"]} == everyone
    assert events[("mail-1", 1)]["answers"] == []
    assert {a["question_id"] for a in events[("mail-1", 2)]["answers"]} == everyone - {"customer_angry"}

    # The open email revision had nothing to answer: not embedded, not stored.
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        stored = await conn.fetch("SELECT DISTINCT conversation_id, revision FROM chunks ORDER BY 1")
    finally:
        await conn.close()
    assert [tuple(r) for r in stored] == [("chat-1", 4), ("mail-1", 2)]

    # Each distinct window embedded once; the rest reused.
    worked = [*chat, mail[1]]
    texts = [w for e in worked for w in windows(e)]
    assert embedded == misses == len(set(texts))
    assert hits == len(texts) - len(set(texts)) > 0
