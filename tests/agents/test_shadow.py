"""The shadow comparison (agents/shadow.py); its service and CLI use is in tests/stream/test_monitoring.py."""

from __future__ import annotations

import numpy as np
import pytest

from agents.cascade import Stage1Result
from agents.questions import Question
from agents.shadow import candidate_cascade, compare

Q = Question(id="refund", version=1, text="Did the customer ask for a refund?", head="refund")


def test_compare_counts_answers_at_each_sides_own_threshold() -> None:
    live = Stage1Result(np.array([0.1, 0.45, 0.6, 0.9]), 0.5, (0.3, 0.7), "head")
    # the candidate's threshold is 0.4: 0.45 is a yes there, a no on the live side
    cand = Stage1Result(np.array([0.2, 0.45, 0.3, 0.95]), 0.4, (0.3, 0.6), "head")
    d = compare(Q, live, cand)
    assert (d.n, d.agree, d.disagree, d.live_yes, d.candidate_yes) == (4, 2, 2, 2, 2)
    assert d.agreement == 0.5
    assert d.mean_abs_dp == pytest.approx((0.1 + 0.0 + 0.3 + 0.05) / 4)


def test_a_head_the_candidate_lacks_takes_the_zero_shot_path() -> None:
    zero_shot = object()
    cascade, version = candidate_cascade(None, embedder=None, zero_shot=zero_shot,  # type: ignore[arg-type]
                                         live_heads={"refund": object()})
    assert version == "none"
    assert cascade.scorer_for(Q) is zero_shot
    assert cascade.llm is None  # shadow answers never reach the LLM
