"""Event contracts (issue 15): the JSON Schema files match the models; the examples and the real
output, dead letters and their headers validate against them (with `jsonschema`, not the models);
output and dead-letter records are CloudEvents in binary mode (read back with the CloudEvents SDK);
a W3C traceparent travels from input to output and DLQ; each event has its own `latency_ms`, and
the latency histogram counts classified events only. docs/asyncapi.yaml parses with the AsyncAPI
Initiative's parser and names the topics, group and headers the service uses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from jsonschema import Draft202012Validator, FormatChecker

from stream import contracts
from stream.config import Settings, load_settings
from stream.feedback import feedback_group
from stream.headers import CE_HEADERS, CLASSIFICATION_TYPE, DEAD_LETTER_TYPE, service_source
from stream.kafka import make_producer
from tests.conftest import EXAMPLES, REPO, Endpoints, fresh_database, make_settings
from tests.harness import create_topics, metric, read_topic, running_service, wait_until

SCHEMAS = REPO / "docs" / "schemas"
ASYNCAPI_TOOL = REPO / "tools" / "asyncapi"


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS / f"{name}.json").read_text()), format_checker=FormatChecker())


def test_schema_files_match_the_models() -> None:
    generated = contracts.json_schemas()
    on_disk = {p.name.removesuffix(".json"): p.read_text() for p in SCHEMAS.glob("*.json")}
    assert set(on_disk) == set(generated), "regenerate: python -m stream.contracts"
    for name, schema in generated.items():
        assert on_disk[name] == contracts.render(schema), f"{name}.json is stale: python -m stream.contracts"
        Draft202012Validator.check_schema(schema)


def test_examples_validate_and_broken_ones_do_not() -> None:
    v = validator("conversation.v1")
    lines = (EXAMPLES / "conversations.jsonl").read_text().splitlines()
    for line in lines:
        v.validate(orjson.loads(line))
    good = orjson.loads(lines[0])
    no_tenant = {k: x for k, x in good.items() if k != "tenant_id"}
    for broken in ({**good, "revision": "3"}, {**good, "turns": []}, no_tenant, {**good, "schema": "conversation.v2"}):
        assert not v.is_valid(broken), broken


# -- the service, run once for the checks below -------------------------------------------------------

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = b"vendor=opaque"


@dataclass
class Served:
    settings: Settings
    inputs: list[dict[str, Any]]
    ages_s: list[float]  # how old each input's timestamp was when it was produced
    outputs: list[ConsumerRecord]  # type: ignore[type-arg]
    dead_letters: list[ConsumerRecord]  # type: ignore[type-arg]
    latency_count: float
    classified: float
    spans: list[Any] | None  # finished OpenTelemetry spans, when the SDK is installed


def span_exporter() -> Any:
    """An in-memory exporter on the global tracer provider (set once per process), or None."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return None
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture(scope="module")
async def served(infra: Endpoints) -> AsyncIterator[Served]:
    examples = [orjson.loads(x) for x in (EXAMPLES / "conversations.jsonl").read_text().splitlines()[:3]]
    ages_s = [9.0, 6.0, 3.0]
    exporter = span_exporter()
    async with fresh_database(infra) as db:
        settings = make_settings(infra, db)
        await create_topics(settings)
        async with running_service(settings) as running:
            producer = make_producer(settings.kafka)
            await producer.start()
            try:
                now_ms = int(time.time() * 1000)
                futures = [
                    await producer.send(
                        settings.topics.input, orjson.dumps(ev), key=ev["conversation_id"].encode(),
                        timestamp_ms=now_ms - int(age * 1000),
                        headers=[("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)] if i == 0 else None,
                    )
                    for i, (ev, age) in enumerate(zip(examples, ages_s, strict=True))
                ]
                # Not JSON, traced, with a content-type of its own that the DLQ's must not clobber.
                futures.append(await producer.send(
                    settings.topics.input, b"not json", key=b"c-bad",
                    headers=[("traceparent", TRACEPARENT), ("content-type", b"text/plain")],
                ))
                for f in futures:
                    await f
            finally:
                await producer.stop()
            reg = running.metrics.registry

            async def done() -> bool:
                return metric(reg, "flexor_conversations_classified_total") >= 3 and metric(
                    reg, "flexor_dlq_events_total", {"reason": "not_json"}) >= 1

            await wait_until(done, 120, "3 classifications and 1 dead letter")
            latency_count = metric(reg, "flexor_event_latency_seconds_count")
            classified = metric(reg, "flexor_conversations_classified_total")
        yield Served(settings, examples, ages_s, await read_topic(settings, settings.topics.output),
                     await read_topic(settings, settings.topics.dlq), latency_count, classified,
                     list(exporter.get_finished_spans()) if exporter else None)


def headers_of(record: ConsumerRecord) -> dict[str, bytes]:  # type: ignore[type-arg]
    return dict(record.headers)


def test_output_events_validate_against_the_schema(served: Served) -> None:
    v = validator("classification.v1")
    assert len(served.outputs) == 3
    for r in served.outputs:
        v.validate(orjson.loads(r.value))


def test_dead_letter_headers_validate_against_the_schema(served: Served) -> None:
    (dl,) = served.dead_letters
    v = validator("dead-letter.headers.v1")
    v.validate({k: x.decode() for k, x in dl.headers})
    assert not v.is_valid({k: x.decode() for k, x in dl.headers if k != "error.reason"})


def test_outputs_are_cloudevents_in_binary_mode(served: Served) -> None:
    from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event

    for r in served.outputs:
        body = orjson.loads(r.value)
        ce = from_binary_event(KafkaMessage(headers=headers_of(r), key=r.key, value=r.value))
        assert ce.get_id() == body["event_id"]
        assert ce.get_type() == CLASSIFICATION_TYPE
        assert ce.get_source() == service_source(served.settings.group_id)
        assert ce.get_subject() == body["conversation_id"]
        assert ce.get_datacontenttype() == "application/json"
        assert ce.get_data() == body, "the JSON body stays as it is"
        assert abs(ce.get_time().timestamp() - r.timestamp / 1000) < 60


def test_dead_letters_are_cloudevents_and_keep_the_original(served: Served) -> None:
    from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event

    (dl,) = served.dead_letters
    h = headers_of(dl)
    ce = from_binary_event(KafkaMessage(headers=h, key=dl.key, value=dl.value))
    assert ce.get_type() == DEAD_LETTER_TYPE
    source = f"{served.settings.topics.input}/{h['source.partition'].decode()}/{h['source.offset'].decode()}"
    assert ce.get_id() == source
    assert (dl.key, dl.value) == (b"c-bad", b"not json")
    assert h["original.content-type"] == b"text/plain", "the input's own content-type is kept, renamed"
    assert h["content-type"] == b"application/octet-stream"


def test_traceparent_is_carried_to_output_and_dead_letter(served: Served) -> None:
    traced = served.inputs[0]["conversation_id"]
    by_conversation = {orjson.loads(r.value)["conversation_id"]: headers_of(r) for r in served.outputs}
    assert by_conversation[traced]["traceparent"] == TRACEPARENT
    assert by_conversation[traced]["tracestate"] == TRACESTATE
    assert all("traceparent" not in h for c, h in by_conversation.items() if c != traced)
    assert headers_of(served.dead_letters[0])["traceparent"] == TRACEPARENT


def test_each_event_has_its_own_latency(served: Served) -> None:
    """latency_ms runs from the input record's timestamp: inputs produced 9, 6 and 3 s "ago" in one
    batch report latencies 3 s apart (before, every event of a batch carried the same number)."""
    latency = {orjson.loads(r.value)["conversation_id"]: orjson.loads(r.value)["latency_ms"] for r in served.outputs}
    got = [latency[e["conversation_id"]] for e in served.inputs]
    for i in range(len(got) - 1):
        gap_ms = (served.ages_s[i] - served.ages_s[i + 1]) * 1000
        assert abs((got[i] - got[i + 1]) - gap_ms) < 1000, got
    assert got[-1] >= served.ages_s[-1] * 1000


def test_latency_histogram_counts_classified_events_only(served: Served) -> None:
    assert served.classified == 3
    assert served.latency_count == 3, "a dead letter was counted in flexor_event_latency_seconds"


def test_batches_are_traced_with_messaging_attributes(served: Served) -> None:
    if served.spans is None:
        pytest.skip("opentelemetry-sdk is not installed: pip install 'flexor-stream[otel]'")
    s = served.settings
    batches = [sp for sp in served.spans if sp.name == f"process {s.topics.input}"]
    assert batches
    for b in batches:
        assert b.attributes["messaging.system"] == "kafka"
        assert b.attributes["messaging.destination.name"] == s.topics.input
        assert b.attributes["messaging.consumer.group.name"] == s.group_id
        assert b.attributes["messaging.batch.message_count"] == len(b.links)
    links = [link for b in batches for link in b.links]
    assert len(links) == 4, "one link per input record"
    inputs = {(int(orjson.loads(r.value)["source"]["partition"]), orjson.loads(r.value)["source"]["offset"])
              for r in served.outputs}
    linked = {(int(link.attributes["messaging.destination.partition.id"]), link.attributes["messaging.kafka.offset"])
              for link in links}
    assert inputs < linked, "each classified record is linked with its partition and offset"
    trace_id = int(TRACEPARENT.split(b"-")[1], 16)
    assert sum(link.context.trace_id == trace_id for link in links) == 2, "the traced input and the traced bad one"
    stages = {sp.name for sp in served.spans if sp.parent is not None and any(
        sp.parent.span_id == b.context.span_id for b in batches)}
    assert {"decode", "embed", "deliver"} <= stages, stages


# -- AsyncAPI ----------------------------------------------------------------------------------------


def parse_asyncapi(path: Path) -> dict[str, Any]:
    if shutil.which("node") is None:
        pytest.skip("the AsyncAPI check needs Node.js (apt-get install nodejs npm), then make install")
    if not (ASYNCAPI_TOOL / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.skip("@asyncapi/parser is not installed: make install (npm ci --prefix tools/asyncapi)")
    proc = subprocess.run(["node", str(ASYNCAPI_TOOL / "validate.mjs"), str(path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


def test_asyncapi_document_is_valid_and_matches_the_service() -> None:
    doc = parse_asyncapi(REPO / "docs" / "asyncapi.yaml")
    problems = [d for d in doc["diagnostics"] if d["severity"] <= 1]  # errors and warnings
    assert doc["parsed"] and not problems, problems
    assert doc["version"].startswith("3.")
    defaults = load_settings(None)
    channels = {c["address"]: c for c in doc["channels"]}
    topics = defaults.topics
    assert set(channels) == {topics.input, topics.output, topics.dlq, topics.feedback, topics.backfill}
    ops = {o["id"]: o for o in doc["operations"]}
    receive = {o["channels"][0]: o for o in ops.values() if o["action"] == "receive"}
    assert set(receive) == {topics.input, topics.feedback, topics.backfill}
    assert receive[topics.input]["kafka"]["groupId"]["enum"] == [defaults.group_id]
    assert receive[topics.feedback]["kafka"]["groupId"]["enum"] == [feedback_group(defaults)]
    assert receive[topics.backfill]["kafka"]["groupId"]["enum"] == [f"{defaults.group_id}.backfill"]
    (fb,) = channels[topics.feedback]["messages"]
    assert {"answer", "reviewer", "question_version"} <= set(fb["payloadProperties"])
    assert {c for o in ops.values() if o["action"] == "send" for c in o["channels"]} == {
        defaults.topics.output, defaults.topics.dlq}
    (out,) = channels[defaults.topics.output]["messages"]
    assert set(out["requiredHeaders"]) == set(CE_HEADERS)
    assert {"answers", "event_id", "latency_ms"} <= set(out["payloadProperties"])
    (dead,) = channels[defaults.topics.dlq]["messages"]
    assert {"error.reason", "source.offset", "ce_id"} <= set(dead["requiredHeaders"])
    for c in channels.values():
        assert all(m["key"]["type"] == "string" for m in c["messages"])
    (item,) = channels[topics.backfill]["messages"]
    assert {"job_id", "item", "conversations"} <= set(item["payloadProperties"])


def test_the_asyncapi_check_catches_a_broken_document(tmp_path: Path) -> None:
    shutil.copytree(SCHEMAS, tmp_path / "schemas")
    broken = tmp_path / "asyncapi.yaml"
    broken.write_text((REPO / "docs" / "asyncapi.yaml").read_text().replace("action: send", "action: publish"))
    doc = parse_asyncapi(broken)
    assert not doc["parsed"] and any(d["severity"] == 0 for d in doc["diagnostics"])
