"""Optional OpenTelemetry spans for each batch (the `otel` extra; nothing happens without it).

A batch gets a `process <input topic>` span (kind CONSUMER) with the messaging attributes
(`messaging.system=kafka`, `messaging.destination.name`, `messaging.consumer.group.name`,
`messaging.batch.message_count`) and one link per input record: to the record's own trace when it
carries a W3C `traceparent`, with `messaging.destination.partition.id` and `messaging.kafka.offset`
on the link. Its stages (decode, embed, store, retrieve, stage1, cascade, deliver) are child spans.
The spans go to whatever tracer provider the process configured (the SDK, `opentelemetry-instrument`);
the default provider records nothing. The output and dead-letter records carry the input's
`traceparent` as it came (`stream.headers`), so a downstream consumer continues the producer's trace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from stream.intake import Fetched

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.propagate import extract
except ImportError:  # the `otel` extra is not installed
    trace = None  # type: ignore[assignment]


class BatchTracer:
    def __init__(self, input_topic: str, group_id: str) -> None:
        self.input_topic = input_topic
        self.group_id = group_id
        self._tracer = trace.get_tracer("flexor-stream") if trace is not None else None
        self._batch: Any = None  # the current batch span, parent of the stage spans

    @contextmanager
    def batch(self, records: Sequence[Fetched]) -> Iterator[None]:
        if self._tracer is None:
            yield
            return
        links = [trace.Link(_span_context(f), {"messaging.destination.partition.id": str(f.record.partition),
                                              "messaging.kafka.offset": f.record.offset}) for f in records]
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": self.input_topic,
            "messaging.consumer.group.name": self.group_id,
            "messaging.batch.message_count": len(records),
        }
        partitions = {f.record.partition for f in records}
        if len(partitions) == 1:
            attributes["messaging.destination.partition.id"] = str(next(iter(partitions)))
        # A root span: a batch mixes records of many traces, which it links to instead.
        with self._tracer.start_as_current_span(
            f"process {self.input_topic}", context=otel_context.Context(), kind=trace.SpanKind.CONSUMER,
            links=links, attributes=attributes,
        ) as span:
            self._batch = span
            try:
                yield
            finally:
                self._batch = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._tracer is None or self._batch is None:
            yield
            return
        with self._tracer.start_as_current_span(name, context=trace.set_span_in_context(self._batch)):
            yield

    def finished_stage(self, name: str, seconds: float) -> None:
        """A stage the pipeline timed (it reports durations when they end): its span, after the fact."""
        if self._tracer is None or self._batch is None:
            return
        end = time.time_ns()
        span = self._tracer.start_span(name, context=trace.set_span_in_context(self._batch),
                                       start_time=end - int(seconds * 1e9))
        span.end(end_time=end)


def _span_context(f: Fetched) -> Any:
    carrier = {k.lower(): bytes(v).decode("latin-1") for k, v in f.record.headers or () if k.lower() in
               ("traceparent", "tracestate")}
    return trace.get_current_span(extract(carrier)).get_span_context()
