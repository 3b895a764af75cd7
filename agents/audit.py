"""Audit sampling: a deterministic share of the answers stage 1 decided confidently also goes to
the LLM. The published answer does not change; the pair (stage 1's answer, the LLM's) feeds a
per-question agreement metric, and the LLM's answer is stored as a label
(`teacher:<model id>`, given by ``audit``) for the next training run.

An event is audited when ``audit_fraction(event_id) < rate``: the event_id is a hash of the
conversation revision, the question set and the models, so a replay audits the same answers, and
raising the rate keeps every event that a lower rate audited. Every answer of an audited event
that a stage-1 scorer decided (``head``, ``few-shot``, ``similarity``) is audited; answers the
LLM already decided, cache hits and fallbacks are not.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agents.cascade import LLM_THRESHOLD, LLMStage
from agents.llm_stage import FALLBACK, LLMCascadeStage
from agents.questions import Question, QuestionSet
from agents.store.labels import Label, LabelsTable, teacher_source
from agents.types import Answer, Conversation

log = logging.getLogger(__name__)

STAGE1 = frozenset({"head", "few-shot", "similarity"})
GIVEN_BY = "audit"
DEFAULT_RATE = 0.01  # with an LLM configured


def audit_fraction(event_id: str) -> float:
    """The event's place in [0, 1): the first 8 bytes of sha256(event_id), big-endian, / 2**64."""
    return int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:8], "big") / 2**64


def sampled(event_id: str, rate: float) -> bool:
    return audit_fraction(event_id) < rate


@dataclass
class AuditOutcome:
    agree: Counter[str] = field(default_factory=Counter)  # question id -> answers where both agree
    disagree: Counter[str] = field(default_factory=Counter)
    failed: int = 0  # the LLM gave no answer (after its retries)
    labels: list[Label] = field(default_factory=list)  # the LLM's answers, to store


def audit_view(stage: LLMCascadeStage, on_fallback: Callable[[int], None] | None = None) -> LLMCascadeStage:
    """The cascade's LLM stage seen by the auditor: the same engine, scheduler (audit prompts
    share engine batches with the cascade's) and result cache, but its own fallback callback, so
    an audit the LLM could not answer is not counted as a published fallback."""
    return LLMCascadeStage(
        stage.engine, prompts=stage.prompts, cache=stage.cache, scheduler=stage.scheduler,
        timeout_s=stage.timeout_s, attempts=stage.attempts, backoff_s=stage.backoff_s,
        on_cache=stage.on_cache, on_fallback=on_fallback,
    )


class Auditor:
    def __init__(self, llm: LLMStage, rate: float, labels: LabelsTable | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("audit rate must be within [0, 1]")
        self.llm = llm
        self.rate = rate
        self.labels = labels
        self.source = teacher_source(llm.model_id)

    def select(
        self, keys: Sequence[str], convs: Sequence[Conversation], answers: Sequence[Sequence[Answer]],
        questions: QuestionSet,
    ) -> list[tuple[Conversation, Question, Answer]]:
        """The answers to audit: stage-1 answers of sampled events, for questions still in the set."""
        by_id = questions.by_id()
        out = []
        for key, conv, row in zip(keys, convs, answers, strict=True):
            if not sampled(key, self.rate):
                continue
            for a in row:
                q = by_id.get(a.question_id)
                if a.decided_by in STAGE1 and q is not None and q.version == a.question_version:
                    out.append((conv, q, a))
        return out

    async def score(self, chosen: Sequence[tuple[Conversation, Question, Answer]]) -> AuditOutcome:
        """Score the chosen answers with the LLM (one call for them all) and count agreement;
        the outcome carries the LLM's answers as labels for `store`."""
        outcome = AuditOutcome()
        if not chosen:
            return outcome
        p, who = await self.llm.p_yes([(q, a.evidence) for _, q, a in chosen])
        for (conv, q, a), p_llm, by in zip(chosen, p.tolist(), who, strict=True):
            if by == FALLBACK:
                outcome.failed += 1
                continue
            teacher = "yes" if p_llm >= LLM_THRESHOLD else "no"
            (outcome.agree if teacher == a.answer else outcome.disagree)[q.id] += 1
            outcome.labels.append(
                Label(conv.tenant_id, conv.conversation_id, conv.revision, q.id, q.version, teacher, self.source,
                      GIVEN_BY)
            )
        return outcome

    async def store(self, outcome: AuditOutcome) -> int:
        """Write the outcome's labels (one COPY); a label of higher precedence is kept."""
        if self.labels is None or not outcome.labels:
            return 0
        return await self.labels.upsert(outcome.labels)
