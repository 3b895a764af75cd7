"""Session fixtures: a real Kafka-protocol broker and a real PostgreSQL + pgvector, started from
their PyPI packages (they start in under a second), with a fresh database and unique topic
names per test. Where a Docker engine exists, `FLEXOR_TEST_CONTAINERS=1` uses testcontainers
instead (the Apache Kafka and pgvector images of docker-compose.yml, `tests/containers.py`); where it
cannot run, the tests skip with the reason (testcontainers missing, or no Docker engine).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from stream.config import Settings, load_settings
from stream.dev.infra import EmbeddedStack

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FLEXOR_SHARED_DATA", REPO.parent / "shared" / "data"))
EXAMPLES = REPO / "examples"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (set FLEXOR_SHARED_DATA to the labelled data folder)")
    return path


class Endpoints:
    def __init__(self, bootstrap_servers: str, postgres_url: str, stack: EmbeddedStack | None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.postgres_url = postgres_url
        self.stack = stack


@pytest.fixture(scope="session")
def infra() -> Iterator[Endpoints]:
    if os.environ.get("FLEXOR_TEST_CONTAINERS") == "1":
        from tests import containers

        reason = containers.unavailable_reason()
        if reason is not None:
            pytest.skip(f"FLEXOR_TEST_CONTAINERS=1 but {reason}")
        images = containers.compose_images()
        with containers.apache_kafka(images["kafka"]) as kafka, containers.pgvector(images["postgres"]) as pg:
            yield Endpoints(kafka, pg, None)
        return
    with EmbeddedStack() as stack:
        yield Endpoints(stack.broker.bootstrap_servers, stack.postgres.url, stack)


@asynccontextmanager
async def fresh_database(infra: Endpoints) -> AsyncIterator[str]:
    """A new database on the session server, dropped afterwards; yields its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(infra.postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield infra.postgres_url.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(infra.postgres_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except (OSError, asyncpg.PostgresError):
        pass  # a fault test may have left the server restarting; the temp dir goes at session end
    finally:
        await admin.close()


@pytest.fixture
async def database(infra: Endpoints) -> AsyncIterator[str]:
    """A fresh database per test; the URL of it."""
    async with fresh_database(infra) as url:
        yield url


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test's fresh database, migrated."""
    from agents.store import create_pool
    from agents.store.migrate import migrate

    conn = await asyncpg.connect(database)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    pool = await create_pool(database, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def settings(infra: Endpoints, database: str) -> Settings:
    return make_settings(infra, database)


def make_settings(infra: Endpoints, database: str, **overrides: object) -> Settings:
    """Settings for one test: its own database, topics and consumer group, short timeouts;
    `overrides` by dotted name ("models.llm")."""
    suffix = uuid.uuid4().hex[:8]
    return load_settings(
        None,
        **{
            "kafka.bootstrap_servers": infra.bootstrap_servers,
            # Tansu admits a new member after about half the session timeout: keep it short.
            "kafka.session_timeout_ms": 3000,
            "kafka.heartbeat_interval_ms": 300,
            "database_url": database,
            "topics.input": f"conversations-{suffix}",
            "topics.output": f"classifications-{suffix}",
            "topics.dlq": f"dlq-{suffix}",
            "topics.backfill": f"backfill-{suffix}",
            "topics.feedback": f"feedback-{suffix}",
            "topics.partitions": 4,
            "group_id": f"group-{suffix}",
            "questions_file": EXAMPLES / "questions.yaml",
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            "batch.max_wait_ms": 100,
            **overrides,
        },
    )


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    return asyncio.DefaultEventLoopPolicy()
