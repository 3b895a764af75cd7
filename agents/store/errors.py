"""Database set-up failures (connect, migrate) as one line that says what to fix.

`flexor migrate` and `flexor serve` print it instead of a traceback: an operator who mistyped a
password or pointed at a server without pgvector needs the fix, not asyncpg's call stack.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from agents.store.migrate import MigrationError


class DatabaseSetupError(RuntimeError):
    """The message is one line: what failed and what to do about it."""


def describe(e: BaseException, where: str) -> str:
    """One line for a failure to connect to or migrate the database at `where` (a redacted URL)."""
    if isinstance(e, MigrationError):
        return _describe_migration(e, where)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, asyncpg.InvalidPasswordError):
        return f"{first} ({where}): fix the password in DATABASE_URL"
    if isinstance(e, asyncpg.InvalidAuthorizationSpecificationError):
        return f"{first} ({where}): fix the user in DATABASE_URL, or allow it in the server's pg_hba.conf"
    if isinstance(e, asyncpg.InvalidCatalogNameError):
        return f"{first} ({where}): create the database or fix its name in DATABASE_URL"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the database host ({where}): {first}: fix the host in DATABASE_URL"
    if isinstance(e, OSError | TimeoutError | asyncpg.CannotConnectNowError):
        return (f"cannot reach PostgreSQL ({where}): {first}: check the host and port in DATABASE_URL "
                "and that the server is running")
    return f"database error ({where}): {type(e).__name__}: {first}"


def _describe_migration(e: MigrationError, where: str) -> str:
    error, first = e.error, str(e.error).splitlines()[0]
    creates_vector = "vector" in first and "extension" in first
    if creates_vector and isinstance(error, asyncpg.InsufficientPrivilegeError):
        return (f"role {e.user!r} may not create the extension \"vector\" in database {e.database!r} ({where}): "
                "pgvector is not a trusted extension, so only a superuser can create it: have one run "
                f"`CREATE EXTENSION vector;` in {e.database!r}, then rerun `flexor migrate`")
    if creates_vector and isinstance(error, asyncpg.FeatureNotSupportedError | asyncpg.UndefinedFileError):
        return (f"the PostgreSQL server has no pgvector extension ({where}): install pgvector on it "
                "(Debian: postgresql-<major>-pgvector; image: pgvector/pgvector), then rerun `flexor migrate`")
    return f"{e.name} failed ({where}): {type(error).__name__}: {first}; nothing of it was applied"


@asynccontextmanager
async def explained(where: str) -> AsyncIterator[None]:
    """Turn connect and migrate failures inside the block into a `DatabaseSetupError`."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, MigrationError) as e:
        raise DatabaseSetupError(describe(e, where)) from None
