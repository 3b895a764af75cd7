"""The seed system as a measurable mode: what Flexor Stream replaces, on the same engine.

For one conversation at a time, for every question that applies to it:

1. evidence call: ``engine.generate`` over the WHOLE transcript (``baseline_evidence``
   template), greedy, at most 64 new tokens: the model copies the passages that bear on the
   question;
2. validation call: ``engine.score`` over the whole transcript plus that generated evidence
   (``baseline_validate`` template), P(yes) from the next-token logits of yes/no.

So each applicable question costs exactly two engine calls of one prompt each, and both prompts
carry the full conversation. Nothing is batched across questions or conversations, as in the
seed. Prompt tokens and calls are read from ``engine.stats`` by the caller (the benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agents.chunking import transcript
from agents.questions import Question
from agents.types import Answer, Conversation, Evidence
from models.llm.engine import YesNoEngine
from models.llm.prompts import PromptLibrary, default_library

EVIDENCE_MAX_TOKENS = 64
THRESHOLD = 0.5
DECIDED_BY = "baseline"


@dataclass(frozen=True, slots=True)
class BaselineCalls:
    """What one conversation cost: engine calls by kind (each with one prompt)."""

    generate: int
    score: int

    @property
    def total(self) -> int:
        return self.generate + self.score


class SeedBaseline:
    def __init__(
        self,
        engine: YesNoEngine,
        prompts: PromptLibrary | None = None,
        *,
        max_tokens: int = EVIDENCE_MAX_TOKENS,
        threshold: float = THRESHOLD,
    ) -> None:
        self.engine = engine
        self.prompts = prompts or default_library()
        self.max_tokens = max_tokens
        self.threshold = threshold
        self.model_id = engine.model_id

    def answer(self, conv: Conversation, question: Question) -> Answer:
        """Two calls: generate the evidence, then validate with yes/no."""
        text = transcript(conv.turns)
        [found] = self.engine.generate([self.prompts.baseline_evidence(question.text, text)], self.max_tokens)
        [p] = self.engine.score([self.prompts.baseline_validate(question.text, text, found)])
        p = float(p)
        # The generated evidence is model text, not a span of the transcript: no offsets.
        ev = (Evidence(f"{conv.conversation_id}:{conv.revision}:generated", (), -1, -1, found.strip(), 0.0),)
        return Answer(question.id, question.version, "yes" if p >= self.threshold else "no", p, DECIDED_BY, ev)

    def classify(self, conv: Conversation, questions: Sequence[Question]) -> list[Answer]:
        """Answers for the questions that apply to ``conv``, one question after another."""
        return [self.answer(conv, q) for q in questions if q.applies(conv.metadata)]

    @staticmethod
    def calls_for(conv: Conversation, questions: Sequence[Question]) -> BaselineCalls:
        """The calls ``classify`` makes for ``conv``: one generate and one score per applicable question."""
        n = sum(1 for q in questions if q.applies(conv.metadata))
        return BaselineCalls(generate=n, score=n)
