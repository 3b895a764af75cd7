"""Error classes (`stream.errors`): the classifier on real exceptions, and what the service does with
a real fatal condition: it stops, says why in one log line, exits non-zero, and /readyz's body
says "failed" with the error (where a retriable error says "retrying": tests/stream/test_service.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors
from pydantic import SecretStr

from stream.config import Settings
from stream.dev.infra import free_port
from stream.dev.produce import load_conversations
from stream.errors import ErrorKind, FatalError, classify
from tests.conftest import EXAMPLES
from tests.harness import committed, count_rows, create_topics, produce, running_service, start_serve, wait_until

R, F, P = ErrorKind.RETRIABLE, ErrorKind.FATAL, ErrorKind.PROCESSING


# -- the classifier -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, kind",
    [
        (kafka_errors.KafkaConnectionError(), R),
        (kafka_errors.NotLeaderForPartitionError(), R),
        (kafka_errors.RequestTimedOutError(), R),
        (kafka_errors.NodeNotReadyError(), R),
        (kafka_errors.CoordinatorNotAvailableError(), R),
        # aiokafka's flag says fatal; it is what a send raises when no broker answered in time.
        (kafka_errors.KafkaTimeoutError(), R),
        (kafka_errors.KafkaError("Unable to get cluster metadata over all known brokers"), R),
        (kafka_errors.TopicAuthorizationFailedError(), F),
        (kafka_errors.GroupAuthorizationFailedError(), F),
        (kafka_errors.ClusterAuthorizationFailedError(), F),
        (kafka_errors.TransactionalIdAuthorizationFailed(), F),
        (kafka_errors.ProducerFenced(), F),
        (kafka_errors.InvalidProducerEpoch(), F),
        (kafka_errors.SaslAuthenticationFailed(), F),
        (kafka_errors.UnsupportedVersionError(), F),
        (ValueError("tokenizer: unexpected input"), P),
        (IndexError("list index out of range"), P),
        (RuntimeError("onnxruntime: invalid shape"), P),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_library_exceptions(error: BaseException, kind: ErrorKind) -> None:
    assert classify(error) is kind


def test_a_wrapped_kafka_error_is_judged_by_what_it_wraps() -> None:
    for inner, kind in ((kafka_errors.GroupAuthorizationFailedError(), F), (kafka_errors.NodeNotReadyError(), R)):
        try:
            raise kafka_errors.KafkaError(repr(inner)) from inner
        except kafka_errors.KafkaError as e:
            assert classify(e) is kind


async def test_errors_of_real_kafka_and_postgres_operations(database: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    producer = AIOKafkaProducer(bootstrap_servers=dead, request_timeout_ms=1000)
    with pytest.raises(kafka_errors.KafkaError) as info:
        await producer.start()
    await producer.stop()
    assert classify(info.value) is R  # nothing listening: an outage

    with pytest.raises(OSError) as refused:
        await asyncpg.connect(f"postgresql://postgres@{dead}/postgres", timeout=5)
    assert classify(refused.value) is R

    conn = await asyncpg.connect(database)
    other = await asyncpg.connect(database)
    try:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        cases: list[tuple[str, ErrorKind]] = [
            ("SELECT * FROM no_such_table", F),  # 42P01: the schema is not what the code needs
            ("SELECT no_such_column FROM t", F),  # 42703
            ("SELECT 1 / 0", P),  # 22012: a value's doing
            ("INSERT INTO t VALUES (1), (1)", P),  # 23505
        ]
        for sql, kind in cases:
            with pytest.raises(asyncpg.PostgresError) as pg:
                await conn.execute(sql)
            assert classify(pg.value) is kind, (sql, type(pg.value).__name__)

        # Another session holds a lock: lock_not_available (55P03) passes.
        await other.execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        await conn.execute("SET lock_timeout = '100ms'")
        with pytest.raises(asyncpg.PostgresError) as locked:
            await conn.execute("INSERT INTO t VALUES (2)")
        assert type(locked.value).__name__ == "LockNotAvailableError" and classify(locked.value) is R
        await other.execute("ROLLBACK")

        # A role without the grant: permission denied (42501) does not pass by waiting.
        role = f"r_{uuid.uuid4().hex[:8]}"
        await conn.execute(f"CREATE ROLE {role} LOGIN")
        limited = await asyncpg.connect(database.replace("postgres@", f"{role}@", 1))
        try:
            with pytest.raises(asyncpg.PostgresError) as denied:
                await limited.fetch("SELECT * FROM t")
            assert type(denied.value).__name__ == "InsufficientPrivilegeError" and classify(denied.value) is F
        finally:
            await limited.close()

        # An administrator ended the session (57P01): the server is shutting down or restarting.
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await other.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError,
                            OSError)) as ended:
            await conn.execute("SELECT 1")
        assert classify(ended.value) is R, type(ended.value).__name__

        with pytest.raises(asyncpg.exceptions.DataError) as bad_arg:  # asyncpg cannot encode it
            await other.execute("INSERT INTO t VALUES ($1)", "not a number")
        assert classify(bad_arg.value) is P
    finally:
        await conn.close()
        await other.close()

    with pytest.raises(asyncpg.PostgresError) as missing_db:  # 3D000
        await asyncpg.connect(database.rsplit("/", 1)[0] + "/no_such_database")
    assert classify(missing_db.value) is F


# -- the service on a real fatal condition -----------------------------------------------------------


async def test_permission_denied_stops_the_service_and_readyz_says_failed(settings: Settings) -> None:
    """The service's role may not read the classifications table: retrying cannot help, so the
    service stops (before, it retried forever with consumption paused) and commits nothing."""
    url = settings.database_url.get_secret_value()
    admin = await asyncpg.connect(url)
    role = f"r_{uuid.uuid4().hex[:8]}"
    try:
        from agents.store.migrate import migrate

        await migrate(admin)
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"GRANT CREATE ON SCHEMA public TO {role}")  # its start-up migrate check runs
        await admin.execute(f"GRANT SELECT ON schema_migrations TO {role}")
        await admin.execute(f"GRANT ALL ON chunks, llm_results TO {role}")  # not classifications
    finally:
        await admin.close()
    limited = settings.model_copy(update={"database_url": SecretStr(url.replace("postgres@", f"{role}@", 1))})
    await create_topics(limited)
    inputs = load_conversations(EXAMPLES / "conversations.jsonl", 4)
    with pytest.raises(FatalError, match="permission denied for table classifications"):
        async with running_service(limited) as running:
            await produce(limited, inputs)

            async def stopped() -> bool:
                return running.service.state.value == "failed"

            await wait_until(stopped, 60, "the service to stop on its own")
    health = running.service.readiness()
    assert health["ready"] is False and health["state"] == "failed"
    assert "InsufficientPrivilegeError: permission denied for table classifications" in health["error"]
    assert running.metrics.registry.get_sample_value("flexor_batch_retries_total",
                                                     {"error": "InsufficientPrivilegeError"}) is None
    assert await committed(limited) == {p: 0 for p in range(limited.topics.partitions)}
    assert await count_rows(settings) == 0


async def test_flexor_serve_exits_non_zero_with_one_line_when_a_topic_is_missing(
    settings: Settings, tmp_path: Path
) -> None:
    """Topics are not created (no --create-topics, and the broker would auto-create them on first
    use): the service refuses to start rather than wait on a topic that never comes."""
    log_path = tmp_path / "serve.log"
    proc = start_serve(settings, log_path, create_topics=False)
    try:
        code = await asyncio.to_thread(proc.wait, 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out = log_path.read_text()
    assert code == 1, out[-2000:]
    fatal = [line for line in out.splitlines() if "CRITICAL" in line]
    assert len(fatal) == 1, out[-2000:]
    expected = f"fatal: topic '{settings.topics.input}' does not exist: create it, or start with --create-topics"
    assert expected in fatal[0]
    assert "Traceback" not in out

