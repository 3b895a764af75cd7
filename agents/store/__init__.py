"""Postgres access, one module per table family: `chunks`, `classifications`, `llm_results`,
plus the migrations that create them. Every pool's connections know the pgvector type."""

from __future__ import annotations

import logging

import asyncpg
from pgvector.asyncpg import register_vector


class _QuietFloorRetries(logging.Filter):
    """asyncpg logs a full traceback each time its pool fails to reconnect the idle connection
    floor, a few times a second during a Postgres outage. The service reports the outage itself:
    one line per state change and a counter (`stream.health`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to restore the pool connection floor")


logging.getLogger("asyncpg.pool").addFilter(_QuietFloorRetries())


async def init_connection(conn: asyncpg.Connection) -> None:
    await register_vector(conn)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=init_connection,
                                     command_timeout=30)


async def open_database(dsn: str, *, where: str, max_size: int = 4) -> asyncpg.Pool:
    """Apply pending migrations, then open a pool. `where` (the URL without its password) goes into
    the one-line `DatabaseSetupError` that any failure of either becomes."""
    from agents.store.errors import explained
    from agents.store.migrate import migrate

    async with explained(where):
        # Migrations first, on their own connection: the pool's connections need the vector type.
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return await create_pool(dsn, max_size=max_size)
