"""Kafka record headers of what the service writes: CloudEvents binary mode, W3C trace context,
and the dead-letter headers (with their inverse, for `flexor dlq replay`).

CloudEvents' Kafka protocol binding, binary content mode: the JSON body stays as it is, and the
event's attributes travel as `ce_`-prefixed headers plus `content-type`, so CloudEvents SDKs and
Knative-style consumers read the records without a wrapper.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

Headers = list[tuple[str, bytes]]

SPECVERSION = "1.0"
CLASSIFICATION_TYPE = "flexor.classification.v1"
DEAD_LETTER_TYPE = "flexor.deadletter.v1"
TRACE_HEADERS = ("traceparent", "tracestate")
# What the DLQ adds to a record's own headers; an original header of the same name is kept as
# `original.<name>`, so a replay can give the record back exactly as it came.
ERROR_HEADERS = ("error.reason", "error.message", "error.type", "error.truncated_from")
SOURCE_HEADERS = ("source.topic", "source.partition", "source.offset")
CE_HEADERS = ("ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject", "content-type")
DLQ_ADDED = frozenset(ERROR_HEADERS + SOURCE_HEADERS + CE_HEADERS)
ORIGINAL_PREFIX = "original."


def service_source(group_id: str) -> str:
    """The CloudEvents `source` of everything one consumer group of the service writes."""
    return f"/flexor-stream/{group_id}"


def cloudevent(
    *, id: str, type: str, source: str, subject: str | None, content_type: str, time: datetime | None = None
) -> Headers:
    out = [
        ("ce_specversion", SPECVERSION),
        ("ce_id", id),
        ("ce_source", source),
        ("ce_type", type),
        ("ce_time", (time or datetime.now(UTC)).isoformat().replace("+00:00", "Z")),
    ]
    if subject is not None:
        out.append(("ce_subject", subject))
    out.append(("content-type", content_type))
    return [(k, v.encode()) for k, v in out]


def trace_context(headers: Iterable[tuple[str, bytes]] | None) -> Headers:
    """The W3C trace context headers of an input record (`traceparent`, `tracestate`), if any."""
    return [(k, v) for k, v in headers or () if k.lower() in TRACE_HEADERS]


def classification_headers(
    event_id: str, conversation_id: str, group_id: str, input_headers: Sequence[tuple[str, bytes]] | None
) -> Headers:
    return cloudevent(
        id=event_id, type=CLASSIFICATION_TYPE, source=service_source(group_id), subject=conversation_id,
        content_type="application/json",
    ) + trace_context(input_headers)


def dead_letter_headers(
    original: Sequence[tuple[str, bytes]] | None, *, topic: str, partition: int, offset: int, group_id: str,
    reason: str, message: str, truncated_from: int | None = None, error_type: str | None = None,
) -> Headers:
    """The original headers (renamed where they clash), the error and its source, and CloudEvents
    attributes. The body is the original bytes, whatever they are: `application/octet-stream`."""
    kept = [(ORIGINAL_PREFIX + k if k in DLQ_ADDED else k, v) for k, v in original or ()]
    added = [
        ("error.reason", reason.encode()),
        ("error.message", message[:1000].encode("utf-8", "replace")),
    ]
    if error_type is not None:  # a processing error: the exception's type
        added.append(("error.type", error_type.encode()))
    if truncated_from is not None:
        added.append(("error.truncated_from", str(truncated_from).encode()))
    added += [
        ("source.topic", topic.encode()),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
    ]
    ce = cloudevent(
        id=f"{topic}/{partition}/{offset}", type=DEAD_LETTER_TYPE, source=service_source(group_id), subject=None,
        content_type="application/octet-stream",
    )
    return kept + added + ce


def original_headers(dlq_headers: Sequence[tuple[str, bytes]] | None) -> Headers:
    """The inverse of `dead_letter_headers`: the input record's own headers, as they came."""
    out = []
    for k, v in dlq_headers or ():
        if k in DLQ_ADDED:
            continue
        name = k.removeprefix(ORIGINAL_PREFIX)
        out.append((name if name in DLQ_ADDED else k, v))
    return out
