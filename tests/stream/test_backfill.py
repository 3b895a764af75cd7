"""Backfill on the real broker and Postgres: conversations classified under one question set get,
after a question is added, exactly one more event_id per revision (the new question set's), with
the earlier answers carried over and the new question answered as a fresh classification would
answer it; a rerun adds nothing, and a replica killed mid-job loses nothing."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml

from agents.cascade import Cascade
from agents.pipeline import Pipeline
from agents.questions import QuestionSet, load_questions
from agents.similarity import SimilarityScorer
from agents.store import create_pool
from agents.store.backfill import BackfillJobs
from agents.store.chunks import PgEvidenceStore
from stream.backfill import Pacer, decode_item, encode_item
from stream.backfill_command import enqueue, follow
from stream.config import ConfigError, Settings, load_settings
from stream.dev.produce import load_conversations
from stream.replay import replay
from stream.schemas import InvalidEvent, classification_event_id, decode_conversation
from tests.conftest import EXAMPLES, REPO
from tests.harness import (
    classification_rows,
    count_rows,
    kill9,
    metric,
    produce,
    read_topic,
    revision_key,
    running_service,
    service_env,
    start_serve,
    wait_until,
)

QUESTIONS: list[dict[str, Any]] = yaml.safe_load((EXAMPLES / "questions.yaml").read_text())["questions"]
NEW = "refund_request"


def _write_questions(path: Path, items: list[dict[str, Any]]) -> QuestionSet:
    path.write_text(yaml.safe_dump({"questions": items}))
    return load_questions(path)


def _before() -> list[dict[str, Any]]:
    return [q for q in QUESTIONS if q["id"] != NEW]


def _after(applies_to: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**q, "applies_to": applies_to} if q["id"] == NEW else q for q in QUESTIONS]


def _with(settings: Settings, questions: Path, **backfill: Any) -> Settings:
    return settings.model_copy(update={
        "questions_file": questions,
        "backfill": settings.backfill.model_copy(update=backfill),
        "batch": settings.batch.model_copy(update={"max_events": 8}),
    })


async def _outputs(settings: Settings) -> dict[tuple[str, str, int], dict[str, dict[str, Any]]]:
    """Output events by revision, then by event_id (duplicates of one event_id collapse)."""
    out: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in await read_topic(settings, settings.topics.output):
        ev = orjson.loads(r.value)
        out[revision_key(ev)][ev["event_id"]] = ev
    return out


def _check_backfilled(
    settings: Settings, inputs: list[dict[str, Any]], outputs: dict[tuple[str, str, int], dict[str, dict[str, Any]]],
    rows: list[dict[str, Any]], before: QuestionSet, after: QuestionSet, expected: set[tuple[str, str, int]],
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every revision in `expected` has exactly two event_ids, the live one under `before` and the
    backfilled one under `after`, and the others only the live one; Postgres holds the same events.
    Returns the backfilled events by revision."""
    assert set(outputs) == {revision_key(e) for e in inputs}
    backfilled = {}
    for key, events in outputs.items():
        live = [ev for ev in events.values() if ev["source"]["topic"] == settings.topics.input]
        assert len(live) == 1, f"{key}: {len(live)} live event_ids"
        models = live[0]["models"]
        assert live[0]["event_id"] == classification_event_id(*key, before.version, models)
        others = [ev for ev in events.values() if ev is not live[0]]
        if key in expected:
            assert len(others) == 1, f"{key}: {len(others)} backfilled event_ids"
            assert others[0]["event_id"] == classification_event_id(*key, after.version, models)
            backfilled[key] = others[0]
        else:
            assert not others, f"{key} was backfilled though the new question does not apply to it"
    by_id = {r["event_id"]: r["event"] for r in rows}
    for events in outputs.values():
        for event_id, ev in events.items():
            assert by_id[event_id]["answers"] == ev["answers"]
    assert len(by_id) == sum(len(v) for v in outputs.values()), "Postgres has rows the topic lacks"
    return backfilled


async def test_backfill_answers_the_new_question_once_like_a_fresh_classification(
    settings: Settings, tmp_path: Path
) -> None:
    inputs = load_conversations(EXAMPLES / "conversations.jsonl")[:24]
    qfile = tmp_path / "questions.yaml"
    before = _write_questions(qfile, _before())
    settings = _with(settings, qfile, max_rate=0)
    async with running_service(settings) as running:
        await produce(settings, inputs)
        await wait_until(lambda: _rows(settings, len(inputs)), 120, "the live classifications")
        after = _write_questions(qfile, _after({"channel": ["chat", "email"]}))
        await produce(settings, [b"not a work item"], topic=settings.topics.backfill)
        code, out, err = await _flexor(settings, "backfill", "--question", "nope")
        assert (code, out) == (2, "") and err.count("\n") == 1 and "unknown question 'nope'" in err
        code, out, err = await _flexor(settings, "backfill", "--question", NEW, "--no-wait")
        assert code == 0, out + err
        job = out.split("flexor backfill --job ")[1].split()[0]
        pool = await create_pool(settings.database_url.get_secret_value(), max_size=2)
        try:
            jobs = BackfillJobs(pool)
            done = await asyncio.wait_for(follow(jobs, job, settings.topics.backfill, poll_s=0.2), 120)
            # Run again: nothing left to answer, and the command says so and returns.
            code, rerun_out, _ = await _flexor(settings, "backfill", "--question", NEW)
            assert code == 0 and ": 0 conversations in 0 work items" in rerun_out, rerun_out
            assert ": 0 conversations, 0 events published" in rerun_out
            code, job_out, _ = await _flexor(settings, "backfill", "--job", job)
            assert code == 0 and f"backfill {job} done: {len(expected_latest(inputs))} conversations" in job_out
        finally:
            await pool.close()
        # A live replay of a backfilled revision is the same event under the same rules: skipped.
        await produce(settings, [e for e in inputs if e["metadata"]["channel"] == "chat"][:1])
        await wait_until(lambda: _skipped(running.metrics.registry), 60, "the replay to be skipped")
        published = metric(running.metrics.registry, "flexor_backfill_conversations_total", {"result": "published"})
        invalid = metric(running.metrics.registry, "flexor_backfill_items_total", {"result": "invalid"})
        embedder = running.service.pipeline.embedder

    expected = expected_latest(inputs)
    assert 0 < len(expected) < len(inputs)
    assert expected == expected_latest(inputs)
    assert (done.conversations, done.conversations_done, done.published) == (len(expected),) * 3
    assert published == len(expected)
    (dead,) = await read_topic(settings, settings.topics.dlq)
    assert dead.value == b"not a work item" and invalid == 1
    assert dict(dead.headers)["error.reason"] == b"not_json"
    assert dict(dead.headers)["source.topic"] == settings.topics.backfill.encode()
    outputs = await _outputs(settings)
    rows = await classification_rows(settings)
    backfilled = _check_backfilled(settings, inputs, outputs, rows, before, after, expected)

    # The earlier answers are carried over; the new one sits in question order.
    for key, ev in backfilled.items():
        (live,) = [e for e in outputs[key].values() if e is not ev]
        assert [a["question_id"] for a in ev["answers"]] == [q.id for q in after.questions]
        assert [a for a in ev["answers"] if a["question_id"] != NEW] == live["answers"]

    # The new answers equal the live path's: embedded again from the text, stored again (the same
    # rows), evidence retrieved by pgvector.
    convs = [decode_conversation(orjson.dumps(e), settings.limits).to_conversation()
             for e in _latest(inputs) if revision_key(e) in expected]
    pool = await create_pool(settings.database_url.get_secret_value(), max_size=2)
    try:
        live_path = Pipeline(embedder, PgEvidenceStore(pool), Cascade(SimilarityScorer(embedder)))
        fresh = await live_path.classify(convs, QuestionSet(questions=[after.by_id()[NEW]]))
    finally:
        await pool.close()
    for conv, (answer,) in zip(convs, fresh.answers, strict=True):
        (got,) = [a for a in backfilled[(conv.tenant_id, conv.conversation_id, conv.revision)]["answers"]
                  if a["question_id"] == NEW]
        assert got["p_yes"] == pytest.approx(answer.p_yes, abs=1e-3)
        assert got["answer"] == answer.answer
        assert [e["chunk_id"] for e in got["evidence"]] == [e.chunk_id for e in answer.evidence]
        np.testing.assert_allclose([e["score"] for e in got["evidence"]], [e.score for e in answer.evidence],
                                   atol=1e-3)


def expected_latest(inputs: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    """What the first test's backfill answers: the stored revisions of chat and email conversations."""
    return {revision_key(e) for e in _latest(inputs) if e["metadata"]["channel"] in ("chat", "email")}


async def _flexor(settings: Settings, *args: str) -> tuple[int, str, str]:
    """Run the `flexor` command with the settings as environment variables: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "flexor"), *args, env=service_env(settings), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _latest(inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest revision of each conversation: the one stored, so the one a backfill answers."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for e in inputs:
        k = (e["tenant_id"], e["conversation_id"])
        if k not in newest or newest[k]["revision"] < e["revision"]:
            newest[k] = e
    return list(newest.values())


async def _rows(settings: Settings, n: int) -> bool:
    return await count_rows(settings) >= n


async def _skipped(registry: Any) -> bool:
    return metric(registry, "flexor_events_skipped_total", {"reason": "duplicate"}) >= 1


@pytest.mark.faults
async def test_backfill_survives_a_replica_killed_mid_job(settings: Settings, tmp_path: Path) -> None:
    inputs = load_conversations(EXAMPLES / "conversations.jsonl")[:32]
    qfile = tmp_path / "questions.yaml"
    before = _write_questions(qfile, _before())
    # Slow enough (8 conversations per second, 4 per item) for the kill to land mid-job.
    settings = _with(settings, qfile, max_rate=8, item_size=4)
    async with running_service(settings):
        await produce(settings, inputs)
        await wait_until(lambda: _rows(settings, len(inputs)), 120, "the live classifications")
    after = _write_questions(qfile, _after({}))
    pool = await create_pool(settings.database_url.get_secret_value(), max_size=2)
    try:
        jobs = BackfillJobs(pool)
        job = await enqueue(settings, pool, after.version, [after.by_id()[NEW]])

        async def items_done(n: int) -> bool:
            p = await jobs.progress(job)
            return p is not None and p.items_done >= n

        proc = start_serve(settings, tmp_path / "serve1.log")
        try:
            await wait_until(lambda: items_done(2), 120, "backfill progress before the kill")
        finally:
            kill9(proc)
        at_kill = await jobs.progress(job)
        stored = _latest(inputs)
        assert at_kill is not None and at_kill.items_done < at_kill.items == -(-len(stored) // 4), "kill mid-job"

        proc = start_serve(settings, tmp_path / "serve2.log")
        try:
            done = await asyncio.wait_for(follow(jobs, job, settings.topics.backfill, poll_s=0.2), 180)
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 60)
        assert proc.returncode == 0, (tmp_path / "serve2.log").read_text()[-2000:]
    finally:
        await pool.close()
    assert done.conversations_done == len(stored)
    outputs = await _outputs(settings)
    _check_backfilled(settings, inputs, outputs, await classification_rows(settings), before, after,
                      {revision_key(e) for e in stored})


async def test_a_work_item_that_keeps_raising_goes_to_the_dlq_and_the_worker_goes_on(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = load_conversations(EXAMPLES / "conversations.jsonl")[:8]
    qfile = tmp_path / "questions.yaml"
    _write_questions(qfile, _before())
    settings = _with(settings, qfile, max_rate=0, item_size=4)
    async with running_service(settings) as running:
        await produce(settings, inputs)
        await wait_until(lambda: _rows(settings, len(inputs)), 120, "the live classifications")
        after = _write_questions(qfile, _after({}))
        calls: list[int] = []

        async def planted(item: Any, record: Any, producer: Any) -> tuple[int, int]:
            calls.append(item.item)
            raise ValueError("planted failure\nsecond line")

        monkeypatch.setattr(running.backfill, "_answer", planted)
        items = -(-len(_latest(inputs)) // 4)
        pool = await create_pool(settings.database_url.get_secret_value(), max_size=2)
        try:
            job = await enqueue(settings, pool, after.version, [after.by_id()[NEW]])
            # The job ends, and says how many of its items failed, instead of waiting for them.
            done = await asyncio.wait_for(follow(BackfillJobs(pool), job, settings.topics.backfill, poll_s=0.2), 60)
        finally:
            await pool.close()
        assert (done.items_done, done.failed_items, done.published) == (items, items, 0)
        assert metric(running.metrics.registry, "flexor_backfill_items_total", {"result": "failed"}) == items
        # The live path still runs: a new revision is classified after the failed items.
        await produce(settings, [dict(inputs[0], revision=inputs[0]["revision"] + 10, event_id="after-poison")])
        await wait_until(lambda: _rows(settings, len(inputs) + 1), 60, "a live classification after the failures")
    assert sorted(calls) == sorted(list(range(items)) * 2), "each item is tried twice, not forever"
    dead = await read_topic(settings, settings.topics.dlq)
    assert len(dead) == items
    for d in dead:
        h = dict(d.headers)
        assert h["error.reason"] == b"processing_error" and h["error.type"] == b"ValueError"
        assert h["error.message"] == b"planted failure"
        assert h["source.topic"] == settings.topics.backfill.encode()
        assert decode_item(d.value).job_id
    # Once the cause is fixed, `flexor dlq replay` puts them back on the backfill topic.
    inputs_before = len(await read_topic(settings, settings.topics.input))
    report = await replay(settings, reason="processing_error")
    assert sum(report.replayed.values()) == items
    back = [r.value for r in await read_topic(settings, settings.topics.backfill)]
    assert all(back.count(d.value) == 2 for d in dead)
    assert len(await read_topic(settings, settings.topics.input)) == inputs_before


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{", "not_json"),
        (b"[]", "not_object"),
        (b'{"schema": "conversation.v1"}', "unknown_schema"),
        (b'{"schema": "backfill.v1", "job_id": "j", "item": 0, "question_set": "v", "conversations": []}',
         "invalid_fields"),
        (b'{"schema": "backfill.v1", "job_id": "j", "item": 0, "question_set": "v", "conversations": [["t"]]}',
         "invalid_fields"),
    ],
)
def test_bad_work_items_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as e:
        decode_item(raw)
    assert e.value.reason.value == reason


def test_a_work_item_round_trips() -> None:
    item = decode_item(encode_item("j1", 3, "abc", [("acme", "c-1"), ("beta", "c-2")]))
    assert (item.job_id, item.item, item.question_set, item.conversations) == (
        "j1", 3, "abc", [["acme", "c-1"], ["beta", "c-2"]])


async def test_the_pacer_spaces_items_and_gives_way_to_a_stop() -> None:
    pacer, stopping = Pacer(100), asyncio.Event()
    t0 = time.monotonic()
    for _ in range(3):
        assert await pacer.take(10, stopping)
    assert time.monotonic() - t0 >= 0.2  # 30 conversations at 100/s: the 2nd and 3rd wait 0.1 s each
    slow = Pacer(1)
    assert await slow.take(50, stopping)
    asyncio.get_running_loop().call_later(0.1, stopping.set)
    t0 = time.monotonic()
    assert not await slow.take(1, stopping)  # would wait 50 s
    assert time.monotonic() - t0 < 5


def test_a_rate_too_low_for_the_item_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="at most 60 seconds"):
        load_settings(None, **{"backfill.max_rate": 1, "backfill.item_size": 64})
    assert load_settings(None, **{"backfill.max_rate": 0, "backfill.item_size": 1000}).backfill.max_rate == 0
