"""The checks that tell whether answers stay right, run on every classified batch once it is
published: drift (`agents.drift`), shadow heads (`agents.shadow`) and audit sampling
(`agents.audit`). None of them changes a published answer.

Drift is a few numpy operations and runs at once. Shadow scoring (a worker thread) and the audit
(an LLM call, then a labels upsert) run in the background while the service goes on with the
next batch; `submit` first waits for the previous batch's checks, so they never fall more than
one batch behind and their cost shows up as throughput, not as a growing backlog. A failing
check is logged and counted; it never fails a batch.

Results go to a `MonitorSink` (`stream.monitoring` wires it to Prometheus): `agents` knows
nothing of metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from agents.audit import Auditor
from agents.drift import DriftMonitor, Reading
from agents.pipeline import BatchResult
from agents.questions import QuestionSet
from agents.shadow import QuestionDiff, ShadowHeads
from agents.types import Conversation

log = logging.getLogger(__name__)


class MonitorSink(Protocol):
    def drift(self, reading: Reading) -> None: ...

    def shadow(self, diff: QuestionDiff) -> None: ...

    def audit(self, question_id: str, agree: int, disagree: int) -> None: ...

    def audit_failed(self, reason: str, n: int) -> None: ...

    def seconds(self, check: str, seconds: float) -> None: ...


class Monitor:
    def __init__(
        self,
        sink: MonitorSink,
        *,
        drift: DriftMonitor | None = None,
        shadow: ShadowHeads | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self.sink = sink
        self.drift = drift
        self.shadow = shadow
        self.auditor = auditor
        self._pending: asyncio.Task[None] | None = None

    async def submit(
        self, keys: Sequence[str], convs: Sequence[Conversation], result: BatchResult, questions: QuestionSet
    ) -> None:
        """Checks for one published batch; `keys` are the events' ids (the audit samples by them)."""
        await self.drain()
        if self.drift is not None:
            try:
                for q, _, s1 in result.stage1:
                    self.sink.drift(self.drift.observe(q, s1.p_yes, s1.threshold, s1.decided_by))
            except Exception:
                log.exception("drift check failed on a batch")
        if self.shadow is not None or self.auditor is not None:
            self._pending = asyncio.create_task(self._background(keys, convs, result, questions), name="monitor")

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait for the checks in progress (at shutdown: at most `timeout` seconds, then drop them)."""
        task, self._pending = self._pending, None
        if task is None:
            return
        try:
            await asyncio.wait_for(task, timeout)
        except TimeoutError:
            log.warning("monitoring checks still running after %.0f s: dropped", timeout)
        except Exception:  # a monitor's bug must not stop the stream
            log.exception("monitoring checks failed on a batch")

    async def _background(
        self, keys: Sequence[str], convs: Sequence[Conversation], result: BatchResult, questions: QuestionSet
    ) -> None:
        await asyncio.gather(self._shadow(result), self._audit(keys, convs, result, questions))

    async def _shadow(self, result: BatchResult) -> None:
        if self.shadow is None or not result.stage1:
            return
        t = time.perf_counter()
        try:
            diffs = await asyncio.to_thread(self.shadow.compare, result.stage1, result.embedded)
        except Exception:
            log.exception("shadow heads failed on a batch")
            return
        self.sink.seconds("shadow", time.perf_counter() - t)
        for d in diffs:
            self.sink.shadow(d)

    async def _audit(
        self, keys: Sequence[str], convs: Sequence[Conversation], result: BatchResult, questions: QuestionSet
    ) -> None:
        if self.auditor is None:
            return
        chosen = self.auditor.select(keys, convs, result.answers, questions)
        if not chosen:
            return
        t = time.perf_counter()
        try:
            outcome = await self.auditor.score(chosen)
        except Exception:
            log.exception("audit failed on a batch")
            self.sink.audit_failed("error", len(chosen))
            return
        for qid in sorted(set(outcome.agree) | set(outcome.disagree)):
            self.sink.audit(qid, outcome.agree[qid], outcome.disagree[qid])
        if outcome.failed:
            self.sink.audit_failed("llm", outcome.failed)
        try:
            await self.auditor.store(outcome)
        except Exception as e:  # Postgres unreachable: the labels of this batch are lost, nothing else
            log.warning("audit labels not stored (%s: %s)", type(e).__name__, e)
            self.sink.audit_failed("store", len(outcome.labels))
        self.sink.seconds("audit", time.perf_counter() - t)
