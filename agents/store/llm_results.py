"""The `llm_results` table: the LLM stage's result cache shared by every replica (P(yes) by key;
see `agents.result_cache` for the key and the in-process LRU in front of it)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

_GET_SQL = "SELECT key, p_yes FROM llm_results WHERE key = ANY($1::text[])"
_PUT_SQL = """
INSERT INTO llm_results (key, p_yes, question_id, question_version, model_id, template_id)
SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::int[], $5::text[], $6::text[])
ON CONFLICT (key) DO NOTHING
"""

# (key, p_yes, question_id, question_version, model_id, template_id)
Row = tuple[str, float, str, int, str, str]


class LLMResultsTable:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get(self, keys: Sequence[str]) -> dict[str, float]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_GET_SQL, list(keys))
        return {r["key"]: float(r["p_yes"]) for r in rows}

    async def put(self, rows: Sequence[Row]) -> None:
        """Insert new results; an existing key keeps its first value."""
        columns = list(zip(*rows, strict=True)) if rows else [[]] * 6
        async with self._pool.acquire() as conn:
            await conn.execute(_PUT_SQL, *[list(c) for c in columns])
