"""The seed baseline issues exactly the calls it claims, on the real tiny engine."""

from __future__ import annotations

import os

import numpy as np
import pytest

from agents.chunking import Turn, transcript
from agents.learn.baseline import EVIDENCE_MAX_TOKENS, SeedBaseline
from agents.questions import Question
from agents.types import Conversation
from models.llm.hf import HFEngine
from models.llm.prompts import quote
from models.llm.tiny import ensure_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return HFEngine(ensure_tiny_model(), model_id="hf-tiny", batch_size=32)


class CountingEngine:
    """A thin recorder around the real engine: every call, its prompts and max_tokens."""

    def __init__(self, inner: HFEngine) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.stats = inner.stats
        self.log: list[tuple[str, list[str], int | None, list[str]]] = []

    def score(self, prompts: list[str]) -> np.ndarray:
        self.log.append(("score", list(prompts), None, []))
        return self.inner.score(prompts)

    def generate(self, prompts: list[str], max_tokens: int = 64) -> list[str]:
        out = self.inner.generate(prompts, max_tokens)
        self.log.append(("generate", list(prompts), max_tokens, out))
        return out

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return self.inner.count_tokens(prompts)


def conv(cid: str, channel: str, n_turns: int) -> Conversation:
    turns = tuple(
        Turn(f"t{i}", "customer" if i % 2 else "agent", f"{cid} turn {i}: my card was charged twice")
        for i in range(n_turns)
    )
    return Conversation("acme", cid, 1, turns, {"channel": channel})


QUESTIONS = [
    Question(id="charged_twice", version=1, text="Was the customer charged twice?"),
    Question(id="chat_only", version=1, text="Was the customer annoyed?", applies_to={"channel": "chat"}),
    Question(id="email_only", version=1, text="Did the agent offer a refund?", applies_to={"channel": "email"}),
]


def test_two_calls_per_applicable_question_one_conversation_at_a_time(engine: HFEngine) -> None:
    counting = CountingEngine(engine)
    baseline = SeedBaseline(counting)
    convs = [conv("c-1", "chat", 6), conv("c-2", "email", 4)]
    before = engine.stats.snapshot()
    answers = [baseline.classify(c, QUESTIONS) for c in convs]
    spent = engine.stats.snapshot() - before

    assert [[a.question_id for a in row] for row in answers] == [["charged_twice", "chat_only"],
                                                                 ["charged_twice", "email_only"]]
    expected_questions = [(convs[0], QUESTIONS[0]), (convs[0], QUESTIONS[1]),
                          (convs[1], QUESTIONS[0]), (convs[1], QUESTIONS[2])]
    assert len(counting.log) == 2 * len(expected_questions)
    for k, (c, q) in enumerate(expected_questions):
        (kind1, p1, max_tokens, generated), (kind2, p2, _, _) = counting.log[2 * k], counting.log[2 * k + 1]
        assert (kind1, kind2) == ("generate", "score")
        assert len(p1) == 1 and len(p2) == 1  # one prompt per call: nothing batched
        assert max_tokens == EVIDENCE_MAX_TOKENS == 64
        whole = quote(transcript(c.turns))
        assert whole in p1[0] and whole in p2[0]  # the whole conversation, in both calls
        other = convs[1 - convs.index(c)].conversation_id
        assert other not in p1[0] and other not in p2[0]  # one conversation at a time
        assert q.text in p1[0] and q.text in p2[0]
        assert quote(generated[0].strip()) in p2[0]  # validation sees the generated evidence
    for row in answers:
        for a in row:
            assert a.decided_by == "baseline" and 0.0 <= a.p_yes <= 1.0
            assert a.answer == ("yes" if a.p_yes >= 0.5 else "no")

    # The calls it claims, and the token accounting the benchmark reads.
    assert [SeedBaseline.calls_for(c, QUESTIONS).total for c in convs] == [4, 4]
    assert spent.calls == 8 and spent.prompts == 8
    all_prompts = [p for _, ps, _, _ in counting.log for p in ps]
    assert spent.prompt_tokens == sum(engine.count_tokens(all_prompts))
