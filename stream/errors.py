"""Error classes: what a failure means for the service, decided by the clients' own flags.

- `RETRIABLE`: the broker or the database is unreachable or busy for now (connection refused or
  reset, a timeout, a leader election, a database restarting, a lock held elsewhere). The batch
  backs off and retries while consumption stays paused; /readyz says "retrying".
- `FATAL`: retrying cannot help (no permission, a missing table or topic, a fenced producer, bad
  credentials). The service stops with one log line and a non-zero exit; /readyz says "failed".
- `PROCESSING`: anything else raised while classifying (a tokenizer edge case, a head error, a
  bug, a value Postgres rejects). It may be caused by one record: `stream.poison` isolates it.

Kafka errors carry aiokafka's `retriable` flag; Postgres errors a SQLSTATE whose class (its first
two characters) says what kind of failure it is. Where either disagrees with the service's needs,
the exception is written down below with the reason.
"""

from __future__ import annotations

from enum import StrEnum

import asyncpg
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)


class ErrorKind(StrEnum):
    RETRIABLE = "retriable"
    FATAL = "fatal"
    PROCESSING = "processing"


class FatalError(RuntimeError):
    """The service must stop: `str()` is the one line an operator reads."""


# aiokafka marks KafkaTimeoutError not retriable, but it is what a send or a metadata wait raises
# when no broker answered within request_timeout_ms: an outage, which ends.
_KAFKA_RETRIABLE = (KafkaTimeoutError,)
# A commit refused because the group rebalanced is routine (not retriable by flag, because the
# same commit can never succeed): the next batch commits under the new generation.
REBALANCE_ERRORS = (CommitFailedError, IllegalGenerationError, UnknownMemberIdError, RebalanceInProgressError)

# SQLSTATE classes that pass: 08 connection exception, 40 transaction rollback (serialization
# failure, deadlock), 53 insufficient resources (too many connections, disk full), 57 operator
# intervention (admin shutdown, crash recovery, "cannot connect now"), 58 system error (I/O).
_PG_RETRIABLE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_PG_RETRIABLE_STATES = frozenset({"55P03"})  # lock_not_available: another session holds the lock
# 22 data exception and 23 integrity violation depend on the values written: a record's doing.
_PG_RECORD_CLASSES = frozenset({"22", "23"})


def classify(e: BaseException) -> ErrorKind:
    if type(e) is KafkaError:
        # aiokafka raises the base class to wrap an unexpected error (judge the wrapped one) or,
        # with no cause, when no broker answered a metadata request: an outage.
        cause = e.__cause__
        return classify(cause) if isinstance(cause, Exception) else ErrorKind.RETRIABLE
    if isinstance(e, KafkaError):
        if isinstance(e, _KAFKA_RETRIABLE) or e.retriable:
            return ErrorKind.RETRIABLE
        return ErrorKind.FATAL
    if isinstance(e, asyncpg.PostgresError):
        state = e.sqlstate or ""
        if state in _PG_RETRIABLE_STATES or state[:2] in _PG_RETRIABLE_CLASSES:
            return ErrorKind.RETRIABLE
        if state[:2] in _PG_RECORD_CLASSES:
            return ErrorKind.PROCESSING
        # 42 syntax or access rule (undefined table, permission denied), 28 authorization, 3D no
        # such database, 0A feature not supported, ...: the deployment is wrong, not the moment.
        return ErrorKind.FATAL
    if isinstance(e, asyncpg.exceptions.DataError):  # a value asyncpg cannot encode for its column
        return ErrorKind.PROCESSING
    if isinstance(e, asyncpg.exceptions.ClientConfigurationError | asyncpg.exceptions.UnsupportedServerFeatureError):
        return ErrorKind.FATAL
    if isinstance(e, asyncpg.InterfaceError):  # the connection closed mid-query, the pool is resetting
        return ErrorKind.RETRIABLE
    # A connection in a broken state (seen after the server ended the session) or a prepared
    # statement outdated by a schema change: the pool replaces the connection, so a retry works.
    if isinstance(e, asyncpg.exceptions.InternalClientError):
        return ErrorKind.RETRIABLE
    if isinstance(e, OSError):  # refused, reset, unreachable, timed out (TimeoutError is an OSError)
        return ErrorKind.RETRIABLE
    return ErrorKind.PROCESSING


def describe(e: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
