"""A failing monitor never fails the batch it checks (agents/monitor.py)."""

from __future__ import annotations

import numpy as np

from agents.cascade import Cascade, Stage1Result
from agents.drift import DriftMonitor
from agents.monitor import Monitor
from agents.pipeline import BatchResult
from agents.questions import Question, QuestionSet
from agents.shadow import ShadowHeads

Q = Question(id="refund", version=1, text="Did the customer ask for a refund?")


class BrokenSink:
    """Every report raises, as a bug in the metrics wiring would."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, *args: object) -> None:
        self.calls += 1
        raise RuntimeError("sink is broken")

    drift = shadow = audit = audit_failed = seconds = _fail


async def test_a_broken_sink_or_scorer_does_not_fail_the_batch() -> None:
    sink = BrokenSink()
    # a candidate whose stage 1 cannot score (no zero-shot scorer): the shadow check raises inside
    monitor = Monitor(sink, drift=DriftMonitor({}, window=10, min_answers=1),
                      shadow=ShadowHeads(Cascade(zero_shot=None), "broken"))  # type: ignore[arg-type]
    result = BatchResult([[]], [], [(Q, [0], Stage1Result(np.array([0.7]), 0.5, (0.35, 0.65), "similarity"))])
    for _ in range(2):  # the second submit waits for the first batch's (failed) checks
        await monitor.submit(["e1"], [], result, QuestionSet(questions=[Q]))
    await monitor.drain()
    assert sink.calls == 2  # drift reported (and failed) once per batch
