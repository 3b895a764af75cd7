"""Postgres access, one module per table family: `chunks`, `classifications`, `llm_results`,
plus the migrations that create them. Every pool's connections know the pgvector type."""

from __future__ import annotations

import asyncpg
from pgvector.asyncpg import register_vector


async def init_connection(conn: asyncpg.Connection) -> None:
    await register_vector(conn)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=init_connection,
                                     command_timeout=30)
