"""The testcontainers path (`FLEXOR_TEST_CONTAINERS=1`): the same tests on the images that
docker-compose.yml runs, Apache Kafka in KRaft mode and pgvector/pgvector, where a Docker engine is
reachable. testcontainers' own KafkaContainer drives Confluent's image and start scripts, so the
Apache Kafka container is configured here (single node, broker and controller)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from stream.dev.infra import free_port

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def compose_images() -> dict[str, str]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {"kafka": services["kafka"]["image"], "postgres": services["postgres"]["image"]}


def unavailable_reason() -> str | None:
    """Why the containers cannot run here, in words that name the cause; None when they can."""
    try:
        import docker
        import testcontainers  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed: pip install -e '.[test]'"
    try:
        docker.from_env().ping()
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return f"no Docker engine is reachable ({type(e).__name__}: {first})"
    return None


@contextmanager
def apache_kafka(image: str) -> Iterator[str]:
    """A single-node KRaft broker; yields its bootstrap servers. The host port is chosen first, so
    the advertised listener can name it."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    port = free_port()
    container = (
        DockerContainer(image)
        .with_bind_ports(29092, port)
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("CLUSTER_ID", "Xx48KntNTo-aGyw9Tl9qew")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093,HOST://:29092")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://localhost:9092,HOST://localhost:{port}")
        .with_env("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,HOST:PLAINTEXT")
        .with_env("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
    )
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=180)
        yield f"localhost:{port}"


@contextmanager
def pgvector(image: str) -> Iterator[str]:
    """PostgreSQL with pgvector; yields a superuser URL."""
    from testcontainers.community.postgres import PostgresContainer

    with PostgresContainer(image, driver=None) as pg:
        yield pg.get_connection_url()
