"""Wiring: build the pipeline and the service from settings, serve HTTP, handle signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from prometheus_client import CollectorRegistry

from agents.cascade import Cascade, LLMStage
from agents.pipeline import Pipeline
from agents.questions import QuestionRegistry
from agents.scoring import Stage1Scorer
from agents.similarity import SimilarityScorer
from agents.store import open_database
from agents.store.chunks import PgEvidenceStore
from models.embedder import Embedder, load_embedder
from stream.backfill import BackfillWorker
from stream.config import Settings, redact_url
from stream.http import make_app, start_http
from stream.kafka import ensure_topics
from stream.metrics import Metrics
from stream.service import Service

log = logging.getLogger(__name__)


@dataclass
class Running:
    service: Service
    metrics: Metrics
    http_port: int
    backfill: BackfillWorker


def load_heads(settings: Settings, embedder: Embedder) -> tuple[dict[str, Stage1Scorer], str]:
    """Trained heads by id, and a version string for the event's model ids ("none" without heads)."""
    if settings.models.heads_dir is None:
        return {}, "none"
    from agents.heads import load_heads as load

    return load(settings.models.heads_dir, embedder)


def load_llm(settings: Settings, metrics: Metrics, pool: asyncpg.Pool | None = None) -> LLMStage | None:
    """The LLM stage (blocking: loads a model; call it in a worker thread), or None when unset.

    Its result cache is shared by the replicas through `pool` (table llm_results)."""
    if not settings.models.llm:
        return None
    from agents.llm_stage import build_llm_stage

    return build_llm_stage(
        settings.models.llm,
        pool=pool,
        on_cache=lambda result, n: metrics.cache.labels(result=result).inc(n),
        on_fallback=metrics.llm_fallbacks.inc,
    )


async def _run_with_backfill(service: Service, backfill: BackfillWorker) -> None:
    """The live service and the backfill worker side by side: a stop request stops both, and a
    backfill failure stops the service too (and is raised), as a live one would."""
    task = asyncio.create_task(backfill.run(), name="backfill")
    task.add_done_callback(lambda t: service.stop() if t.cancelled() or t.exception() else None)
    try:
        await service.run()
    finally:
        backfill.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=30)
        except TimeoutError:
            log.warning("backfill item in hand did not finish within 30 s: abandoned uncommitted")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def build_pipeline(
    settings: Settings, metrics: Metrics, pool: asyncpg.Pool
) -> tuple[Pipeline, dict[str, str], LLMStage | None]:
    """The pipeline and cascade the settings describe (models load in worker threads), the model
    ids that go into every event, and the LLM stage (to close) if there is one."""
    embedder = await asyncio.to_thread(load_embedder, settings.models.embedder)
    heads, heads_version = await asyncio.to_thread(load_heads, settings, embedder)
    llm = await asyncio.to_thread(load_llm, settings, metrics, pool)
    cascade = Cascade(SimilarityScorer(embedder), heads, llm)
    pipeline = Pipeline(embedder, PgEvidenceStore(pool), cascade)
    models = {"embedder": embedder.model_id, "heads": heads_version, "llm": llm.model_id if llm else "none"}
    return pipeline, models, llm


async def run_service(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    on_running: Callable[[Running], Awaitable[None] | None] | None = None,
    install_signals: bool = True,
    create_topics: bool = False,
) -> None:
    registry = registry or CollectorRegistry()
    metrics = Metrics(registry)
    questions = QuestionRegistry(settings.questions_file)
    dsn = settings.database_url.get_secret_value()
    pool = await open_database(dsn, where=redact_url(dsn))
    try:
        if create_topics:
            t = settings.topics
            await ensure_topics(settings.kafka, [t.input, t.output, t.dlq, t.backfill], t.partitions)
        pipeline, models, llm = await build_pipeline(settings, metrics, pool)
        service = Service(settings, pipeline, questions, pool, metrics, models)
        backfill = BackfillWorker(settings, pipeline, questions, pool, metrics, models)

        app = make_app(registry, lambda: {"kafka": service.kafka_ok, "postgres": service.postgres_ok})
        runner, port = await start_http(app, settings.metrics_host, settings.metrics_port)
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, service.stop)
            loop.add_signal_handler(signal.SIGHUP, questions.reload)
        log.info("service starting: metrics on http://%s:%d/metrics", settings.metrics_host, port)
        try:
            if on_running is not None:
                result = on_running(Running(service, metrics, port, backfill))
                if asyncio.iscoroutine(result):
                    await result
            await _run_with_backfill(service, backfill)
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await runner.cleanup()
            close = getattr(llm, "aclose", None)
            if close is not None:
                await close()
    finally:
        await pool.close()
