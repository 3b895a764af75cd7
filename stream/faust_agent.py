"""Mount the classifier in a Faust app (faust-streaming, the `faust` extra).

    import faust
    from stream.config import load_settings
    from stream.faust_agent import FaustClassifier

    app = faust.App("support-analytics", broker="kafka://broker:9092", store="memory://")
    conversations = app.topic("conversations", value_serializer="raw")
    classifications = app.topic("classifications", value_serializer="raw")
    FaustClassifier(load_settings("flexor.yaml")).agent(app, conversations, classifications)

The agent takes conversation.v1 values in batches (`stream.take_events`), runs them through the same
pipeline and cascade as `flexor serve` (models, Postgres evidence store, questions file from the
settings) and sends one classification.v1 value per conversation, with the same event_id, key and
CloudEvents headers. Invalid values go to `dead_letters` when given (the service's DLQ headers),
else they are logged and dropped.

Delivery is Faust's own at-least-once, not the service's: Faust acknowledges a batch's events once
the agent has taken the next batch and commits acknowledged offsets every `broker_commit_interval`,
sending the outputs attached to those offsets first. A crash replays what was not committed, and the
same input gives the same event_id, so consumers dedupe as they do with the service. What the service
adds and this does not: a revision older than one already classified is classified again (not
skipped), rows are not written to `classifications`, and consumption is not paused during an outage
(a failed batch is retried here, with backoff, while Faust's buffers fill).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import faust
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from agents.pipeline import Pipeline
from agents.questions import QuestionRegistry
from agents.store import open_database
from stream.app import build_pipeline
from stream.config import Settings, redact_url
from stream.headers import classification_headers, dead_letter_headers
from stream.metrics import Metrics
from stream.schemas import InvalidEvent, build_classification, classification_event_id, decode_conversation, encode

log = logging.getLogger(__name__)

RETRIABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, KafkaError)


class FaustClassifier:
    """The pipeline, built on the first batch (models load, Postgres migrates) and kept."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry or CollectorRegistry())
        self.questions = QuestionRegistry(settings.questions_file)
        self._pool: asyncpg.Pool | None = None
        self._pipeline: Pipeline | None = None
        self._models: dict[str, str] = {}
        self._llm: Any = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> Pipeline:
        async with self._lock:
            if self._pipeline is None:
                dsn = self.settings.database_url.get_secret_value()
                self._pool = await open_database(dsn, where=redact_url(dsn))
                self._pipeline, self._models, self._llm = await build_pipeline(self.settings, self.metrics, self._pool)
        return self._pipeline

    async def aclose(self) -> None:
        close = getattr(self._llm, "aclose", None)
        if close is not None:
            await close()
        if self._pool is not None:
            await self._pool.close()

    async def classify(self, values: Sequence[bytes], sources: Sequence[dict[str, Any]], ages_s: Sequence[float]
                       ) -> list[dict[str, Any] | InvalidEvent]:
        """One classification.v1 event, or the reason it is invalid, per value."""
        pipeline = await self._ready()
        self.questions.maybe_reload()
        qset = self.questions.current
        decoded: list[Any] = []
        for raw in values:
            try:
                decoded.append(decode_conversation(raw, self.settings.limits).to_conversation())
            except InvalidEvent as e:
                decoded.append(e)
        convs = [c for c in decoded if not isinstance(c, InvalidEvent)]
        result = await pipeline.classify(convs, qset) if convs else None
        answers = iter(result.answers if result else [])
        out: list[dict[str, Any] | InvalidEvent] = []
        for item, source, age in zip(decoded, sources, ages_s, strict=True):
            if isinstance(item, InvalidEvent):
                out.append(item)
                continue
            event_id = classification_event_id(item.tenant_id, item.conversation_id, item.revision, qset.version,
                                               self._models)
            out.append(build_classification(item, next(answers), event_id=event_id, models=self._models,
                                            source=source, latency_ms=round(age * 1000)))
        return out

    def agent(
        self, app: faust.App, source: faust.TopicT, sink: faust.TopicT, dead_letters: faust.TopicT | None = None,
        max_events: int | None = None, within_s: float | None = None,
    ) -> Any:
        """Register the classifying agent on `app`; returns it."""
        max_events = max_events or self.settings.batch.max_events
        within_s = within_s or self.settings.batch.max_wait_ms / 1000
        group_id = self.settings.group_id

        async def classify_conversations(stream: faust.StreamT) -> None:
            async for events in stream.take_events(max_events, within=within_s):
                results = await self._with_retry(events)
                for ev, res in zip(events, results, strict=True):
                    m = ev.message
                    headers = list((m.headers or {}).items()) if isinstance(m.headers, dict) else list(m.headers or ())
                    if isinstance(res, InvalidEvent):
                        log.info("invalid %s/%d@%d: %s: %s", m.topic, m.partition, m.offset, res.reason.value,
                                 res.message[:200])
                        if dead_letters is not None:
                            await dead_letters.send(key=m.key, value=m.value, headers=dead_letter_headers(
                                headers, topic=m.topic, partition=m.partition, offset=m.offset, group_id=group_id,
                                reason=res.reason.value, message=res.message))
                        continue
                    await sink.send(key=res["conversation_id"].encode(), value=encode(res),
                                    headers=classification_headers(res["event_id"], res["conversation_id"], group_id,
                                                                   headers))

        return app.agent(source, name=f"{app.conf.id}.flexor-classifier")(classify_conversations)

    async def _with_retry(self, events: Sequence[Any]) -> list[dict[str, Any] | InvalidEvent]:
        values = [e.message.value for e in events]
        sources = [{"topic": e.message.topic, "partition": e.message.partition, "offset": e.message.offset}
                   for e in events]
        backoff = 0.5
        while True:
            # Faust's message timestamps are seconds.
            ages = [max(0.0, time.time() - e.message.timestamp) if e.message.timestamp else 0.0 for e in events]
            try:
                return await self.classify(values, sources, ages)
            except RETRIABLE as e:
                log.warning("faust batch failed (%s: %s); retrying in %.1f s", type(e).__name__, e, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
