"""The stage-1 scorer contract: one question, a batch of embedded conversations, P(yes) each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from agents.questions import Question
from agents.types import EmbeddedConversation


class Stage1Scorer(Protocol):
    # Recorded as the answer's `decided_by` when this scorer's answer is final.
    decided_by: str

    def p_yes(self, question: Question, convs: Sequence[EmbeddedConversation]) -> np.ndarray:
        """Calibrated P(yes) for each conversation, shape (len(convs),), float in [0, 1]."""
        ...

    def threshold(self, question: Question) -> float:
        """Decision threshold on p_yes for this question (a head may carry its own)."""
        ...

    def band(self, question: Question) -> tuple[float, float]:
        """[low, high): p_yes inside it is uncertain and goes to the LLM stage when one is configured."""
        ...
