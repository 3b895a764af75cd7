"""The stage-1 scorer contract: a whole batch at once.

A plan lists, per question, the indices of the batch's conversations it asks about. A scorer
answers the whole plan in one call, so it can compute what questions share (features, chunk
scores) once per batch and score every question with stacked matrix products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agents.questions import Question
from agents.types import EmbeddedConversation

# Per question: the indices, into the batch's conversations, of those it asks about.
Plan = Sequence[tuple[Question, Sequence[int]]]


@dataclass(frozen=True, slots=True)
class Stage1Result:
    p_yes: np.ndarray  # calibrated P(yes), aligned with the plan entry's conversation indices
    threshold: float  # decision threshold on p_yes
    band: tuple[float, float]  # [low, high): uncertain, goes to the LLM stage when one is configured
    decided_by: str  # recorded as the answer's `decided_by` when this answer is final


class Stage1Scorer(Protocol):
    def stage1(self, plan: Plan, convs: Sequence[EmbeddedConversation]) -> list[Stage1Result]:
        """One result per plan entry, in plan order; p_yes float in [0, 1]."""
        ...
