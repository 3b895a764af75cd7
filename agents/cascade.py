"""The cascade: stage 1 (a trained head or the zero-shot scorer) decides confident cases; answers
inside the question's uncertain band go to the LLM stage when one is configured.

Stage 1 is numpy work for the whole batch at once (`Cascade.stage1`: one call per scorer, every
question it serves scored together) and runs in the caller's worker thread; the LLM stage is
async (it batches across conversations and questions behind its own scheduler).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agents.questions import Question
from agents.scoring import Plan, Stage1Result, Stage1Scorer
from agents.types import EmbeddedConversation, Evidence

log = logging.getLogger(__name__)

LLM_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True)
class Decision:
    p_yes: float
    answer: str
    decided_by: str


class LLMStage(Protocol):
    model_id: str

    async def p_yes(
        self, items: Sequence[tuple[Question, Sequence[Evidence]]]
    ) -> tuple[np.ndarray, list[str]]:
        """P(yes) per (question, evidence) item and who decided each (llm, cache or a fallback)."""
        ...


class Cascade:
    def __init__(
        self,
        zero_shot: Stage1Scorer,
        heads: Mapping[str, Stage1Scorer] | None = None,
        llm: LLMStage | None = None,
    ) -> None:
        self.zero_shot = zero_shot
        self.heads = dict(heads or {})
        self.llm = llm

    def scorer_for(self, question: Question) -> Stage1Scorer:
        if question.head is not None:
            head = self.heads.get(question.head)
            if head is not None:
                return head
            log.warning("question %s names head %r, which is not loaded: zero-shot", question.id, question.head)
        return self.zero_shot

    def stage1(self, plan: Plan, convs: Sequence[EmbeddedConversation]) -> list[Stage1Result]:
        """P(yes) per (question, conversation) of the plan, one result per plan entry in plan order.

        The public stage-1 entry point: each scorer gets every plan entry it serves in one call."""
        by_scorer: dict[int, tuple[Stage1Scorer, list[int]]] = {}
        for pos, (question, _) in enumerate(plan):
            scorer = self.scorer_for(question)
            by_scorer.setdefault(id(scorer), (scorer, []))[1].append(pos)
        out: list[Stage1Result | None] = [None] * len(plan)
        for scorer, positions in by_scorer.values():
            for pos, r in zip(positions, scorer.stage1([plan[p] for p in positions], convs), strict=True):
                p = np.clip(np.asarray(r.p_yes, dtype=np.float64), 0.0, 1.0)
                out[pos] = Stage1Result(p, r.threshold, r.band, r.decided_by)
        return [r for r in out if r is not None]

    async def decide(
        self, question_results: Sequence[tuple[Question, Stage1Result, Sequence[Sequence[Evidence]]]]
    ) -> list[list[Decision]]:
        """Final decisions per question (aligned with each Stage1Result's p_yes)."""
        out: list[list[Decision]] = []
        uncertain: list[tuple[int, int]] = []
        items: list[tuple[Question, Sequence[Evidence]]] = []
        for qi, (question, s1, evidence) in enumerate(question_results):
            row = []
            for ci, p in enumerate(s1.p_yes.tolist()):
                row.append(Decision(p, "yes" if p >= s1.threshold else "no", s1.decided_by))
                if self.llm is not None and s1.band[0] <= p < s1.band[1]:
                    uncertain.append((qi, ci))
                    items.append((question, evidence[ci]))
            out.append(row)
        if items:
            assert self.llm is not None
            p_llm, who = await self.llm.p_yes(items)
            for (qi, ci), p, by in zip(uncertain, p_llm.tolist(), who, strict=True):
                if by.endswith("fallback"):
                    # The LLM could not answer: keep the stage-1 answer, marked as a fallback.
                    d = out[qi][ci]
                    out[qi][ci] = Decision(d.p_yes, d.answer, f"{d.decided_by}-fallback")
                else:
                    out[qi][ci] = Decision(p, "yes" if p >= LLM_THRESHOLD else "no", by)
        return out
