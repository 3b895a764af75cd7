"""Prometheus metrics, defined once per registry (tests pass their own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Batch work takes tens of ms to seconds on CPU; web-request default buckets would hide it.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.consumed = Counter(
            "flexor_events_consumed_total", "Input records fetched", ["topic"], registry=registry
        )
        self.classified = Counter(
            "flexor_conversations_classified_total", "Classification events produced", registry=registry
        )
        self.skipped = Counter(
            "flexor_events_skipped_total",
            "Valid events acknowledged without new output",
            ["reason"],
            registry=registry,
        )
        self.dlq = Counter(
            "flexor_dlq_events_total", "Events sent to the dead-letter topic", ["reason"], registry=registry
        )
        self.batch_size = Histogram(
            "flexor_batch_size", "Records per micro-batch", buckets=_BATCH_BUCKETS, registry=registry
        )
        self.stage_seconds = Histogram(
            "flexor_stage_seconds",
            "Time per batch in each pipeline stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.event_latency = Histogram(
            "flexor_event_latency_seconds",
            "From fetch to committed output, per event",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.answers = Counter(
            "flexor_answers_total",
            "Answers by question, answer and deciding stage",
            ["question_id", "answer", "decided_by"],
            registry=registry,
        )
        self.lag = Gauge(
            "flexor_consumer_lag", "High-water mark minus position", ["topic", "partition"], registry=registry
        )
        self.in_flight = Gauge("flexor_in_flight_events", "Fetched, not yet committed", registry=registry)
        self.paused = Gauge("flexor_partitions_paused", "1 while consumption is paused", registry=registry)
        self.commits = Counter("flexor_commits_total", "Offset commits", ["result"], registry=registry)
        self.retries = Counter(
            "flexor_batch_retries_total", "Batch attempts retried after a retriable error", ["error"],
            registry=registry,
        )
        self.llm_fallbacks = Counter(
            "flexor_llm_fallbacks_total", "Uncertain answers kept from stage 1 because the LLM failed",
            registry=registry,
        )
        self.cache = Counter(
            "flexor_result_cache_total", "LLM result cache lookups", ["result"], registry=registry
        )
        self.texts_embedded = Counter(
            "flexor_texts_embedded_total", "Chunk texts run through the embedder", registry=registry
        )
        self.embedding_cache = Counter(
            "flexor_embedding_cache_total", "Chunk texts looked up in the embedding reuse cache", ["result"],
            registry=registry,
        )
        self.embedding_cache_bytes = Gauge(
            "flexor_embedding_cache_bytes", "Bytes held by the embedding reuse cache", registry=registry
        )
        self.transactions = Counter(
            "flexor_transactions_total", "Exactly-once batch transactions", ["result"], registry=registry
        )
        self.backfill = Counter(
            "flexor_backfill_conversations_total",
            "Stored conversations taken from backfill work items, by outcome",
            ["result"],  # published, answered_already, stale, refused
            registry=registry,
        )
        self.backfill_items = Counter(
            "flexor_backfill_items_total", "Backfill work items finished or dead-lettered", ["result"],
            registry=registry,
        )
        self.feedback = Counter(
            "flexor_feedback_total", "Feedback records consumed", ["result"], registry=registry
        )
        self.ready = Gauge("flexor_ready", "1 when Kafka and Postgres are reachable", registry=registry)
        self.dependency_up = Gauge(
            "flexor_dependency_up", "1 while the dependency is reachable", ["dependency"], registry=registry
        )
        self.dependency_errors = Counter(
            "flexor_dependency_errors_total", "Failed attempts to reach a dependency (probes and batches)",
            ["dependency"], registry=registry,
        )
        # Are the answers still right? (agents/monitor.py: audit sampling, shadow heads, drift)
        self.audit = Counter(
            "flexor_audit_answers_total", "Audited stage-1 answers, by agreement with the LLM",
            ["question_id", "result"], registry=registry,
        )
        self.audit_failures = Counter(
            "flexor_audit_failures_total", "Audited answers without a stored LLM answer", ["reason"],
            registry=registry,
        )
        self.shadow = Counter(
            "flexor_shadow_answers_total", "Candidate-head answers, by agreement with the live heads' answers",
            ["question_id", "result"], registry=registry,
        )
        self.drift_psi = Gauge(
            "flexor_drift_psi", "Population stability index of recent p_yes against the head's training data",
            ["question_id"], registry=registry,
        )
        self.yes_rate = Gauge(
            "flexor_drift_yes_rate", "Share of yes answers (stage 1) in the recent window", ["question_id"],
            registry=registry,
        )
        self.reference_yes_rate = Gauge(
            "flexor_drift_reference_yes_rate", "Share of yes answers of the live head on its training data",
            ["question_id"], registry=registry,
        )
