"""Embedding reuse on growing conversations, against a from-scratch pass, on a real Postgres."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import orjson

from agents.cascade import Cascade
from agents.chunking import chunk_turns, transcript
from agents.embedding_cache import EmbeddingCache
from agents.evidence import MemoryEvidenceStore
from agents.pipeline import Pipeline
from agents.questions import QuestionSet, load_questions
from agents.similarity import SimilarityScorer
from agents.store.chunks import PgEvidenceStore
from agents.types import Conversation
from models.embedder import load_embedder
from models.llm.guard import strip_instructions
from stream.config import LimitsConfig
from stream.dev.produce import load_conversations
from stream.schemas import decode_conversation
from tests.conftest import EXAMPLES


def growing(conv: Conversation, tenant: str) -> list[Conversation]:
    """As a chat publishes itself: open revision k holds the first k turns, then it closes."""
    n = len(conv.turns)
    return [
        Conversation(tenant, conv.conversation_id, k, conv.turns[: min(k, n)], conv.metadata,
                     status="open" if k <= n else "closed")
        for k in range(1, n + 2)
    ]


def answers_of(answers) -> list:  # type: ignore[no-untyped-def]
    return [(a.question_id, a.answer, a.p_yes, a.decided_by, a.evidence) for a in answers]


async def test_growing_revisions_embed_each_text_once_and_answer_like_a_fresh_pass(pool: asyncpg.Pool) -> None:
    embedder = load_embedder("onnx-int8")
    examples = load_questions(EXAMPLES / "questions.yaml").questions
    # Every question real-time, so that every revision is embedded and answered.
    questions = QuestionSet(questions=[q.model_copy(update={"on": ["open", "closed"]}) for q in examples])
    events = load_conversations(EXAMPLES / "conversations.jsonl")
    convs = [decode_conversation(orjson.dumps(e), LimitsConfig()).to_conversation() for e in events]
    convs = sorted(convs, key=lambda c: -len(c.turns))[:4]  # the longest chats: most revisions
    cascade = Cascade(SimilarityScorer(embedder))
    store = PgEvidenceStore(pool)
    embedded = {"reuse": 0, "scratch": 0}

    def counter(name: str):  # type: ignore[no-untyped-def]
        return lambda texts, ran: embedded.__setitem__(name, embedded[name] + ran)

    reuse = Pipeline(embedder, store, cascade, cache=EmbeddingCache(8 * 2**20), on_embed=counter("reuse"))
    scratch = Pipeline(embedder, store, cascade, on_embed=counter("scratch"))
    # Chats interleave: each batch holds the next revision of every chat still going.
    chats = {"reuse": [growing(c, "reuse") for c in convs], "scratch": [growing(c, "scratch") for c in convs]}
    rounds = max(len(revs) for revs in chats["reuse"])
    got: dict[str, dict[tuple[str, int], list]] = {"reuse": {}, "scratch": {}}
    for k in range(rounds):
        for name, pipeline in (("reuse", reuse), ("scratch", scratch)):
            batch = [revs[k] for revs in chats[name] if k < len(revs)]
            result = await pipeline.classify(batch, questions)
            for conv, answers in zip(batch, result.answers, strict=True):
                got[name][(conv.conversation_id, conv.revision)] = answers

    assert got["reuse"].keys() == got["scratch"].keys()
    for key, answers in got["reuse"].items():
        assert answers_of(answers) == answers_of(got["scratch"][key]), key
        assert {a.question_id for a in answers} == {q.id for q in questions.questions}
        text = transcript(next(c for c in convs if c.conversation_id == key[0]).turns[: key[1]])
        for a in answers:
            for e in a.evidence:
                assert e.chunk_id.startswith(f"{key[0]}:{key[1]}:")
                assert e.text == text[e.char_start : e.char_end]
    # Reuse embeds every distinct window once; from scratch embeds every window of every revision.
    windows = [strip_instructions(ch.text)[0] for revs in chats["reuse"] for c in revs for ch in chunk_turns(c.turns)]
    assert embedded["reuse"] == len(set(windows))
    assert embedded["scratch"] == len(windows)
    assert embedded["reuse"] < embedded["scratch"] / 2


async def test_a_batch_with_nothing_to_answer_does_no_model_work() -> None:
    """Open revisions and no real-time question: no embedding, empty answers (it used to crash
    the batch: no questions to embed for retrieval)."""
    embedder = load_embedder("onnx-int8")
    examples = load_questions(EXAMPLES / "questions.yaml").questions
    questions = QuestionSet(questions=[q.model_copy(update={"on": ["closed"]}) for q in examples])
    events = load_conversations(EXAMPLES / "conversations.jsonl", 3)
    convs = [replace(decode_conversation(orjson.dumps(e), LimitsConfig()).to_conversation(), status="open")
             for e in events]
    calls: list[tuple[int, int]] = []
    pipeline = Pipeline(embedder, MemoryEvidenceStore(), Cascade(SimilarityScorer(embedder)),
                        on_embed=lambda texts, ran: calls.append((texts, ran)))
    result = await pipeline.classify(convs, questions)
    assert result.answers == [[], [], []]
    assert calls == []  # the embedder never ran
