"""Poison input (issue 5, fault 6): fuzzed event bytes and fields, oversized events and texts, deep
JSON, invalid UTF-8, NUL characters.

- `decode_conversation` under hypothesis: it either returns an event the rest of the service can
  store and classify, or raises `InvalidEvent` with a known reason; never anything else.
- The service on the real broker and Postgres: generated poison mixed with good events; every
  invalid one lands in the DLQ with its reason, every valid one is classified, the service never
  stops, and the delivery invariant holds.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from stream.config import LimitsConfig, Settings
from stream.dev.produce import load_conversations
from stream.schemas import InvalidEvent, Reason, decode_conversation
from tests.conftest import EXAMPLES
from tests.harness import (
    check_delivery,
    committed,
    count_rows,
    create_topics,
    metric,
    produce,
    read_topic,
    running_service,
    wait_until,
)

pytestmark = pytest.mark.faults

LIMITS = LimitsConfig(max_event_bytes=20_000, max_turns=20, max_chars_per_turn=2_000)
REASONS = {r.value for r in Reason}


def _base(i: int = 0) -> dict[str, Any]:
    return {
        "schema": "conversation.v1", "event_id": f"fz-{i}", "tenant_id": "fuzz", "conversation_id": f"fz-{i}",
        "revision": 1, "status": "closed", "occurred_at": "2026-11-20T10:00:00Z",
        "metadata": {"channel": "chat"},
        "turns": [{"turn_id": "t1", "speaker": "customer", "text": "I was charged twice for one order."},
                  {"turn_id": "t2", "speaker": "agent", "text": "Sorry about that, refunding now."}],
    }


def _storable(s: str) -> bool:
    """What Postgres text columns and orjson output accept."""
    return "\x00" not in s and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)


def _check(raw: bytes | None, limits: LimitsConfig = LIMITS) -> str:
    """Decode; return 'ok' or the DLQ reason. Fails the test on any other exception."""
    try:
        ev = decode_conversation(raw, limits)
    except InvalidEvent as e:
        assert e.reason.value in REASONS and e.message
        return e.reason.value
    conv = ev.to_conversation()
    assert raw is not None and len(raw) <= limits.max_event_bytes
    assert 0 < len(conv.turns) <= limits.max_turns
    assert all(len(t.text) <= limits.max_chars_per_turn for t in conv.turns)
    assert any(t.text.strip() for t in conv.turns)
    for s in (conv.tenant_id, conv.conversation_id, *(t.text for t in conv.turns), *(t.speaker for t in conv.turns),
              *(t.turn_id for t in conv.turns)):
        assert _storable(s), f"accepted a string Postgres cannot store: {s!r}"
    orjson.dumps(conv.metadata)  # the metadata can be serialized again
    return "ok"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes(raw: bytes) -> None:
    _check(raw)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(["schema", "event_id", "tenant_id", "conversation_id", "revision", "status",
                              "occurred_at", "metadata", "turns"]),
       value=json_values, drop=st.booleans())
def test_decode_fuzzed_top_level_fields(field: str, value: Any, drop: bool) -> None:
    ev = _base()
    if drop:
        ev.pop(field)
    else:
        ev[field] = value
    _check(json.dumps(ev).encode())  # stdlib: also writes integers beyond 64 bits


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turn=st.dictionaries(st.sampled_from(["turn_id", "speaker", "text", "extra"]),
                            json_values | st.text(), max_size=4),
       text=st.text(max_size=50))
def test_decode_fuzzed_turns_and_text(turn: dict[str, Any], text: str) -> None:
    ev = _base()
    ev["turns"] = [turn, {"turn_id": "t9", "speaker": "customer", "text": text}]
    _check(json.dumps(ev, ensure_ascii=False).encode())


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decode_mutated_bytes(data: st.DataObject) -> None:
    raw = bytearray(orjson.dumps(_base()))
    for _ in range(data.draw(st.integers(1, 5))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[pos:]
            if not raw:
                break
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    _check(bytes(raw))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * 5000 + b"]" * 5000, "not_json"),  # deeper than any parser should follow
        (orjson.dumps(_base()).replace(b"charged", b"ch\xffrged"), "not_json"),  # invalid UTF-8
        (orjson.dumps(_base()).replace(b"charged", b"ch\\ud800rged"), "not_json"),  # lone surrogate
        (orjson.dumps(_base()).replace(b"charged", b"ch\\u0000rged"), "invalid_fields"),  # NUL
        (orjson.dumps(dict(_base(), tenant_id="a\x00b")), "invalid_fields"),
        (orjson.dumps(_base()).replace(b'{"channel":"chat"}', b'{"a":' * 300 + b"1" + b"}" * 300),
         "invalid_fields"),  # deep but parseable
        (orjson.dumps(dict(_base(), turns=[{"turn_id": "t", "speaker": "c", "text": "x" * 2_001}])),
         "text_too_long"),
        (orjson.dumps(dict(_base(), turns=[{"turn_id": f"t{i}", "speaker": "c", "text": "x"} for i in range(21)])),
         "too_many_turns"),
        (b'{"pad": "' + b"y" * 20_001 + b'"}', "too_large"),
        (b"", "not_json"),
        (None, "not_json"),
    ],
    ids=["deep", "utf8", "surrogate", "nul_text", "nul_id", "deep_metadata", "long_text", "many_turns",
         "too_large", "empty", "tombstone"],
)
def test_decode_edge_cases(raw: bytes | None, reason: str) -> None:
    assert _check(raw) == reason


# -- the service under poison -----------------------------------------------------------------------


# orjson refuses JSON nested deeper than this (a property of the parser, not of our decoder).
ORJSON_MAX_DEPTH = 1024


def _field_outcome(field: str, value: Any) -> str:
    """What the README's conversation.v1 says of one top-level field set to `value`."""
    if field == "revision":
        ok = type(value) is int and 0 <= value < 2**31  # a Postgres integer; bools are not numbers
    elif field in ("tenant_id", "conversation_id", "event_id"):
        ok = isinstance(value, str) and value != ""
    elif field == "metadata":
        ok = isinstance(value, dict)
    else:  # turns: a non-empty list of turn objects
        return "empty_turns" if value == [] else "invalid_fields"
    return "ok" if ok else "invalid_fields"


def _poison(rng: random.Random, i: int) -> tuple[bytes, str]:
    """One generated bad (or weird but valid) event, and the outcome it must have: "ok" or its DLQ
    reason, known from how it was built (an oracle independent of the decoder under test)."""
    ev = _base(1000 + i)
    kind = rng.randrange(12)
    if kind == 0:  # garbage that cannot start a JSON text
        return b"\x00" + rng.randbytes(rng.randrange(0, 200)), "not_json"
    if kind == 1:  # a byte that is never valid UTF-8, anywhere in the document
        raw = bytearray(orjson.dumps(ev))
        raw[rng.randrange(len(raw))] = rng.choice([0xC0, 0xC1, 0xF5, 0xFF])
        return bytes(raw), "not_json"
    if kind == 2:  # a proper prefix of an object: its closing brace is missing
        raw = orjson.dumps(ev)
        return raw[: rng.randrange(1, len(raw))], "not_json"
    if kind == 3:
        return orjson.dumps(ev).replace(b"twice", b"tw\xc3\x28ice"), "not_json"  # invalid UTF-8
    if kind == 4:
        depth = rng.choice([300, 2000, 50_000])
        raw = b'{"schema": "conversation.v1", "metadata": ' + b"[" * depth + b"]" * depth + b"}"
        return raw, "not_json" if depth > ORJSON_MAX_DEPTH else "invalid_fields"  # parses, but no turns
    if kind == 5:
        ev["turns"][0]["text"] = "z" * rng.choice([25_000, 100_000])  # over max_chars_per_turn (20000)
        return orjson.dumps(ev), "text_too_long"
    if kind == 6:
        return b'{"schema": "conversation.v1", "pad": "' + b"p" * 1_100_000 + b'"}', "too_large"
    if kind == 7:  # over max_turns (500)
        ev["turns"] = [{"turn_id": f"t{j}", "speaker": "customer", "text": "hi"} for j in range(600)]
        return orjson.dumps(ev), "too_many_turns"
    if kind == 8:
        field = rng.choice(["revision", "turns", "tenant_id", "conversation_id", "event_id", "metadata"])
        ev[field] = rng.choice([None, "x", -1, 2**40, [], {}, [1, 2], 1.5, True])
        return orjson.dumps(ev), _field_outcome(field, ev[field])
    if kind == 9:  # Postgres text cannot hold NUL
        ev["turns"][0]["text"] = "nul \x00 inside"
        return orjson.dumps(ev), "invalid_fields"
    if kind == 10:  # weird but valid: unicode everywhere, empty metadata, odd speakers
        ev["turns"] = [{"turn_id": "☃", "speaker": "клиент", "text": "💸 двойное списание " * rng.randrange(1, 50)}]
        ev["metadata"] = {}
        return orjson.dumps(ev), "ok"
    return orjson.dumps({"schema": "conversation.v1", "turns": "not a list", "n": i}), "invalid_fields"


async def test_service_survives_poison(settings: Settings) -> None:
    rng = random.Random(20261120)
    good = load_conversations(EXAMPLES / "conversations.jsonl", 20)
    assert (settings.limits.max_chars_per_turn, settings.limits.max_turns) == (20_000, 500)  # as _poison assumes
    built = [_poison(rng, i) for i in range(50)]
    poison = [raw for raw, _ in built]
    expected: Counter[tuple[bytes, str]] = Counter()
    valid_poison: list[dict[str, Any]] = []
    for raw, outcome in built:
        if outcome == "ok":
            valid_poison.append(orjson.loads(raw))
        else:
            expected[(raw, outcome)] += 1
    stream: list[Any] = []
    for i in range(max(len(good), len(poison))):
        if i < len(poison):
            stream.append(poison[i])
        if i < len(good):
            stream.append(good[i])
    # One revision of one conversation twice, with different content, side by side (so in one
    # batch): the first is classified, the second acknowledged as a duplicate; nothing crashes.
    first = dict(_base(9999), turns=[{"turn_id": "t1", "speaker": "customer", "text": "short one"}])
    second = dict(_base(9999), turns=[{"turn_id": f"t{j}", "speaker": "customer", "text": f"turn {j} " * 40}
                                      for j in range(12)])
    stream += [first, second]
    classified = [*good, *valid_poison, first]
    n_bad = sum(expected.values())
    assert n_bad >= 40 and {"not_json", "too_large", "text_too_long", "too_many_turns"} <= {r for _, r in expected}

    await create_topics(settings)
    async with running_service(settings) as running:
        reg = running.metrics.registry
        await produce(settings, stream)

        async def finished() -> bool:
            dlq = sum(metric(reg, "flexor_dlq_events_total", {"reason": r}) for r in REASONS)
            return dlq == n_bad and await count_rows(settings) >= len(classified)

        await wait_until(finished, 300, "every poison event dead-lettered and every good one classified")

        async def all_committed() -> bool:
            return sum((await committed(settings)).values()) == len(stream)

        await wait_until(all_committed, 60, "offsets committed to the end")
        assert metric(reg, "flexor_events_skipped_total", {"reason": "duplicate"}) >= 1
        assert running.service.consumer is not None and not running.service._stopping.is_set()
    dlq = await read_topic(settings, settings.topics.dlq)
    got: Counter[tuple[bytes, str]] = Counter()
    for rec in dlq:
        h = dict(rec.headers)
        assert h["error.message"] and h["source.topic"].decode() == settings.topics.input
        value = rec.value
        if "error.truncated_from" in h:  # kept up to the limit: match it to its original
            value = next(raw for raw, _ in expected if raw.startswith(rec.value) and len(raw) == int(
                h["error.truncated_from"]))
        got[(value, h["error.reason"].decode())] += 1
    assert got == expected
    await check_delivery(settings, classified, registry=reg)
