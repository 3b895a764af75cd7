"""`flexor bench`: benchmarks whose goals are ratios measured side by side in one run.

--e2e      the service on the embedded broker + Postgres vs chunking + embedding alone, on the
           same conversations; then latency at a produce rate of half the measured throughput.
--compare  the seed baseline (whole conversation, two LLM calls per question) vs the cascade,
           on the same engine and conversations (agents.bench_compare).
--load     fixed-rate load for a duration: throughput, latency, lag and RSS over time
           (stream.bench_load).
Results are JSON in --report DIR (bench.json), plus Markdown and PNG where the mode has them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from agents.labelled import source_names
from stream.config import Settings, load_settings
from stream.kafka import connection_kwargs, ensure_topics, make_producer
from stream.produce import load_conversations, produce_events

EXAMPLES = Path(str(importlib.resources.files("examples")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--e2e", action="store_true", help="service throughput vs embed-only, and latency")
    mode.add_argument("--compare", action="store_true", help="seed baseline vs cascade on one LLM engine")
    mode.add_argument("--load", action="store_true", help="fixed-rate load test with lag and memory over time")
    p.add_argument("--conversations", type=Path, nargs="+", default=[EXAMPLES / "conversations.jsonl"],
                   help="JSONL(.gz) conversations (conversation.v1 or the labelled-data format)")
    p.add_argument("--questions", type=Path, default=None, help="questions file (default: examples/questions.yaml)")
    p.add_argument("--answers", type=Path, default=None, help="gold answers (--compare: for macro-F1)")
    p.add_argument("--heads", type=Path, default=None, help="trained heads directory")
    p.add_argument("--engine", default="hf-tiny", help="LLM engine spec for --compare")
    p.add_argument("--limit", type=int, default=500, help="conversations to use")
    p.add_argument("--rate", type=float, default=None, help="--load: events per second")
    p.add_argument("--duration", type=float, default=600.0, help="--load: seconds of load")
    p.add_argument("--load-factor", type=float, default=0.8,
                   help="--load without --rate: rate as a fraction of the measured capacity (1.5 = overload)")
    p.add_argument("--drain", type=float, default=60.0,
                   help="--load: seconds after the load with nothing produced, to check nothing is lost")
    p.add_argument("--report", type=Path, required=True, help="directory for bench.json (and .md / .png)")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def write_json(report: Path, data: dict[str, Any]) -> Path:
    report.mkdir(parents=True, exist_ok=True)
    path = report / "bench.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.compare:
        from agents.bench_compare import run_compare

        return run_compare(args)
    if args.load:
        from stream.bench_load import run_load

        return run_load(args)
    return run_e2e(args)


def embedded_settings(stack: Any, name: str, questions: Path | None, **extra: Any) -> Settings:
    """Settings for a benchmark on an EmbeddedStack: fresh topics and group, a short session
    timeout (Tansu admits a member after about half of it), metrics on a free loopback port."""
    suffix = uuid.uuid4().hex[:8]
    return load_settings(
        None,
        **{
            "kafka.bootstrap_servers": stack.broker.bootstrap_servers,
            "kafka.session_timeout_ms": 3000,
            "kafka.heartbeat_interval_ms": 300,
            "database_url": stack.postgres.url,
            "topics.input": f"{name}-in-{suffix}",
            "topics.output": f"{name}-out-{suffix}",
            "topics.dlq": f"{name}-dlq-{suffix}",
            "group_id": f"{name}-{suffix}",
            "questions_file": questions or EXAMPLES / "questions.yaml",
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            **extra,
        },
    )


# -- e2e --------------------------------------------------------------------------------------------


def run_e2e(args: argparse.Namespace) -> int:
    from stream.infra import EmbeddedStack

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


class _OutputWatcher:
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


async def _e2e(settings: Settings, events: list[dict[str, Any]]) -> dict[str, Any]:
    from stream.app import Running, run_service

    embed_rate = await _embed_only(settings, events)
    t = settings.topics
    await ensure_topics(settings.kafka, [t.input, t.output, t.dlq], t.partitions)
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    service = asyncio.create_task(run_service(settings, on_running=started.set_result, install_signals=False))
    running = await started
    while not (running.service.consumer and running.service.consumer.assignment()):
        if service.done():
            service.result()
        await asyncio.sleep(0.1)
    watcher = _OutputWatcher(settings)
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
        rate = throughput / 2
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
        "e2e": {
            "conversations_per_s": throughput,
            "latency_rate": rate,
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "n": len(events),
        },
        "embed_only": {"conversations_per_s": embed_rate, "n": len(events)},
        "ratios": {"e2e_vs_embed_only": throughput / embed_rate},
        "settings": {"max_events": settings.batch.max_events, "max_wait_ms": settings.batch.max_wait_ms,
                     "embedder": settings.models.embedder, "partitions": t.partitions},
    }
