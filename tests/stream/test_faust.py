"""The Faust integration (issue 15) on the embedded broker: a Faust app with the classifier agent
turns conversation.v1 values into the same classification.v1 events the service publishes for the
same input (event ids and answers), sends invalid values to its dead-letter topic, and commits its
input offsets (Faust's at-least-once)."""

from __future__ import annotations

import json
import uuid

import orjson
import pytest
from aiokafka.structs import TopicPartition
from jsonschema import Draft202012Validator

from stream.config import Settings
from stream.dev.produce import load_conversations
from tests.conftest import EXAMPLES, REPO
from tests.harness import create_topics, produce, read_topic, running_service, wait_until

faust = pytest.importorskip("faust", reason="faust-streaming is not installed: pip install 'flexor-stream[faust]'")


async def group_committed(settings: Settings, group: str, topic: str) -> dict[int, int | None]:
    from aiokafka import AIOKafkaConsumer

    from stream.kafka import connection_kwargs

    consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **connection_kwargs(settings.kafka))
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(settings.topics.partitions)}
    finally:
        await consumer.stop()


async def test_faust_agent_matches_the_service(settings: Settings) -> None:
    from stream.faust_agent import FaustClassifier

    inputs = load_conversations(EXAMPLES / "conversations.jsonl", 4)
    await create_topics(settings)
    await produce(settings, [*inputs, b"not json"])

    app_id = f"faust-{uuid.uuid4().hex[:8]}"
    out_topic, dlq_topic = f"{app_id}-out", f"{app_id}-dlq"
    raw = {"value_serializer": "raw", "key_serializer": "raw"}
    app = faust.App(app_id, broker=f"kafka://{settings.kafka.bootstrap_servers}", store="memory://",
                    web_enabled=False, topic_disable_leader=True, broker_session_timeout=3.0,
                    broker_heartbeat_interval=0.3, broker_commit_interval=0.5, topic_partitions=4)
    classifier = FaustClassifier(settings)
    classifier.agent(app, app.topic(settings.topics.input, **raw), app.topic(out_topic, **raw),
                     app.topic(dlq_topic, **raw))
    await app.start()
    try:
        async def committed_to_end() -> bool:
            ends = {r.partition: r.offset + 1 for r in await read_topic(settings, settings.topics.input)}
            got = await group_committed(settings, app_id, settings.topics.input)
            return all(got[p] == end for p, end in ends.items())

        await wait_until(committed_to_end, 120, "Faust to commit the input to its end")
    finally:
        await app.stop()
        await classifier.aclose()
    faust_out = {orjson.loads(r.value)["conversation_id"]: r for r in await read_topic(settings, out_topic)}
    (dead,) = await read_topic(settings, dlq_topic)
    assert dead.value == b"not json" and dict(dead.headers)["error.reason"] == b"not_json"

    # The service, on the same input, gives the same events.
    async with running_service(settings, create_topics=False):
        async def done() -> bool:
            return len(await read_topic(settings, settings.topics.output)) >= len(inputs)

        await wait_until(done, 120, "the service's classifications")
    service_out = {orjson.loads(r.value)["conversation_id"]: orjson.loads(r.value)
                   for r in await read_topic(settings, settings.topics.output)}
    assert set(faust_out) == set(service_out) == {e["conversation_id"] for e in inputs}
    schema = Draft202012Validator(json.loads((REPO / "docs/schemas/classification.v1.json").read_text()))
    for cid, record in faust_out.items():
        event = orjson.loads(record.value)
        schema.validate(event)
        assert event["event_id"] == service_out[cid]["event_id"]
        assert event["answers"] == service_out[cid]["answers"]
        assert record.key == cid.encode() and dict(record.headers)["ce_id"] == event["event_id"].encode()
