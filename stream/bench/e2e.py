"""`flexor bench --e2e`: the service on the embedded broker + Postgres against chunking plus
embedding alone, on the same conversations, with embedding reuse on and off side by side.

Phases, in one run:
1. embed-only: chunking + embedding alone, in the service's batch size (no reuse cache);
2. replay, reuse on: the service (with `--heads` and `--llm` when given) classifies the
   conversations, produced at once; then latency at half that throughput, on the file's next
   `--limit` conversations (fresh text, so the reuse cache does not flatter it);
3. replay, reuse off (`models.embedding_cache_mb: 0`): the same conversations; throughput, and
   whether every answer (p_yes, evidence) is identical to phase 2's;
4. with `--revisions`: each conversation as a chat publishes it (an open revision each time a
   turn is added, then the closed one; chats interleaved), reuse on and then off: texts embedded,
   conversations/s until the last closing revision is answered, the cache's hit rate and bytes.
Each service run gets its own database and topics, so nothing (stored chunks, LLM results)
carries over from one to the next. Per-stage time shares come from `flexor_stage_seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from agents.learn.labelled import source_names
from stream.bench import embedded_settings, fresh_database, machine, model_overrides, models_described, write_json
from stream.config import Settings
from stream.dev.produce import load_conversations, produce_events
from stream.kafka import connection_kwargs, ensure_topics, make_producer

STAGES = ("embed", "store", "retrieve", "stage1", "cascade", "produce", "persist")
Key = tuple[str, int]


def run_e2e(args: argparse.Namespace) -> int:
    from stream.dev.infra import EmbeddedStack

    events = load_conversations(args.conversations[0], 2 * args.limit)
    replay, fresh = events[: args.limit], events[args.limit :]
    overrides, questions = model_overrides(args, args.report)
    with EmbeddedStack() as stack:
        result = asyncio.run(_e2e(stack, questions, overrides, replay, fresh, args.revisions))
    result["settings"].update(models_described(args))
    result["machine"] = machine()
    result["conversations"] = source_names(args.conversations)
    path = write_json(args.report, result)
    e, o, r = result["e2e"], result["embed_only"], result["replay"]
    print(
        f"e2e {e['conversations_per_s']:.1f} conv/s vs embed-only {o['conversations_per_s']:.1f} conv/s "
        f"(ratio {result['ratios']['e2e_vs_embed_only']:.2f}); latency at {e['latency_rate']:.1f}/s: "
        f"p50 {e['p50_ms']:.0f} ms, p95 {e['p95_ms']:.0f} ms; replay reuse on/off {r['throughput_ratio']:.2f}, "
        f"answers identical: {r['answers_identical']}"
    )
    if "revisions" in result:
        v = result["revisions"]
        print(
            f"revisions: reuse on/off {v['throughput_ratio']:.2f}, texts embedded {v['texts_embedded']} "
            f"vs {v['texts_single_pass']} in one pass ({v['texts_vs_single_pass']:.2f}x)"
        )
    print(f"-> {path}")
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
    """Reads the output topic; records when each (conversation, revision) first arrives, and its answers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.arrived: dict[Key, float] = {}
        self.answers: dict[Key, list[dict[str, Any]]] = {}
        self.models: dict[str, str] = {}
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
                    key = (ev["conversation_id"], ev["revision"])
                    if key not in self.arrived:
                        self.arrived[key] = now
                        self.answers[key] = ev["answers"]
                        self.models = ev["models"]

    async def wait_for(self, keys: set[Key], timeout_s: float) -> None:
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


@dataclass
class Run:
    """One service instance: its registry, output and the producer feeding it."""

    settings: Settings
    running: Any
    watcher: OutputWatcher
    producer: Any
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return float(self.running.metrics.registry.get_sample_value(name, labels or {}) or 0.0)

    async def burst(self, events: list[dict[str, Any]], done: set[Key]) -> float:
        """Produce everything at once; seconds until every key in `done` has arrived."""
        t0 = time.monotonic()
        await produce_events(self.producer, self.settings.topics.input, events)
        await self.watcher.wait_for(done, 3600)
        return max(self.watcher.arrived[k] for k in done) - t0

    async def snapshot(self) -> dict[str, Any]:
        """Stage seconds, texts embedded and the reuse cache's counters so far, once every batch
        begun has recorded its total (the last output arrives before its batch's time is)."""
        for _ in range(200):
            if self.sample("flexor_batch_size_count") == self.sample("flexor_stage_seconds_count", {"stage": "batch"}):
                break
            await asyncio.sleep(0.05)
        seconds = {s: self.sample("flexor_stage_seconds_sum", {"stage": s}) for s in (*STAGES, "batch")}
        hits = self.sample("flexor_embedding_cache_total", {"result": "hit"})
        misses = self.sample("flexor_embedding_cache_total", {"result": "miss"})
        return {
            "stage_seconds": {k: round(v, 3) for k, v in seconds.items()},
            "stage_shares": {s: round(seconds[s] / seconds["batch"], 4) if seconds["batch"] else None
                             for s in STAGES},
            "texts_embedded": int(self.sample("flexor_texts_embedded_total")),
            "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "cache_bytes": int(self.sample("flexor_embedding_cache_bytes")),
        }


@asynccontextmanager
async def running_on(settings: Settings) -> AsyncIterator[Run]:
    """The service on `settings` in this event loop, with a watcher and a producer."""
    from stream.app import Running, run_service

    await ensure_topics(settings.kafka, settings.topics)
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    service = asyncio.create_task(run_service(settings, on_running=started.set_result, install_signals=False))
    done, _ = await asyncio.wait({started, service}, return_when=asyncio.FIRST_COMPLETED)
    if service in done:
        service.result()
    running = started.result()
    while not (running.service.consumer and running.service.consumer.assignment()):
        if service.done():
            service.result()
        await asyncio.sleep(0.1)
    watcher = OutputWatcher(settings)
    await watcher.start()
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        yield Run(settings, running, watcher, producer)
    finally:
        await producer.stop()
        await watcher.stop()
        running.service.stop()
        await asyncio.gather(service, return_exceptions=True)


@asynccontextmanager
async def service_run(stack: Any, name: str, questions: Any, **overrides: Any) -> AsyncIterator[Run]:
    """A fresh service (own database, topics and group), as `running_on`."""
    database = await fresh_database(stack.postgres.url, name)
    async with running_on(embedded_settings(stack, name, questions, database_url=database, **overrides)) as run:
        yield run


async def measure_service(
    settings: Settings, events: list[dict[str, Any]], latency_rate: float | None = None
) -> tuple[dict[str, Any], Any]:
    """The service on `settings`: throughput with every event produced at once, then latency on
    new revisions produced at `latency_rate` (default: half the measured throughput). Returns the
    measures and the service's metrics registry."""
    async with running_on(settings) as run:
        throughput = len(events) / await run.burst(events, keys_of(events))
        rate = latency_rate or throughput / 2
        second = [dict(e, revision=e["revision"] + 1, event_id=f"{e['event_id']}:r2") for e in events]
        sent = await produce_events(run.producer, settings.topics.input, second, rate=rate)
        keys2 = [(e["conversation_id"], e["revision"]) for e in second]
        await run.watcher.wait_for(set(keys2), 1800)
        lat = np.array([(run.watcher.arrived[k] - s) * 1000 for k, s in zip(keys2, sent, strict=True)])
    return {
        "conversations_per_s": throughput,
        "latency_rate": rate,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "n": len(events),
    }, run.running.metrics.registry


def keys_of(events: list[dict[str, Any]]) -> set[Key]:
    return {(e["conversation_id"], e["revision"]) for e in events}


def chat_revisions(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], set[Key]]:
    """Each conversation as a chat publishes it: an open revision each time a turn is added, then
    the closed one with every turn; the chats interleave (round k holds every chat's k-th event).
    Returns the events and the keys of the closing revisions."""
    chats = []
    for e in events:
        turns = e["turns"]
        revs = [
            dict(e, event_id=f"{e['event_id']}:open{k}", revision=k, status="open", turns=turns[:k])
            for k in range(1, len(turns) + 1)
        ]
        revs.append(dict(e, event_id=f"{e['event_id']}:closed", revision=len(turns) + 1, status="closed"))
        chats.append(revs)
    out = [chat[k] for k in range(max(map(len, chats))) for chat in chats if k < len(chat)]
    return out, {(c[-1]["conversation_id"], c[-1]["revision"]) for c in chats}


def single_pass_texts(events: list[dict[str, Any]]) -> int:
    """Chunks of the final conversations: what one pass over them embeds without reuse."""
    from agents.chunking import Turn, chunk_turns

    return sum(
        len(chunk_turns([Turn(t["turn_id"], t["speaker"], t["text"]) for t in e["turns"]])) for e in events
    )


async def _e2e(
    stack: Any,
    questions: Any,
    overrides: dict[str, Any],
    replay: list[dict[str, Any]],
    fresh: list[dict[str, Any]],
    revisions: bool,
) -> dict[str, Any]:
    base = embedded_settings(stack, "bench", questions, **overrides)
    embed_rate = await _embed_only(base, replay)
    result: dict[str, Any] = {}

    # Replay with reuse on: throughput, then latency at half of it on conversations not seen yet.
    async with service_run(stack, "replay-on", questions, **overrides) as on:
        seconds = await on.burst(replay, keys_of(replay))
        throughput = len(replay) / seconds
        shares_on = await on.snapshot()
        latency_events = fresh or [dict(e, revision=e["revision"] + 1, event_id=f"{e['event_id']}:r2") for e in replay]
        rate = throughput / 2
        sent = await produce_events(on.producer, on.settings.topics.input, latency_events, rate=rate)
        keys2 = [(e["conversation_id"], e["revision"]) for e in latency_events]
        await on.watcher.wait_for(set(keys2), 3600)
        lat = np.array([(on.watcher.arrived[k] - s) * 1000 for k, s in zip(keys2, sent, strict=True)])
        answers_on = {k: on.watcher.answers[k] for k in keys_of(replay)}
        models = on.watcher.models
    async with service_run(stack, "replay-off", questions, **{**overrides, "models.embedding_cache_mb": 0}) as off:
        seconds_off = await off.burst(replay, keys_of(replay))
        shares_off = await off.snapshot()
        answers_off = {k: off.watcher.answers[k] for k in keys_of(replay)}
    differing = sorted(f"{k[0]}@{k[1]}" for k in answers_on if answers_on[k] != answers_off[k])
    result.update(
        e2e={
            "conversations_per_s": throughput,
            "latency_rate": rate,
            "latency_fresh_conversations": bool(fresh),
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "n": len(replay),
            "answers": sum(len(a) for a in answers_on.values()),
            "decided_by": _decided_by(answers_on),
        },
        embed_only={"conversations_per_s": embed_rate, "n": len(replay)},
        ratios={"e2e_vs_embed_only": throughput / embed_rate},
        replay={
            "conversations_per_s_reuse_on": throughput,
            "conversations_per_s_reuse_off": len(replay) / seconds_off,
            "throughput_ratio": throughput / (len(replay) / seconds_off),
            "answers_identical": not differing,
            "revisions_differing": differing[:20],
            "reuse_on": shares_on,
            "reuse_off": shares_off,
        },
    )

    if revisions:
        stream, closing = chat_revisions(replay)
        runs = {}
        for name, mb in (("reuse_on", overrides.get("models.embedding_cache_mb")), ("reuse_off", 0)):
            async with service_run(stack, f"revisions-{name}", questions,
                                   **{**overrides, "models.embedding_cache_mb": mb}) as run:
                seconds = await run.burst(stream, closing)
                await run.watcher.wait_for(keys_of(stream), 600)
                runs[name] = {"conversations_per_s": len(closing) / seconds, "events_per_s": len(stream) / seconds,
                              "answers": sum(len(a) for a in run.watcher.answers.values()), **await run.snapshot()}
        single = single_pass_texts(replay)
        on_texts = runs["reuse_on"]["texts_embedded"]
        result["revisions"] = {
            "conversations": len(closing),
            "events": len(stream),
            "texts_embedded": on_texts,
            "texts_embedded_reuse_off": runs["reuse_off"]["texts_embedded"],
            "texts_single_pass": single,
            "texts_vs_single_pass": on_texts / single,
            "throughput_ratio": runs["reuse_on"]["conversations_per_s"] / runs["reuse_off"]["conversations_per_s"],
            "realtime_questions": sorted(q.id for q in _questions(questions) if "open" in q.on),
            **runs,
        }
    result["settings"] = {
        "max_events": base.batch.max_events, "max_wait_ms": base.batch.max_wait_ms,
        "embedder": base.models.embedder, "partitions": base.topics.partitions,
        "embedding_cache_mb": base.models.embedding_cache_mb, "model_ids": models,
    }
    return result


def _questions(path: Any) -> list[Any]:
    from agents.questions import load_questions

    return load_questions(path).questions


def _decided_by(answers: dict[Key, list[dict[str, Any]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in answers.values():
        for a in row:
            counts[a["decided_by"]] = counts.get(a["decided_by"], 0) + 1
    return dict(sorted(counts.items()))
