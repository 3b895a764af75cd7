"""Wiring of the answer monitors (`agents.monitor`): which ones the settings turn on, and their
results as Prometheus metrics."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import asyncpg

from agents.audit import Auditor, audit_view
from agents.cascade import LLMStage
from agents.drift import DriftMonitor, Reading, load_references
from agents.llm_stage import LLMCascadeStage
from agents.monitor import Monitor
from agents.scoring import Stage1Scorer
from agents.shadow import QuestionDiff, load_shadow
from agents.store.labels import LabelsTable
from models.embedder import Embedder
from stream.config import Settings
from stream.metrics import Metrics

log = logging.getLogger(__name__)


class MetricsSink:
    """`agents.monitor.MonitorSink` on the service's metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def drift(self, r: Reading) -> None:
        self.m.yes_rate.labels(r.question_id).set(r.yes_rate)
        if r.reference_yes_rate is not None:
            self.m.reference_yes_rate.labels(r.question_id).set(r.reference_yes_rate)
        if r.psi is not None:
            self.m.drift_psi.labels(r.question_id).set(r.psi)

    def shadow(self, d: QuestionDiff) -> None:
        if d.agree:
            self.m.shadow.labels(d.question_id, "agree").inc(d.agree)
        if d.disagree:
            self.m.shadow.labels(d.question_id, "disagree").inc(d.disagree)

    def audit(self, question_id: str, agree: int, disagree: int) -> None:
        if agree:
            self.m.audit.labels(question_id, "agree").inc(agree)
        if disagree:
            self.m.audit.labels(question_id, "disagree").inc(disagree)

    def audit_failed(self, reason: str, n: int) -> None:
        self.m.audit_failures.labels(reason).inc(n)

    def seconds(self, check: str, seconds: float) -> None:
        self.m.stage_seconds.labels(check).observe(seconds)


def build_monitor(
    settings: Settings,
    metrics: Metrics,
    embedder: Embedder,
    zero_shot: Stage1Scorer,
    heads: Mapping[str, Stage1Scorer],
    llm: LLMStage | None,
    pool: asyncpg.Pool | None,
) -> Monitor:
    """Blocking (loads the shadow heads): call it in a worker thread. Drift always runs (the
    yes-rate needs no reference; PSI needs heads whose manifest has references)."""
    m = settings.models
    references = load_references(m.heads_dir) if m.heads_dir is not None else {}
    drift = DriftMonitor(references, settings.drift.window, settings.drift.min_answers)
    shadow = load_shadow(m.shadow_heads_dir, embedder, zero_shot, heads) if m.shadow_heads_dir else None
    auditor = None
    if m.audit_rate > 0 and llm is not None:
        # The audit's own view of the stage: its failures are not published fallbacks (the
        # monitor counts them as flexor_audit_failures_total{reason="llm"}).
        view = audit_view(llm) if isinstance(llm, LLMCascadeStage) else llm
        auditor = Auditor(view, m.audit_rate, LabelsTable(pool) if pool is not None else None)
    log.info("monitors: drift (window %d, %d references), shadow heads %s, audit rate %.4f",
             settings.drift.window, len(references), shadow.version if shadow else "off", m.audit_rate)
    return Monitor(MetricsSink(metrics), drift=drift, shadow=shadow, auditor=auditor)
