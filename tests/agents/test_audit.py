"""Audit sampling (agents/audit.py): which answers are audited, and what an audit records, against
the real tiny transformers engine and a real Postgres labels table."""

from __future__ import annotations

import hashlib
import os

import asyncpg
import pytest

from agents.audit import Auditor, audit_fraction, audit_view, sampled
from agents.llm_stage import LLMCascadeStage
from agents.questions import Question, QuestionSet
from agents.store.labels import LabelsTable
from agents.types import Answer, Conversation, Evidence
from models.llm.hf import HFEngine
from models.llm.tiny import ensure_tiny_model
from tests.agents.test_llm_stage import Counters, FlakyEngine

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return HFEngine(ensure_tiny_model(), model_id="hf-tiny", batch_size=32)


def test_the_sample_is_the_documented_hash_of_the_event_id() -> None:
    # The rule operators rely on, spelled out: sha256(event_id), first 8 bytes big-endian, / 2**64.
    for event_id in ("3f1c9a", "e-9f2", ""):
        digest = hashlib.sha256(event_id.encode()).digest()
        assert audit_fraction(event_id) == int.from_bytes(digest[:8], "big") / 2**64


def test_the_sample_has_the_rate_and_grows_with_it() -> None:
    ids = [f"event-{i}" for i in range(100_000)]
    at_1 = {i for i in ids if sampled(i, 0.01)}
    at_5 = {i for i in ids if sampled(i, 0.05)}
    assert 850 <= len(at_1) <= 1150  # 1000 expected; 5 standard deviations either side
    assert 4650 <= len(at_5) <= 5350
    assert at_1 <= at_5  # raising the rate keeps every event audited before
    assert not any(sampled(i, 0.0) for i in ids[:1000]) and all(sampled(i, 1.0) for i in ids[:1000])


QUESTIONS = QuestionSet(questions=[
    Question(id="refund", version=2, text="Did the customer ask for a refund?"),
    Question(id="angry", version=1, text="Was the customer annoyed?"),
])
TEXTS = ["customer: I want my money back for the double charge", "customer: this is the third time, I am furious"]


def answer(qid: str, version: int, decided_by: str, text: str, p: float = 0.9) -> Answer:
    return Answer(qid, version, "yes" if p >= 0.5 else "no", p, decided_by,
                  (Evidence("c:1:0", ("t1",), 0, len(text), text, 0.7),))


def conv(cid: str) -> Conversation:
    return Conversation("acme", cid, 3, ())


def batch() -> tuple[list[str], list[Conversation], list[list[Answer]]]:
    """Event ids that are sampled at rate 0.5 ('in-...') or not ('out-...'), found by the rule above."""
    inside = next(f"in-{i}" for i in range(100) if audit_fraction(f"in-{i}") < 0.5)
    outside = next(f"out-{i}" for i in range(100) if audit_fraction(f"out-{i}") >= 0.5)
    answers = [
        answer("refund", 2, "head", TEXTS[0]),
        answer("angry", 1, "similarity", TEXTS[1], p=0.1),
        answer("refund", 2, "llm", TEXTS[0]),  # already decided by the LLM
        answer("refund", 2, "head-fallback", TEXTS[0]),  # the LLM failed on it
        answer("refund", 1, "few-shot", TEXTS[0]),  # an older question version
    ]
    return [inside, outside], [conv("c1"), conv("c2")], [answers, answers]


def test_select_takes_stage1_answers_of_sampled_events_only(engine: HFEngine) -> None:
    auditor = Auditor(LLMCascadeStage(engine), 0.5)
    keys, convs, answers = batch()
    chosen = auditor.select(keys, convs, answers, QUESTIONS)
    assert [(c.conversation_id, q.id, a.decided_by) for c, q, a in chosen] == [
        ("c1", "refund", "head"), ("c1", "angry", "similarity")]


async def test_score_counts_agreement_with_the_llms_own_answer(engine: HFEngine) -> None:
    stage = LLMCascadeStage(engine)
    auditor = Auditor(stage, 1.0)
    keys, convs, answers = batch()
    chosen = auditor.select(keys, convs, answers, QUESTIONS)
    outcome = await auditor.score(chosen)
    # The engine itself, asked directly, says what each label must be.
    direct = engine.score([stage.prompt(q, a.evidence) for _, q, a in chosen])
    teacher = ["yes" if p >= 0.5 else "no" for p in direct]
    assert [lab.answer for lab in outcome.labels] == teacher
    assert {(lab.conversation_id, lab.question_id, lab.question_version, lab.revision) for lab in outcome.labels} == {
        ("c1", "refund", 2, 3), ("c1", "angry", 1, 3), ("c2", "refund", 2, 3), ("c2", "angry", 1, 3)}
    assert {lab.source for lab in outcome.labels} == {"teacher:hf-tiny"}
    assert {lab.given_by for lab in outcome.labels} == {"audit"}
    for qid in ("refund", "angry"):
        pairs = [(t, a.answer) for t, (_, q, a) in zip(teacher, chosen, strict=True) if q.id == qid]
        assert outcome.agree[qid] == sum(t == s for t, s in pairs)
        assert outcome.disagree[qid] == sum(t != s for t, s in pairs)
    assert outcome.failed == 0
    await stage.aclose()


async def test_audit_failures_are_not_published_fallbacks(engine: HFEngine) -> None:
    counters = Counters()
    stage = LLMCascadeStage(FlakyEngine(engine, fail=10**6), on_cache=counters.on_cache,
                            on_fallback=counters.on_fallback, attempts=2, backoff_s=0.01)
    auditor = Auditor(audit_view(stage), 1.0)
    keys, convs, answers = batch()
    outcome = await auditor.score(auditor.select(keys, convs, answers, QUESTIONS))
    assert outcome.failed == 4 and not outcome.labels and not outcome.agree and not outcome.disagree
    assert counters.fallbacks == 0  # flexor_llm_fallbacks_total counts published answers only
    assert counters.cache["miss"] == 4  # the shared cache was asked
    await stage.aclose()


async def test_labels_are_stored_in_the_labels_table(engine: HFEngine, pool: asyncpg.Pool) -> None:
    stage = LLMCascadeStage(engine)
    try:
        table = LabelsTable(pool)
        auditor = Auditor(stage, 1.0, table)
        keys, convs, answers = batch()
        outcome = await auditor.score(auditor.select(keys, convs, answers, QUESTIONS))
        assert await auditor.store(outcome) == 4
        stored = await table.fetch()
        assert sorted((lab.conversation_id, lab.question_id, lab.answer) for lab in stored) == sorted(
            (lab.conversation_id, lab.question_id, lab.answer) for lab in outcome.labels)
        assert await table.count_by_source() == {("refund", "teacher:hf-tiny"): 2, ("angry", "teacher:hf-tiny"): 2}
    finally:
        await stage.aclose()
