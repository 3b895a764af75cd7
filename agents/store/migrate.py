"""Apply numbered SQL migrations in order, once each, recorded in `schema_migrations`.

Each migration runs in its own transaction together with its `schema_migrations` row, and the
table itself is created inside the first one: a migration that fails leaves nothing behind, not
even an empty `schema_migrations`.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(str(importlib.resources.files("migrations")))
# Serialises concurrent replicas starting at once; any constant 64-bit key works.
_LOCK_KEY = 0x466C65786F72
_CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)


class MigrationError(RuntimeError):
    """A migration file failed; `error` is the database's exception."""

    def __init__(self, name: str, error: asyncpg.PostgresError, user: str = "?", database: str = "?") -> None:
        super().__init__(f"migration {name} failed: {error}")
        self.name = name
        self.error = error
        self.user = user
        self.database = database


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    files = sorted(directory.glob("[0-9][0-9][0-9]_*.sql"))
    if not files:
        raise FileNotFoundError(f"no migrations found in {directory}")
    return files


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; returns the names applied now. Raises `MigrationError`."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        done: set[str] = set()
        if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for path in migration_files(directory):
            if path.name in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(_CREATE_TABLE)
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
            except asyncpg.PostgresError as e:
                who = await conn.fetchrow("SELECT current_user AS u, current_database() AS d")
                raise MigrationError(path.name, e, who["u"], who["d"]) from e
            log.info("applied migration %s", path.name)
            applied_now.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
