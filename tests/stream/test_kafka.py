"""Topic creation (`stream.kafka.ensure_topics`) on the real broker."""

from __future__ import annotations

import uuid

from aiokafka.admin import AIOKafkaAdminClient

from stream.config import KafkaConfig, TopicsConfig
from stream.kafka import connection_kwargs, ensure_topics
from tests.conftest import Endpoints


async def test_topics_are_created_with_the_configured_partitions_and_replication_factor(infra: Endpoints) -> None:
    suffix = uuid.uuid4().hex[:8]
    topics = TopicsConfig(input=f"in-{suffix}", output=f"out-{suffix}", dlq=f"dlq-{suffix}", partitions=2,
                          replication_factor=3)
    cfg = KafkaConfig(bootstrap_servers=infra.bootstrap_servers)
    await ensure_topics(cfg, topics)
    await ensure_topics(cfg, topics)  # existing topics are left alone
    admin = AIOKafkaAdminClient(**connection_kwargs(cfg))
    await admin.start()
    try:
        described = await admin.describe_topics([topics.input, topics.output, topics.dlq])
    finally:
        await admin.close()
    assert {t["topic"] for t in described} == {topics.input, topics.output, topics.dlq}
    for t in described:
        assert t["error_code"] == 0 and len(t["partitions"]) == 2, t
        assert all(len(p["replicas"]) == 3 for p in t["partitions"]), t  # the embedded broker records it
