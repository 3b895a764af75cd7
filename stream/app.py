"""Wiring: build the pipeline and the service from settings, serve HTTP, handle signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from prometheus_client import CollectorRegistry

from agents.cascade import Cascade, LLMStage
from agents.embedding_cache import EmbeddingCache
from agents.pipeline import Pipeline
from agents.questions import QuestionRegistry
from agents.scoring import Stage1Scorer
from agents.similarity import SimilarityScorer
from agents.store import open_database
from agents.store.chunks import PgEvidenceStore
from models.embedder import Embedder, load_embedder
from stream.backfill import BackfillWorker
from stream.config import Settings, redact_url
from stream.feedback import FeedbackConsumer
from stream.http import make_app, start_http
from stream.kafka import ensure_topics
from stream.metrics import Metrics
from stream.monitoring import build_monitor
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

    m = settings.models
    return build_llm_stage(
        m.llm,
        engine_options={"device": m.device, "dtype": m.dtype} if m.llm.startswith("hf") else None,
        pool=pool,
        on_cache=lambda result, n: metrics.cache.labels(result=result).inc(n),
        on_fallback=metrics.llm_fallbacks.inc,
    )


async def build_pipeline(
    settings: Settings, metrics: Metrics, pool: asyncpg.Pool
) -> tuple[Pipeline, dict[str, str], LLMStage | None]:
    """The pipeline and cascade the settings describe (models load in worker threads), the model
    ids that go into every event, and the LLM stage (to close) if there is one."""
    m = settings.models
    embedder = await asyncio.to_thread(load_embedder, m.embedder, m.device, m.dtype)
    heads, heads_version = await asyncio.to_thread(load_heads, settings, embedder)
    llm = await asyncio.to_thread(load_llm, settings, metrics, pool)
    cascade = Cascade(SimilarityScorer(embedder), heads, llm)
    cache = EmbeddingCache(m.embedding_cache_mb * 2**20) if m.embedding_cache_mb else None
    if cache is not None:
        metrics.embedding_cache_bytes.set_function(lambda: cache.bytes)

    def on_embed(texts: int, embedded: int) -> None:
        metrics.texts_embedded.inc(embedded)
        if cache is not None:
            metrics.embedding_cache.labels("hit").inc(texts - embedded)
            metrics.embedding_cache.labels("miss").inc(embedded)

    pipeline = Pipeline(embedder, PgEvidenceStore(pool), cascade, cache=cache, on_embed=on_embed)
    models = {"embedder": embedder.model_id, "heads": heads_version, "llm": llm.model_id if llm else "none"}
    return pipeline, models, llm


async def _run_beside(service: Service, workers: Sequence[FeedbackConsumer | BackfillWorker]) -> None:
    """The live service with its side workers (the feedback consumer, the backfill worker): a stop
    request stops them all, and a worker failing stops the service too and is raised."""
    tasks = [asyncio.create_task(w.run(), name=type(w).__name__) for w in workers]
    for task in tasks:
        task.add_done_callback(lambda t: service.stop() if not t.cancelled() and t.exception() else None)
    try:
        await service.run()
    finally:
        for w in workers:
            w.stop()
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            log.warning("%s did not finish its work in hand within 30 s: abandoned uncommitted", task.get_name())
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


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
            await ensure_topics(settings.kafka, settings.topics)
        pipeline, models, llm = await build_pipeline(settings, metrics, pool)
        cascade = pipeline.cascade
        monitor = await asyncio.to_thread(
            build_monitor, settings, metrics, pipeline.embedder, cascade.zero_shot, cascade.heads, llm, pool
        )
        service = Service(settings, pipeline, questions, pool, metrics, models, monitor)
        backfill = BackfillWorker(settings, pipeline, questions, pool, metrics, models)

        app = make_app(registry, service.readiness)
        runner, port = await start_http(app, settings.metrics_host, settings.metrics_port)
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, service.stop)
            # The reload reads and parses a file: off the event loop.
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, questions.reload))
        log.info("service starting: metrics on http://%s:%d/metrics", settings.metrics_host, port)
        try:
            if on_running is not None:
                result = on_running(Running(service, metrics, port, backfill))
                if asyncio.iscoroutine(result):
                    await result
            await _run_beside(service, [FeedbackConsumer(settings, pool, metrics), backfill])
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
