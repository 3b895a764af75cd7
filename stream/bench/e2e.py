"""`flexor bench --e2e`: the service on the embedded broker + Postgres against chunking plus
embedding alone, on the same conversations; then latency at half the measured throughput."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from agents.learn.labelled import source_names
from stream.bench import embedded_settings, machine, write_json
from stream.config import Settings
from stream.dev.produce import load_conversations, produce_events
from stream.kafka import connection_kwargs, ensure_topics, make_producer


def run_e2e(args: argparse.Namespace) -> int:
    from stream.dev.infra import EmbeddedStack

    events = load_conversations(args.conversations[0], args.limit)
    with EmbeddedStack() as stack:
        settings = embedded_settings(stack, "bench", args.questions)
        result = asyncio.run(_e2e(settings, events))
    result["machine"] = machine()
    result["conversations"] = source_names(args.conversations)
    path = write_json(args.report, result)
    e, o = result["e2e"], result["embed_only"]
    print(
        f"e2e {e['conversations_per_s']:.1f} conv/s vs embed-only {o['conversations_per_s']:.1f} conv/s "
        f"(ratio {result['ratios']['e2e_vs_embed_only']:.2f}); latency at {e['latency_rate']:.1f}/s: "
        f"p50 {e['p50_ms']:.0f} ms, p95 {e['p95_ms']:.0f} ms -> {path}"
    )
    return 0


async def _embed_only(settings: Settings, events: list[dict[str, Any]]) -> float:
    """Chunking + embedding alone, in the service's batch size, the same worker-thread path."""
    from agents.pipeline import embed_conversations
    from models.embedder import load_embedder
    from stream.schemas import decode_conversation

    embedder = await asyncio.to_thread(load_embedder, settings.models.embedder)
    convs = [decode_conversation(orjson.dumps(e), settings.limits).to_conversation() for e in events]
    size = settings.batch.max_events
    await asyncio.to_thread(embedder.embed, ["warm up"])
    t = time.perf_counter()
    for i in range(0, len(convs), size):
        await asyncio.to_thread(embed_conversations, embedder, convs[i : i + size])
    return len(convs) / (time.perf_counter() - t)


class OutputWatcher:
    """Reads the output topic and records when each (conversation, revision) first arrives."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.arrived: dict[tuple[str, int], float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self.settings.topics.output, auto_offset_reset="earliest", enable_auto_commit=False,
            group_id=f"watch-{uuid.uuid4().hex[:6]}", session_timeout_ms=3000, heartbeat_interval_ms=300,
            **connection_kwargs(self.settings.kafka),
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for msgs in batch.values():
                for m in msgs:
                    ev = orjson.loads(m.value)
                    self.arrived.setdefault((ev["conversation_id"], ev["revision"]), now)

    async def wait_for(self, keys: set[tuple[str, int]], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not keys <= self.arrived.keys():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(keys - self.arrived.keys())} events not classified in {timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()


async def measure_service(
    settings: Settings, events: list[dict[str, Any]], latency_rate: float | None = None
) -> tuple[dict[str, Any], Any]:
    """The service on `settings`: throughput with every event produced at once, then latency on
    new revisions produced at `latency_rate` (default: half the measured throughput). Returns the
    measures and the service's metrics registry."""
    from stream.app import Running, run_service

    t = settings.topics
    await ensure_topics(settings.kafka, t)
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    service = asyncio.create_task(run_service(settings, on_running=started.set_result, install_signals=False))
    running = await started
    while not (running.service.consumer and running.service.consumer.assignment()):
        if service.done():
            service.result()
        await asyncio.sleep(0.1)
    watcher = OutputWatcher(settings)
    await watcher.start()
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        # Phase 1: throughput. Everything produced at once; time until the last answer arrives.
        keys = {(e["conversation_id"], e["revision"]) for e in events}
        t0 = time.monotonic()
        await produce_events(producer, t.input, events)
        await watcher.wait_for(keys, 1800)
        throughput = len(keys) / (max(watcher.arrived[k] for k in keys) - t0)

        # Phase 2: latency at half that rate, on new revisions (a replay would be skipped).
        rate = latency_rate or throughput / 2
        second = [dict(e, revision=e["revision"] + 1, event_id=f"{e['event_id']}:r2") for e in events]
        sent = await produce_events(producer, t.input, second, rate=rate)
        keys2 = [(e["conversation_id"], e["revision"]) for e in second]
        await watcher.wait_for(set(keys2), 1800)
        lat = np.array([(watcher.arrived[k] - s) * 1000 for k, s in zip(keys2, sent, strict=True)])
    finally:
        await producer.stop()
        await watcher.stop()
        running.service.stop()
        await asyncio.gather(service, return_exceptions=True)
    return {
        "conversations_per_s": throughput,
        "latency_rate": rate,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "n": len(events),
    }, running.metrics.registry


async def _e2e(settings: Settings, events: list[dict[str, Any]]) -> dict[str, Any]:
    embed_rate = await _embed_only(settings, events)
    e2e, _ = await measure_service(settings, events)
    return {
        "e2e": e2e,
        "embed_only": {"conversations_per_s": embed_rate, "n": len(events)},
        "ratios": {"e2e_vs_embed_only": e2e["conversations_per_s"] / embed_rate},
        "settings": {"max_events": settings.batch.max_events, "max_wait_ms": settings.batch.max_wait_ms,
                     "embedder": settings.models.embedder, "partitions": settings.topics.partitions},
    }
