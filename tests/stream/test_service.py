"""The service end to end on the real broker and Postgres: delivery, evidence, DLQ, restarts."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.chunking import Turn, transcript
from stream.config import Settings
from stream.dev.produce import load_conversations
from tests.conftest import EXAMPLES, REPO, shared_file
from tests.harness import (
    check_delivery,
    classification_rows,
    committed,
    count_rows,
    create_topics,
    kill9,
    produce,
    read_topic,
    revision_key,
    running_service,
    start_serve,
    wait_until,
)


def _shared_questions(tmp_path: Path) -> Path:
    """The labelled data's questions as a questions.yaml (text and dataset selector only)."""
    import json

    import yaml

    qs = json.loads(shared_file("questions.json").read_text())
    out = tmp_path / "questions.yaml"
    out.write_text(yaml.safe_dump({"questions": [
        {"id": q["question_id"], "version": 1, "text": q["question"], "applies_to": {"dataset": q["dataset"]}}
        for q in qs
    ]}))
    return out


@pytest.mark.slow
async def test_star_conversations_four_partitions(settings: Settings, tmp_path: Path) -> None:
    path = shared_file("star.jsonl.gz")  # skips, with a message, where the labelled data is absent
    settings = settings.model_copy(update={"questions_file": _shared_questions(tmp_path)})
    inputs = load_conversations(path, 500)
    by_key = {revision_key(e): e for e in inputs}
    await create_topics(settings)
    async with running_service(settings) as running:
        await produce(settings, inputs)
        await wait_until(lambda: _rows_at_least(settings, len(by_key)), 600, "all classifications")
        metrics = running.metrics.registry
        assert metrics.get_sample_value("flexor_conversations_classified_total") == len(by_key)
    events = await check_delivery(settings, inputs)

    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        chunks = {
            r["chunk_id"]: r
            for r in await conn.fetch("SELECT chunk_id, text, char_start, char_end, turn_ids FROM chunks")
        }
    finally:
        await conn.close()
    n_evidence = 0
    for ev in events:
        src = by_key[revision_key(ev)]
        full = transcript([Turn(t["turn_id"], t["speaker"], t["text"]) for t in src["turns"]])
        assert ev["answers"], "every conversation answers at least one question"
        for a in ev["answers"]:
            assert a["evidence"], f"{a['question_id']} has no evidence"
            for e in a["evidence"]:
                stored = chunks[e["chunk_id"]]
                assert e["text"] == stored["text"] == full[e["char_start"] : e["char_end"]]
                assert (e["char_start"], e["char_end"]) == (stored["char_start"], stored["char_end"])
                assert e["turn_ids"] == list(stored["turn_ids"])
                n_evidence += 1
    assert n_evidence >= len(events)


async def _rows_at_least(settings: Settings, n: int) -> bool:
    return await count_rows(settings) >= n


BAD_EVENTS: dict[str, bytes] = {
    "not_json": b"{not json",
    "not_object": b"[1, 2, 3]",
    "unknown_schema": orjson.dumps({"schema": "conversation.v0", "event_id": "x"}),
    "invalid_fields": orjson.dumps(
        {"schema": "conversation.v1", "event_id": "e", "tenant_id": "t", "conversation_id": "c",
         "revision": "three", "turns": [{"turn_id": "t1", "speaker": "customer", "text": "hi"}]}
    ),
    "empty_turns": orjson.dumps(
        {"schema": "conversation.v1", "event_id": "e", "tenant_id": "t", "conversation_id": "c",
         "revision": 1, "turns": []}
    ),
    "text_too_long": orjson.dumps(
        {"schema": "conversation.v1", "event_id": "e", "tenant_id": "t", "conversation_id": "c",
         "revision": 1, "turns": [{"turn_id": "t1", "speaker": "customer", "text": "x" * 30_000}]}
    ),
    "too_large": b'{"schema": "conversation.v1", "pad": "' + b"y" * 1_200_000 + b'"}',
}


async def test_dlq_mixed_stream(settings: Settings) -> None:
    good = load_conversations(EXAMPLES / "conversations.jsonl", 30)
    stream: list[Any] = []
    bad = list(BAD_EVENTS.values())
    for i, ev in enumerate(good):
        stream.append(ev)
        if i < len(bad):
            stream.append(bad[i])
    await create_topics(settings)
    async with running_service(settings) as running:
        await produce(settings, stream)
        await wait_until(lambda: _rows_at_least(settings, len(good)), 300, "good events classified")

        async def dlq_done() -> bool:
            total = sum(
                running.metrics.registry.get_sample_value("flexor_dlq_events_total", {"reason": r}) or 0
                for r in BAD_EVENTS
            )
            return total == len(BAD_EVENTS)

        await wait_until(dlq_done, 60, "every bad event in the DLQ")

        async def all_committed() -> bool:
            pos = await committed(settings)
            return sum(pos.values()) == len(stream)

        await wait_until(all_committed, 30, "offsets committed to the end of every partition")
    dlq = await read_topic(settings, settings.topics.dlq)
    reasons = {dict(r.headers)["error.reason"].decode(): r for r in dlq}
    assert set(reasons) == set(BAD_EVENTS)
    for reason, rec in reasons.items():
        h = dict(rec.headers)
        if reason == "too_large":  # kept up to the event limit, with the original size in a header
            assert BAD_EVENTS[reason].startswith(rec.value)
            assert int(h["error.truncated_from"]) == len(BAD_EVENTS[reason])
        else:
            assert rec.value == BAD_EVENTS[reason], "the DLQ keeps the original bytes"
        assert h["source.topic"].decode() == settings.topics.input
        assert h["error.message"]
    await check_delivery(settings, good)


async def test_revisions_replays_and_http(settings: Settings) -> None:
    events = load_conversations(EXAMPLES / "conversations.jsonl", 10)
    await create_topics(settings)
    async with running_service(settings) as running:
        await produce(settings, events)
        await wait_until(lambda: _rows_at_least(settings, len(events)), 120, "first pass")
        first = await read_topic(settings, settings.topics.output)

        # An exact replay and an older revision are acknowledged without new output;
        # a newer revision is classified.
        newer = dict(events[0], revision=events[0]["revision"] + 1, event_id="newer")
        older = dict(events[1], revision=events[1]["revision"] - 1, event_id="older")
        await produce(settings, [events[2], older, newer])
        await wait_until(lambda: _rows_at_least(settings, len(events) + 1), 60, "newer revision")

        async def skipped() -> bool:
            reg = running.metrics.registry
            return (reg.get_sample_value("flexor_events_skipped_total", {"reason": "duplicate"}) == 1
                    and reg.get_sample_value("flexor_events_skipped_total", {"reason": "stale_revision"}) == 1)

        await wait_until(skipped, 30, "replay and stale revision skipped")
        outputs = await read_topic(settings, settings.topics.output)
        assert len(outputs) == len(first) + 1

        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{running.http_port}"
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200

            async def ready() -> bool:
                async with http.get(f"{base}/readyz") as r:
                    return r.status == 200

            await wait_until(ready, 10, "/readyz")
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
    # /metrics as a scraper reads it: sample values, not just the names (prometheus_client prints
    # HELP and TYPE lines for metrics that have no samples at all).
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(name: str) -> float:
        return sum(v for (n, _), v in samples.items() if n == name)

    inputs = len(events) + 3
    assert value("flexor_events_consumed_total", topic=settings.topics.input) == inputs
    assert value("flexor_batch_size_sum") == inputs and value("flexor_batch_size_count") >= 2
    assert value("flexor_conversations_classified_total") == len(events) + 1
    published = [orjson.loads(r.value) for r in outputs]
    assert total("flexor_answers_total") == sum(len(ev["answers"]) for ev in published)
    yes = sum(a["answer"] == "yes" for ev in published for a in ev["answers"] if a["question_id"] == "refund_request")
    assert value("flexor_answers_total", question_id="refund_request", answer="yes", decided_by="similarity") == yes
    for stage in ("embed", "store", "retrieve", "stage1", "cascade", "classify", "produce", "persist", "batch"):
        assert value("flexor_stage_seconds_count", stage=stage) >= 1, stage
        assert value("flexor_stage_seconds_sum", stage=stage) > 0, stage
    assert value("flexor_stage_seconds_count", stage="batch") == value("flexor_batch_size_count")
    assert value("flexor_in_flight_events") == 0
    assert total("flexor_consumer_lag") == 0 and sum(n == "flexor_consumer_lag" for n, _ in samples) >= 1
    assert value("flexor_commits_total", result="ok") >= 2
    assert total("flexor_dlq_events_total") == 0
    assert value("flexor_ready") == 1

    # The README says what the service does: its stage labels and the models in its event example.
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `flexor_stage_seconds`"))
    documented = set(re.findall(r"`([a-z0-9]+)`", row.split("|")[3].split("(", 1)[1]))
    observed = {dict(labels)["stage"] for name, labels in samples if name == "flexor_stage_seconds_count"}
    # commit: exactly-once mode only; audit and shadow: with audit sampling or shadow heads on;
    # backfill: while a backfill work item is answered
    assert documented - observed == {"commit", "audit", "shadow", "backfill"} and observed <= documented
    example = orjson.loads(re.search(r'"models": (\{[^}]*\})', readme).group(1))  # type: ignore[union-attr]
    assert example == published[0]["models"]
    await check_delivery(settings, events[3:] + [events[2], newer] + events[:2])


async def test_revisions_out_of_order_in_one_batch_only_the_newest_publishes(settings: Settings) -> None:
    base = load_conversations(EXAMPLES / "conversations.jsonl", 2)
    a, b = base
    assert a["conversation_id"] != b["conversation_id"]
    stream = [
        dict(a, revision=3, event_id="a3"), dict(a, revision=2, event_id="a2"),  # out of order: 2 is stale
        dict(b, revision=1, event_id="b1"), dict(b, revision=2, event_id="b2"),  # in order: both publish
    ]
    await create_topics(settings)
    async with running_service(settings) as running:
        await produce(settings, stream)  # one request, one partition per conversation: one batch

        async def all_committed() -> bool:
            return sum((await committed(settings)).values()) == len(stream)

        await wait_until(all_committed, 120, "the four records acknowledged")
        reg = running.metrics.registry
        assert reg.get_sample_value("flexor_batch_size_count") == 1, "the test needs the four in one batch"
        assert reg.get_sample_value("flexor_events_skipped_total", {"reason": "stale_revision"}) == 1
        assert reg.get_sample_value("flexor_conversations_classified_total") == 3
    published = sorted((orjson.loads(r.value)["conversation_id"], orjson.loads(r.value)["revision"])
                       for r in await read_topic(settings, settings.topics.output))
    assert published == sorted([(a["conversation_id"], 3), (b["conversation_id"], 1), (b["conversation_id"], 2)])
    await check_delivery(settings, [stream[0], *stream[2:]])


async def test_decode_and_the_questions_check_run_off_the_event_loop(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of large events decodes for tens of milliseconds, and the questions check reads a
    file: both in worker threads, so polling and heartbeats go on."""
    import threading

    import stream.service
    from agents.questions import QuestionRegistry

    threads: dict[str, set[str]] = {"decode": set(), "questions": set()}
    decode, maybe_reload = stream.service.decode_batch, QuestionRegistry.maybe_reload

    def spy_decode(*args: Any) -> Any:
        threads["decode"].add(threading.current_thread().name)
        return decode(*args)

    def spy_reload(self: QuestionRegistry) -> bool:
        threads["questions"].add(threading.current_thread().name)
        return maybe_reload(self)

    monkeypatch.setattr(stream.service, "decode_batch", spy_decode)
    monkeypatch.setattr(QuestionRegistry, "maybe_reload", spy_reload)
    events = load_conversations(EXAMPLES / "conversations.jsonl", 4)
    await create_topics(settings)
    async with running_service(settings):
        await produce(settings, events)
        await wait_until(lambda: _rows_at_least(settings, len(events)), 120, "classification")
    loop_thread = threading.current_thread().name  # the service ran on this test's event loop
    assert threads["decode"] and threads["questions"]
    assert loop_thread not in threads["decode"] | threads["questions"], threads


@pytest.mark.slow
async def test_cancel_mid_stream_then_restart(settings: Settings) -> None:
    inputs = load_conversations(EXAMPLES / "conversations.jsonl")
    await create_topics(settings)
    await produce(settings, inputs)
    async with running_service(settings.model_copy(update={"batch": settings.batch.model_copy(
            update={"max_events": 8})})):
        await wait_until(lambda: _rows_at_least(settings, 10), 120, "some progress")
    # Committed offsets never pass unfinished work, even when stopped mid-stream.
    rows = await classification_rows(settings)
    done = {(r["partition"], r["offset"]) for r in rows}
    for p, pos in (await committed(settings)).items():
        assert all((p, o) in done for o in range(pos))
    assert len(rows) < len({revision_key(e) for e in inputs}), "stopped before the end"
    async with running_service(settings):
        await wait_until(lambda: _rows_at_least(settings, len({revision_key(e) for e in inputs})), 300, "the rest")
    await check_delivery(settings, inputs)


@pytest.mark.slow
async def test_kill9_subprocess_then_restart(settings: Settings, tmp_path: Path) -> None:
    inputs = load_conversations(EXAMPLES / "conversations.jsonl")
    await create_topics(settings)
    await produce(settings, inputs)
    settings = settings.model_copy(update={"batch": settings.batch.model_copy(update={"max_events": 8})})
    proc = start_serve(settings, tmp_path / "serve1.log")
    try:
        await wait_until(lambda: _rows_at_least(settings, 10), 180, "some progress before the kill")
    finally:
        kill9(proc)
    before = await count_rows(settings)
    assert before < len({revision_key(e) for e in inputs})
    rows = await classification_rows(settings)
    done = {(r["partition"], r["offset"]) for r in rows}
    for p, pos in (await committed(settings)).items():
        assert all((p, o) in done for o in range(pos)), "committed past unfinished work"
    proc = start_serve(settings, tmp_path / "serve2.log")
    try:
        await wait_until(lambda: _rows_at_least(settings, len({revision_key(e) for e in inputs})), 300, "recovery")
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
    assert proc.returncode == 0, (tmp_path / "serve2.log").read_text()[-2000:]
    await check_delivery(settings, inputs)
