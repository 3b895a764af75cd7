"""Shadow heads: a candidate set of heads scores every conversation beside the live ones.

Its answers are never published. Per question, the candidate's stage-1 answer is compared with
the live stage-1 answer on the same conversations (the LLM plays no part on either side, so the
comparison measures the heads alone); `flexor heads diff` runs the same comparison offline.
Promoting the candidate is a config change: point `models.heads_dir` at its directory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agents.cascade import Cascade, Stage1Result
from agents.questions import Question
from agents.scoring import Stage1Scorer
from agents.types import EmbeddedConversation
from models.embedder import Embedder

log = logging.getLogger(__name__)

Stage1Plan = Sequence[tuple[Question, Sequence[int], Stage1Result]]  # what `Pipeline` computed per question


@dataclass(frozen=True)
class QuestionDiff:
    question_id: str
    n: int
    agree: int
    live_yes: int
    candidate_yes: int
    mean_abs_dp: float  # mean |p_yes(candidate) - p_yes(live)|

    @property
    def disagree(self) -> int:
        return self.n - self.agree

    @property
    def agreement(self) -> float:
        return self.agree / self.n if self.n else 1.0


def compare(question: Question, live: Stage1Result, candidate: Stage1Result) -> QuestionDiff:
    a = live.p_yes >= live.threshold
    b = candidate.p_yes >= candidate.threshold
    dp = float(np.mean(np.abs(candidate.p_yes - live.p_yes))) if len(a) else 0.0
    return QuestionDiff(question.id, len(a), int(np.sum(a == b)), int(a.sum()), int(b.sum()), dp)


class ShadowHeads:
    """The candidate's stage 1: the candidate heads, zero-shot for questions it has no head for."""

    def __init__(self, cascade: Cascade, version: str) -> None:
        self.cascade = cascade
        self.version = version

    def compare(self, live: Stage1Plan, embedded: Sequence[EmbeddedConversation]) -> list[QuestionDiff]:
        """Blocking numpy work: run it in a worker thread."""
        candidate = self.cascade.stage1([(q, idx) for q, idx, _ in live], embedded)
        return [compare(q, s1, cand) for (q, _, s1), cand in zip(live, candidate, strict=True)]


def candidate_cascade(
    heads_dir: str | Path | None, embedder: Embedder, zero_shot: Stage1Scorer, live_heads: Mapping[str, object]
) -> tuple[Cascade, str]:
    """A Cascade (stage 1 only) over the heads in `heads_dir` (None: zero-shot for every question),
    and their version. A head id in `live_heads` that `heads_dir` lacks maps to zero-shot
    explicitly: that is what promoting the candidate would do, and it spares a warning per batch."""
    heads: dict[str, Stage1Scorer] = {}
    version = "none"
    if heads_dir is not None:
        from agents.heads import load_heads

        heads, version = load_heads(heads_dir, embedder)
    missing = sorted(set(live_heads) - set(heads))
    if missing and heads_dir is not None:
        log.warning("candidate heads in %s lack %s: those questions take the zero-shot path there",
                    heads_dir, ", ".join(missing))
    return Cascade(zero_shot, {**dict.fromkeys(missing, zero_shot), **heads}), version


def load_shadow(
    heads_dir: str | Path, embedder: Embedder, zero_shot: Stage1Scorer, live_heads: Mapping[str, object]
) -> ShadowHeads:
    """Blocking (reads the heads, embeds the feature bank): call it in a worker thread."""
    cascade, version = candidate_cascade(heads_dir, embedder, zero_shot, live_heads)
    return ShadowHeads(cascade, version)
