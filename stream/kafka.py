"""aiokafka clients built from config: security settings in one place, auto-commit always off."""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from stream.config import KafkaConfig, TopicsConfig


def connection_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=cfg.ssl_cafile)
        if cfg.ssl_certfile:
            ctx.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
        kw["ssl_context"] = ctx
    if cfg.security_protocol.startswith("SASL"):
        assert cfg.sasl_password is not None  # checked by the config validator
        kw.update(
            sasl_mechanism=cfg.sasl_mechanism,
            sasl_plain_username=cfg.sasl_username,
            sasl_plain_password=cfg.sasl_password.get_secret_value(),
        )
    return kw


def make_consumer(cfg: KafkaConfig, topic: str, group_id: str, max_records: int) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        max_poll_interval_ms=cfg.max_poll_interval_ms,
        max_poll_records=max_records,
        isolation_level="read_committed" if cfg.exactly_once else "read_uncommitted",
        **connection_kwargs(cfg),
    )


def make_producer(
    cfg: KafkaConfig, transactional_id: str | None = None, max_request_size: int = 4 << 20
) -> AIOKafkaProducer:
    kw: dict[str, Any] = {
        "acks": "all", "linger_ms": 5, "max_batch_size": 1 << 20, "max_request_size": max_request_size,
    }
    if transactional_id:
        kw["transactional_id"] = transactional_id
        kw["enable_idempotence"] = True
    return AIOKafkaProducer(**kw, **connection_kwargs(cfg))


async def ensure_topics(cfg: KafkaConfig, topics: TopicsConfig) -> None:
    """Create the input, output, DLQ, feedback and backfill topics that do not exist yet, with
    `topics.partitions` and `topics.replication_factor`; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(**connection_kwargs(cfg))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(t, topics.partitions, topics.replication_factor)
            for t in (topics.input, topics.output, topics.dlq, topics.feedback, topics.backfill)
            if t not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
