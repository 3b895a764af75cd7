"""conversation.v1 decoding (every bad-input kind maps to one Reason) and classification.v1 building."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from agents.chunking import Turn
from agents.types import Answer, Conversation, Evidence
from stream.config import LimitsConfig
from stream.schemas import (
    INPUT_SCHEMA,
    OUTPUT_SCHEMA,
    ConversationV1,
    InvalidEvent,
    Reason,
    build_classification,
    classification_event_id,
    decode_conversation,
    encode,
)

LIMITS = LimitsConfig()

VALID: dict[str, Any] = {
    "schema": "conversation.v1",
    "event_id": "e-9f2",
    "tenant_id": "acme",
    "conversation_id": "c-123",
    "revision": 3,
    "status": "closed",
    "occurred_at": "2026-11-20T10:00:00Z",
    "metadata": {"channel": "chat", "domain": "bank"},
    "turns": [
        {"turn_id": "t1", "speaker": "customer", "text": "I was charged twice for one order."},
        {"turn_id": "t2", "speaker": "agent", "text": "Sorry about that, refunding now."},
    ],
}


def event(**changes: Any) -> dict[str, Any]:
    """A copy of VALID with top-level keys replaced (a value of `...` deletes the key)."""
    e = copy.deepcopy(VALID)
    for k, v in changes.items():
        if v is ...:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def raw(e: Any) -> bytes:
    return orjson.dumps(e)


def reason_of(data: bytes | None, limits: LimitsConfig = LIMITS) -> Reason:
    with pytest.raises(InvalidEvent) as info:
        decode_conversation(data, limits)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.message and str(err) == err.message
    return err.reason


# -- valid ------------------------------------------------------------------------------------------


def test_valid_event_decodes_to_conversation() -> None:
    ev = decode_conversation(raw(VALID), LIMITS)
    assert isinstance(ev, ConversationV1)
    assert ev.schema_ == INPUT_SCHEMA
    assert (ev.event_id, ev.tenant_id, ev.conversation_id, ev.revision) == ("e-9f2", "acme", "c-123", 3)
    assert ev.occurred_at is not None and ev.occurred_at.year == 2026
    conv = ev.to_conversation()
    assert isinstance(conv, Conversation)
    assert conv.turns == (
        Turn("t1", "customer", "I was charged twice for one order."),
        Turn("t2", "agent", "Sorry about that, refunding now."),
    )
    assert conv.metadata == {"channel": "chat", "domain": "bank"}
    assert (conv.tenant_id, conv.conversation_id, conv.revision) == ("acme", "c-123", 3)


def test_optional_fields_default_and_unknown_fields_are_ignored() -> None:
    ev = decode_conversation(raw(event(status=..., occurred_at=..., metadata=..., extra_field=1)), LIMITS)
    assert ev.status == "closed"
    assert ev.occurred_at is None
    assert ev.metadata == {}


def test_revision_zero_is_valid() -> None:
    assert decode_conversation(raw(event(revision=0)), LIMITS).revision == 0


# -- bad input: one Reason per kind -----------------------------------------------------------------


def test_tombstone() -> None:
    assert reason_of(None) is Reason.NOT_JSON


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b'{"schema": "conversation.v1",', b"{'single': 'quotes'}", b"NaN", b"\x00\x01"],
)
def test_not_json(data: bytes) -> None:
    assert reason_of(data) is Reason.NOT_JSON


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe\xfd",  # not UTF-8 at all
        b'{"schema": "conversation.v1", "event_id": "\xc3\x28"}',  # invalid 2-byte sequence inside a string
        b'"\xed\xa0\x80"',  # an encoded surrogate
    ],
)
def test_invalid_utf8(data: bytes) -> None:
    assert reason_of(data) is Reason.NOT_JSON


@pytest.mark.parametrize("value", [[VALID], "conversation.v1", 42, 4.2, True, None])
def test_not_object(value: Any) -> None:
    assert reason_of(raw(value)) is Reason.NOT_OBJECT


@pytest.mark.parametrize("schema", [..., "conversation.v2", "classification.v1", None, 1, ["conversation.v1"]])
def test_unknown_or_missing_schema(schema: Any) -> None:
    assert reason_of(raw(event(schema=schema))) is Reason.UNKNOWN_SCHEMA


@pytest.mark.parametrize("field", ["event_id", "tenant_id", "conversation_id", "revision", "turns"])
def test_missing_required_field(field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_conversation(raw(event(**{field: ...})), LIMITS)
    assert info.value.reason is Reason.INVALID_FIELDS
    assert field in info.value.message  # the message names what is wrong


@pytest.mark.parametrize(
    "changes",
    [
        {"revision": "3"},
        {"revision": 3.0},
        {"revision": True},
        {"revision": None},
        {"turns": {"t1": {"turn_id": "t1", "speaker": "customer", "text": "hi"}}},
        {"turns": "hello"},
        {"turns": [{"turn_id": "t1", "speaker": "customer", "text": 42}]},
        {"turns": [{"turn_id": "t1", "speaker": "customer"}]},
        {"turns": [{"turn_id": 1, "speaker": "customer", "text": "hi"}]},
        {"turns": [{"turn_id": "", "speaker": "customer", "text": "hi"}]},
        {"turns": ["hi"]},
        {"metadata": ["channel", "chat"]},
        {"metadata": "chat"},
        {"tenant_id": 7},
        {"tenant_id": ""},
        {"event_id": None},
        {"occurred_at": "yesterday"},
    ],
    ids=lambda c: ",".join(f"{k}={v!r}"[:40] for k, v in c.items()),
)
def test_wrong_types(changes: dict[str, Any]) -> None:
    assert reason_of(raw(event(**changes))) is Reason.INVALID_FIELDS


def test_negative_revision() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_conversation(raw(event(revision=-1)), LIMITS)
    assert info.value.reason is Reason.INVALID_FIELDS
    assert "revision" in info.value.message


def test_revision_beyond_postgres_integer_is_rejected() -> None:
    # chunks.revision / classifications.revision are `integer`: a larger revision would fail the
    # Postgres write with a non-retriable DataError and stop the service on every restart.
    assert decode_conversation(raw(event(revision=2**31 - 1)), LIMITS).revision == 2**31 - 1
    assert reason_of(raw(event(revision=2**31))) is Reason.INVALID_FIELDS
    assert reason_of(raw(event(revision=2**63))) is Reason.INVALID_FIELDS


def test_empty_turns() -> None:
    assert reason_of(raw(event(turns=[]))) is Reason.EMPTY_TURNS


def test_all_whitespace_turns() -> None:
    turns = [
        {"turn_id": "t1", "speaker": "customer", "text": "   "},
        {"turn_id": "t2", "speaker": "agent", "text": "\n\t "},
        {"turn_id": "t3", "speaker": "agent", "text": ""},
    ]
    assert reason_of(raw(event(turns=turns))) is Reason.EMPTY_TURNS


def test_one_non_blank_turn_is_enough() -> None:
    turns = [
        {"turn_id": "t1", "speaker": "customer", "text": "   "},
        {"turn_id": "t2", "speaker": "agent", "text": "hello"},
    ]
    assert len(decode_conversation(raw(event(turns=turns)), LIMITS).turns) == 2


def test_too_many_turns() -> None:
    limits = LimitsConfig(max_turns=3)
    turns = [{"turn_id": f"t{i}", "speaker": "customer", "text": "hi"} for i in range(4)]
    assert reason_of(raw(event(turns=turns)), limits) is Reason.TOO_MANY_TURNS
    assert len(decode_conversation(raw(event(turns=turns[:3])), limits).turns) == 3


def test_too_large() -> None:
    limits = LimitsConfig(max_event_bytes=2_000)
    big = event(metadata={"pad": "x" * 2_000})
    assert len(raw(big)) > 2_000
    assert reason_of(raw(big), limits) is Reason.TOO_LARGE
    # checked before parsing: oversized garbage is too_large, not not_json
    assert reason_of(b"\xff" * 2_001, limits) is Reason.TOO_LARGE
    assert decode_conversation(raw(VALID), limits).event_id == "e-9f2"


def test_turn_text_too_long() -> None:
    limits = LimitsConfig(max_chars_per_turn=50)
    turns = [
        {"turn_id": "t1", "speaker": "customer", "text": "x" * 50},
        {"turn_id": "t2", "speaker": "agent", "text": "y" * 51},
    ]
    with pytest.raises(InvalidEvent) as info:
        decode_conversation(raw(event(turns=turns)), limits)
    assert info.value.reason is Reason.TEXT_TOO_LONG
    assert "t2" in info.value.message
    assert len(decode_conversation(raw(event(turns=turns[:1])), limits).turns) == 1


def test_deeply_nested_json_is_a_clean_invalid_event() -> None:
    depth = 100_000
    data = (
        b'{"schema": "conversation.v1", "event_id": "e", "tenant_id": "t", "conversation_id": "c",'
        b' "revision": 1, "turns": [{"turn_id": "t1", "speaker": "customer", "text": "hi"}], "metadata": {"x": '
        + b"[" * depth + b"]" * depth + b"}}"
    )
    assert len(data) < LIMITS.max_event_bytes  # so the depth, not the size, is what is tested
    assert reason_of(data) is Reason.NOT_JSON
    # deep nesting at the top level too
    assert reason_of(b"[" * depth + b"]" * depth) is Reason.NOT_JSON
    assert reason_of(b'{"a":' * depth + b"1" + b"}" * depth) is Reason.NOT_JSON


@pytest.mark.parametrize("depth", [100, 500, 1000])
def test_moderately_nested_metadata_never_crashes(depth: int) -> None:
    data = raw(event(metadata={})).replace(b'"metadata":{}', b'"metadata":{"x":' + b"[" * depth + b"]" * depth + b"}")
    try:
        ev = decode_conversation(data, LIMITS)
    except InvalidEvent:
        return
    assert "x" in ev.metadata


@pytest.mark.parametrize(
    "changes",
    [
        {"turns": [{"turn_id": "t1", "speaker": "customer", "text": "a\u0000b"}]},
        {"conversation_id": "c\u0000"},
    ],
)
def test_nul_characters_are_rejected(changes: dict[str, Any]) -> None:
    assert reason_of(raw(event(**changes))) is Reason.INVALID_FIELDS


def test_decode_raises_only_invalid_event_for_a_sweep_of_garbage() -> None:
    """Truncations of a valid event: every prefix is either valid or a clean InvalidEvent."""
    data = raw(VALID)
    for n in range(len(data)):
        with pytest.raises(InvalidEvent):
            decode_conversation(data[:n], LIMITS)
    assert decode_conversation(data, LIMITS).event_id == "e-9f2"


# -- event id ---------------------------------------------------------------------------------------

MODELS = {"embedder": "minilm-onnx-int8", "llm": "none"}


def test_event_id_is_deterministic() -> None:
    a = classification_event_id("acme", "c-1", 3, "qs1", dict(MODELS))
    b = classification_event_id("acme", "c-1", 3, "qs1", dict(reversed(list(MODELS.items()))))
    assert a == b
    assert isinstance(a, str) and len(a) >= 16


@pytest.mark.parametrize(
    "args",
    [
        ("acme", "c-1", 4, "qs1", MODELS),  # revision
        ("acme", "c-1", 3, "qs2", MODELS),  # question-set version
        ("acme", "c-1", 3, "qs1", {**MODELS, "embedder": "minilm-onnx"}),  # embedder
        ("acme", "c-1", 3, "qs1", {**MODELS, "llm": "qwen"}),  # llm
        ("acme", "c-1", 3, "qs1", {**MODELS, "heads": "h1"}),  # an extra model id
        ("acme", "c-2", 3, "qs1", MODELS),  # conversation
        ("other", "c-1", 3, "qs1", MODELS),  # tenant
    ],
)
def test_event_id_changes_with_each_input(args: tuple[Any, ...]) -> None:
    assert classification_event_id(*args) != classification_event_id("acme", "c-1", 3, "qs1", MODELS)


def test_event_id_fields_do_not_run_together() -> None:
    assert classification_event_id("ab", "c", 1, "q", {}) != classification_event_id("a", "bc", 1, "q", {})
    assert classification_event_id("a", "c1", 1, "q", {}) != classification_event_id("a", "c", 11, "q", {})


def test_event_id_follows_question_set_version() -> None:
    from agents.questions import Question, questions_from_sequence

    q1 = Question(id="q", version=1, text="Was the customer angry?")
    q2 = q1.model_copy(update={"version": 2})
    v1, v2 = questions_from_sequence([q1]).version, questions_from_sequence([q2]).version
    assert classification_event_id("a", "c", 1, v1, MODELS) != classification_event_id("a", "c", 1, v2, MODELS)


# -- classification.v1 ------------------------------------------------------------------------------


def test_build_classification_has_the_design_fields() -> None:
    conv = decode_conversation(raw(VALID), LIMITS).to_conversation()
    ev = Evidence(chunk_id="c-123:3:0", turn_ids=("t1", "t2"), char_start=0, char_end=44,
                  text="customer: I was charged twice for one order.", score=0.712345)
    answers = [
        Answer("bug_money_loss", 2, "yes", 0.931234, "head", (ev,)),
        Answer("customer_angry", 1, "no", 0.1, "similarity", ()),
    ]
    eid = classification_event_id(conv.tenant_id, conv.conversation_id, conv.revision, "qs1", MODELS)
    source = {"topic": "conversations", "partition": 0, "offset": 42}
    out = build_classification(conv, answers, event_id=eid, models=MODELS, source=source, latency_ms=37)

    assert set(out) == {"schema", "event_id", "tenant_id", "conversation_id", "revision", "answers", "models",
                        "source", "latency_ms"}
    assert out["schema"] == OUTPUT_SCHEMA == "classification.v1"
    assert (out["event_id"], out["tenant_id"], out["conversation_id"], out["revision"]) == (eid, "acme", "c-123", 3)
    assert out["models"] == MODELS
    assert out["source"] == source
    assert out["latency_ms"] == 37
    a0, a1 = out["answers"]
    assert set(a0) == {"question_id", "question_version", "answer", "p_yes", "decided_by", "evidence"}
    assert (a0["question_id"], a0["question_version"], a0["answer"], a0["decided_by"]) == (
        "bug_money_loss", 2, "yes", "head")
    assert a0["p_yes"] == pytest.approx(0.9312, abs=1e-4)
    (e0,) = a0["evidence"]
    assert set(e0) == {"chunk_id", "turn_ids", "char_start", "char_end", "text", "score"}
    assert e0["turn_ids"] == ["t1", "t2"]
    assert (e0["char_start"], e0["char_end"]) == (0, 44)
    assert e0["score"] == pytest.approx(0.7123, abs=1e-4)
    assert a1["evidence"] == []

    # it encodes to JSON and round-trips
    assert orjson.loads(encode(out)) == out


def test_a_replay_builds_the_same_event_but_for_its_latency() -> None:
    """The output depends on the input alone (no clock, no random id, no object identity): a replay
    of the same record, decoded afresh and answered afresh, differs only in latency_ms."""
    raw = orjson.dumps({"schema": "conversation.v1", "event_id": "e", "tenant_id": "acme", "conversation_id": "c-1",
                        "revision": 1, "turns": [{"turn_id": "t1", "speaker": "customer", "text": "hi"}]})

    def replay(latency_ms: int) -> dict[str, Any]:
        conv = decode_conversation(raw, LimitsConfig()).to_conversation()
        answer = Answer("q", 1, "no", 0.25, "head", (Evidence("c-1:1:0", ("t1",), 0, 12, "customer: hi", 0.5),))
        source = {"topic": "t", "partition": 1, "offset": 2}
        return orjson.loads(encode(build_classification(conv, [answer], event_id="x", models=dict(MODELS),
                                                        source=source, latency_ms=latency_ms)))

    first, again = replay(5), replay(900)
    assert (first.pop("latency_ms"), again.pop("latency_ms")) == (5, 900)
    assert first == again
