"""Event schemas: decode and validate conversation.v1, build classification.v1.

Validation never raises anything but `InvalidEvent`, whose `reason` is a short stable code
(the DLQ header and the metric label) and whose message says what was wrong.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.chunking import Turn
from agents.types import Answer, Conversation
from stream.config import LimitsConfig

INPUT_SCHEMA = "conversation.v1"
OUTPUT_SCHEMA = "classification.v1"
FEEDBACK_SCHEMA = "feedback.v1"


class Reason(StrEnum):
    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    UNKNOWN_SCHEMA = "unknown_schema"
    INVALID_FIELDS = "invalid_fields"
    EMPTY_TURNS = "empty_turns"
    TOO_MANY_TURNS = "too_many_turns"
    TEXT_TOO_LONG = "text_too_long"
    # Valid, but classifying it raised (`stream.poison`); not a decode outcome.
    PROCESSING_ERROR = "processing_error"


class InvalidEvent(ValueError):
    """`error_type`: the exception's type when a processing error put the record in the DLQ."""

    def __init__(self, reason: Reason, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.error_type = error_type


class TurnV1(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    turn_id: str = Field(min_length=1, max_length=128)
    speaker: str = Field(min_length=1, max_length=64)
    text: str


class ConversationV1(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, title="conversation.v1")

    schema_: Literal["conversation.v1"] = Field(alias="schema")
    event_id: str = Field(min_length=1, max_length=256)
    tenant_id: str = Field(min_length=1, max_length=128)
    conversation_id: str = Field(min_length=1, max_length=256)
    revision: int = Field(ge=0, le=2**31 - 1)  # Postgres `integer` columns
    status: str = Field(default="closed", max_length=32)
    occurred_at: datetime | None = Field(default=None, strict=False)
    metadata: dict[str, Any] = Field(default_factory=dict)
    turns: list[TurnV1] = Field(min_length=1)

    def to_conversation(self) -> Conversation:
        return Conversation(
            tenant_id=self.tenant_id,
            conversation_id=self.conversation_id,
            revision=self.revision,
            turns=tuple(Turn(t.turn_id, t.speaker, t.text) for t in self.turns),
            metadata=self.metadata,
            status=self.status,
            occurred_at=self.occurred_at,
        )


M = TypeVar("M", bound=BaseModel)


def parse_envelope(raw: bytes | None, schema: str, max_bytes: int | None = None) -> dict[str, Any]:
    """What every topic the service consumes asks of a record first: a value, within `max_bytes`,
    JSON without NUL characters, an object, with `schema`. InvalidEvent with the reason otherwise."""
    if raw is None:
        raise InvalidEvent(Reason.NOT_JSON, "event has no value (tombstone)")
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidEvent(Reason.TOO_LARGE, f"event is {len(raw)} bytes, limit is {max_bytes}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidEvent(Reason.NOT_JSON, f"not valid JSON: {e}") from None
    # Postgres text and jsonb cannot hold NUL: such an event would fail every retry downstream.
    if b"\\u0000" in raw:
        raise InvalidEvent(Reason.INVALID_FIELDS, "NUL characters (\\u0000) are not supported")
    if not isinstance(data, dict):
        raise InvalidEvent(Reason.NOT_OBJECT, f"event is a JSON {type(data).__name__}, not an object")
    if data.get("schema") != schema:
        raise InvalidEvent(Reason.UNKNOWN_SCHEMA, f"schema is {data.get('schema')!r}, expected {schema!r}")
    return data


def validate_fields(model: type[M], data: dict[str, Any]) -> M:
    """`model` from a parsed envelope; InvalidEvent(invalid_fields) naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidEvent(Reason.INVALID_FIELDS, f"{where}: {first['msg']}") from None


def decode_conversation(raw: bytes | None, limits: LimitsConfig) -> ConversationV1:
    data = parse_envelope(raw, INPUT_SCHEMA, limits.max_event_bytes)
    turns = data.get("turns")
    if isinstance(turns, list):
        if not turns:
            raise InvalidEvent(Reason.EMPTY_TURNS, "turns is empty")
        if len(turns) > limits.max_turns:
            raise InvalidEvent(
                Reason.TOO_MANY_TURNS, f"{len(turns)} turns, limit is {limits.max_turns}"
            )
    event = validate_fields(ConversationV1, data)
    for t in event.turns:
        if len(t.text) > limits.max_chars_per_turn:
            raise InvalidEvent(
                Reason.TEXT_TOO_LONG,
                f"turn {t.turn_id} has {len(t.text)} characters, limit is {limits.max_chars_per_turn}",
            )
    if not any(t.text.strip() for t in event.turns):
        raise InvalidEvent(Reason.EMPTY_TURNS, "every turn's text is empty")
    _check_storable(event)
    return event


MAX_METADATA_DEPTH = 32


def _check_storable(event: ConversationV1) -> None:
    """Reject metadata nested deeper than MAX_METADATA_DEPTH: it parses, but JSON encoders refuse
    deep trees (orjson at 255 levels), so it would fail later, after the model work."""
    stack: list[tuple[Any, int]] = [(event.metadata, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            raise InvalidEvent(Reason.INVALID_FIELDS, f"metadata: nested deeper than {MAX_METADATA_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


class FeedbackV1(BaseModel):
    """A reviewer's answer to one question about one conversation revision (topic `topics.feedback`)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    schema_: Literal["feedback.v1"] = Field(alias="schema")
    tenant_id: str = Field(min_length=1, max_length=128)
    conversation_id: str = Field(min_length=1, max_length=256)
    revision: int = Field(ge=0, le=2**31 - 1)
    question_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    question_version: int = Field(ge=1, le=2**31 - 1)
    answer: Literal["yes", "no"]
    reviewer: str = Field(min_length=1, max_length=256)


def decode_feedback(raw: bytes | None, limits: LimitsConfig) -> FeedbackV1:
    """feedback.v1 bytes -> FeedbackV1; InvalidEvent with the reason otherwise."""
    return validate_fields(FeedbackV1, parse_envelope(raw, FEEDBACK_SCHEMA, limits.max_event_bytes))


def classification_event_id(
    tenant_id: str, conversation_id: str, revision: int, question_set_version: str, models: dict[str, str]
) -> str:
    key = "\x1f".join(
        [tenant_id, conversation_id, str(revision), question_set_version]
        + [f"{k}={v}" for k, v in sorted(models.items())]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def build_classification(
    conv: Conversation,
    answers: list[Answer],
    *,
    event_id: str,
    models: dict[str, str],
    source: dict[str, Any],
    latency_ms: int,
) -> dict[str, Any]:
    return {
        "schema": OUTPUT_SCHEMA,
        "event_id": event_id,
        "tenant_id": conv.tenant_id,
        "conversation_id": conv.conversation_id,
        "revision": conv.revision,
        "answers": [a.as_dict() for a in answers],
        "models": models,
        "source": source,
        "latency_ms": latency_ms,
    }


def encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


# -- the output contract, as models: docs/schemas/*.json are generated from these (stream.contracts) --


class EvidenceV1(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunk_id: str
    turn_ids: list[str]
    char_start: int = Field(ge=0, description="offset into the transcript: each turn as `speaker: text`, one a line")
    char_end: int = Field(ge=0)
    text: str = Field(description="transcript[char_start:char_end]")
    score: float = Field(description="cosine similarity of the chunk to the question's retrieval text")


class AnswerV1(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question_id: str
    question_version: int = Field(ge=1)
    answer: Literal["yes", "no"]
    p_yes: float = Field(ge=0.0, le=1.0)
    decided_by: str = Field(
        pattern=r"^(head|few-shot|similarity|llm|cache)(-fallback)?$",
        description="the stage that decided; `-fallback`: the LLM failed and stage 1's answer stands",
    )
    evidence: list[EvidenceV1]


class SourceV1(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class ClassificationV1(BaseModel):
    """One per conversation revision, keyed by conversation_id. Dedupe on event_id."""

    model_config = ConfigDict(extra="forbid", title="classification.v1")

    schema_: Literal["classification.v1"] = Field(alias="schema")
    event_id: str = Field(description="hash of tenant, conversation, revision, question-set version and model ids")
    tenant_id: str
    conversation_id: str
    revision: int = Field(ge=0)
    answers: list[AnswerV1]
    models: dict[str, str] = Field(description="model ids: embedder, heads, llm")
    source: SourceV1
    latency_ms: int = Field(ge=0, description="from the input record's Kafka timestamp to this event")


class DeadLetterHeadersV1(BaseModel):
    """The headers of a dead-letter record (values UTF-8). The key and value are the input
    record's own bytes; the input's own headers come first, those whose names clash with the ones
    below renamed `original.<name>`."""

    model_config = ConfigDict(extra="allow", title="dead-letter record headers", populate_by_name=True)

    error_reason: Reason = Field(alias="error.reason")
    error_message: str = Field(alias="error.message")
    error_type: str | None = Field(
        default=None, alias="error.type", description="the exception's type, for reason processing_error"
    )
    error_truncated_from: str | None = Field(
        default=None, alias="error.truncated_from", pattern=r"^[0-9]+$",
        description="the original length in bytes, when the value was cut to limits.max_event_bytes",
    )
    source_topic: str = Field(alias="source.topic")
    source_partition: str = Field(alias="source.partition", pattern=r"^[0-9]+$")
    source_offset: str = Field(alias="source.offset", pattern=r"^[0-9]+$")
    ce_specversion: Literal["1.0"]
    ce_id: str = Field(description="<source topic>/<partition>/<offset>")
    ce_source: str
    ce_type: Literal["flexor.deadletter.v1"]
    ce_time: str
    content_type: Literal["application/octet-stream"] = Field(alias="content-type")
