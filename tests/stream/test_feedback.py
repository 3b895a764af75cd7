"""Feedback on the real broker and Postgres: reviewers' answers on `topics.feedback` become `human`
labels (overriding a teacher's), bad feedback goes to the DLQ with its reason, and the feedback
group commits what it stored."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from agents.store import create_pool
from agents.store.labels import Label, LabelsTable, teacher_source
from stream.config import Settings
from stream.feedback import feedback_group
from stream.kafka import connection_kwargs
from stream.replay import replay
from tests.harness import metric, produce, read_topic, running_service, wait_until


def feedback(**over: object) -> dict[str, object]:
    return {"schema": "feedback.v1", "tenant_id": "acme", "conversation_id": "c-1", "revision": 2,
            "question_id": "refund_request", "question_version": 1, "answer": "yes", "reviewer": "ana@qa", **over}


BAD = {
    "not_json": b"{oops",
    "not_object": b"[1]",
    "unknown_schema": feedback(schema="conversation.v1"),
    "invalid_fields": feedback(answer="maybe"),
}


async def labels(settings: Settings) -> list[Label]:
    pool = await create_pool(settings.database_url.get_secret_value(), max_size=1)
    try:
        return await LabelsTable(pool).fetch()
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await pool.close()


async def committed_end(settings: Settings) -> tuple[int, int]:
    """(offsets committed by the feedback group, records in the topic), over all partitions."""
    consumer = AIOKafkaConsumer(group_id=feedback_group(settings), enable_auto_commit=False,
                                **connection_kwargs(settings.kafka))
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topics.feedback, p) for p in range(settings.topics.partitions)]
        done = sum([await consumer.committed(tp) or 0 for tp in tps])
    finally:
        await consumer.stop()
    return done, len(await read_topic(settings, settings.topics.feedback))


async def test_feedback_becomes_human_labels_and_bad_feedback_goes_to_the_dlq(settings: Settings) -> None:
    async with running_service(settings) as running:
        pool = await create_pool(settings.database_url.get_secret_value(), max_size=1)
        try:  # a teacher answered first; the reviewer corrects it
            teacher = Label("acme", "c-1", 2, "refund_request", 1, "no", teacher_source("m"), "m")
            await LabelsTable(pool).upsert([teacher])
        finally:
            await pool.close()
        good = [feedback(), feedback(conversation_id="c-2", revision=1, answer="no", reviewer="bo@qa")]
        await produce(settings, [good[0], *BAD.values(), good[1]], topic=settings.topics.feedback)
        registry = running.metrics.registry

        async def all_seen() -> bool:
            return metric(registry, "flexor_feedback_total", {"result": "stored"}) == 2 \
                and metric(registry, "flexor_feedback_total", {"result": "dlq"}) == len(BAD)

        await wait_until(all_seen, 60, "every feedback record stored or dead-lettered")
        got = {(lab.conversation_id, lab.revision): lab for lab in await labels(settings)}
        assert {k: (g.answer, g.source, g.given_by, g.question_id) for k, g in got.items()} == {
            ("c-1", 2): ("yes", "human", "ana@qa", "refund_request"),
            ("c-2", 1): ("no", "human", "bo@qa", "refund_request"),
        }
        for reason in BAD:
            assert metric(registry, "flexor_dlq_events_total", {"reason": reason}) == 1, reason

        async def committed() -> bool:
            done, total = await committed_end(settings)
            return done == total == len(good) + len(BAD)

        await wait_until(committed, 30, "the feedback group committed every record")
    dlq = {dict(r.headers)["error.reason"].decode(): r for r in await read_topic(settings, settings.topics.dlq)}
    assert set(dlq) == set(BAD)
    assert dlq["invalid_fields"].value == produce_bytes(BAD["invalid_fields"])  # the original bytes
    headers = dict(dlq["invalid_fields"].headers)
    assert headers["source.topic"].decode() == settings.topics.feedback
    assert b"answer" in headers["error.message"]

    # `flexor dlq replay` puts dead feedback back on the feedback topic, not on the input topic.
    report = await replay(settings, reason="invalid_fields")
    assert sum(report.replayed.values()) == 1
    back = await read_topic(settings, settings.topics.feedback)
    assert [r.value for r in back].count(produce_bytes(BAD["invalid_fields"])) == 2
    assert await read_topic(settings, settings.topics.input) == []


def produce_bytes(event: object) -> bytes:
    import orjson

    return event if isinstance(event, bytes) else orjson.dumps(event)


async def test_a_label_whose_storing_raises_goes_to_the_dlq_and_the_rest_are_stored(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = LabelsTable.upsert

    async def planted(self: LabelsTable, labels: list[Label]) -> int:
        if any(lab.given_by == "poison@qa" for lab in labels):
            raise ValueError("planted failure")
        return await real(self, labels)

    monkeypatch.setattr(LabelsTable, "upsert", planted)
    records = [feedback(conversation_id=f"c-{i}", reviewer="poison@qa" if i == 2 else "ana@qa") for i in range(5)]
    async with running_service(settings) as running:
        await produce(settings, records, topic=settings.topics.feedback)
        registry = running.metrics.registry

        async def all_seen() -> bool:
            return metric(registry, "flexor_feedback_total", {"result": "stored"}) == 4 \
                and metric(registry, "flexor_feedback_total", {"result": "dlq"}) == 1

        await wait_until(all_seen, 60, "four labels stored, the planted one dead-lettered")
    assert sorted(lab.conversation_id for lab in await labels(settings)) == ["c-0", "c-1", "c-3", "c-4"]
    (dead,) = await read_topic(settings, settings.topics.dlq)
    h = dict(dead.headers)
    assert (h["error.reason"], h["error.type"], h["error.message"]) == (b"processing_error", b"ValueError",
                                                                        b"planted failure")
    assert dead.value == produce_bytes(records[2])
