"""The LLM stage's result cache: an in-process LRU in front of an optional Postgres table.

A result is P(yes) for one prompt's content. The key is a SHA-256 over everything that decides
that number: question id, version and text, the evidence texts in order, the engine's model id
and the prompt template (its id and a hash of its text, so an edited template file never reuses
old answers). The table (`migrations/002_llm_results.sql`) is shared by every replica, so a
repeated question/evidence pair is scored once per deployment, not once per process.

Postgres is an optimisation here, never a dependency: a failed or slow lookup is logged and
counted as a miss, a failed write is logged and dropped; the batch goes on either way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg

log = logging.getLogger(__name__)

KEY_VERSION = "2"  # bump when the key's recipe changes

_GET_SQL = "SELECT key, p_yes FROM llm_results WHERE key = ANY($1::text[])"
_PUT_SQL = """
INSERT INTO llm_results (key, p_yes, question_id, question_version, model_id, template_id)
SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::int[], $5::text[], $6::text[])
ON CONFLICT (key) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class CacheKey:
    key: str
    question_id: str
    question_version: int
    model_id: str
    template_id: str


def cache_key(
    *,
    question_id: str,
    question_version: int,
    question_text: str,
    evidence: Sequence[str],
    model_id: str,
    template_id: str,
    template_text: str = "",
) -> CacheKey:
    """The key of one LLM result. Fields are length-prefixed, so no two inputs share a key."""
    h = hashlib.sha256()
    template_hash = hashlib.sha256(template_text.encode()).hexdigest()[:16]
    parts = [KEY_VERSION, question_id, str(question_version), question_text, model_id, template_id, template_hash]
    parts += [str(len(evidence)), *evidence]
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return CacheKey(h.hexdigest(), question_id, question_version, model_id, template_id)


class ResultCache:
    """LRU of ``capacity`` entries, backed by the ``llm_results`` table when a pool is given."""

    def __init__(
        self,
        capacity: int = 100_000,
        pool: asyncpg.Pool | None = None,
        *,
        db_timeout_s: float = 2.0,
    ) -> None:
        self.capacity = capacity
        self.pool = pool
        self.db_timeout_s = db_timeout_s
        self._lru: OrderedDict[str, float] = OrderedDict()
        self.db_errors = 0

    def __len__(self) -> int:
        return len(self._lru)

    def _remember(self, key: str, p: float) -> None:
        self._lru[key] = p
        self._lru.move_to_end(key)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    async def get_many(self, keys: Sequence[CacheKey]) -> dict[str, float]:
        """Known results by key string (memory first, then one Postgres round trip for the rest)."""
        found: dict[str, float] = {}
        rest: list[str] = []
        for k in keys:
            if k.key in found:
                continue
            p = self._lru.get(k.key)
            if p is None:
                rest.append(k.key)
            else:
                self._lru.move_to_end(k.key)
                found[k.key] = p
        if rest and self.pool is not None:
            rest = list(dict.fromkeys(rest))
            try:
                async with asyncio.timeout(self.db_timeout_s):
                    async with self.pool.acquire() as conn:
                        rows = await conn.fetch(_GET_SQL, rest)
            except Exception as e:  # any database trouble is a miss, never a failed batch
                self.db_errors += 1
                log.warning("result cache lookup in Postgres failed, treating %d keys as misses: %s", len(rest), e)
                rows = []
            for row in rows:
                p = float(row["p_yes"])
                self._remember(row["key"], p)
                found[row["key"]] = p
        return found

    async def put_many(self, results: Mapping[CacheKey, float]) -> None:
        """Remember results in memory and, best effort, in Postgres."""
        if not results:
            return
        for k, p in results.items():
            self._remember(k.key, float(p))
        if self.pool is None:
            return
        keys = list(results)
        try:
            async with asyncio.timeout(self.db_timeout_s):
                async with self.pool.acquire() as conn:
                    await conn.execute(
                        _PUT_SQL,
                        [k.key for k in keys],
                        [float(results[k]) for k in keys],
                        [k.question_id for k in keys],
                        [k.question_version for k in keys],
                        [k.model_id for k in keys],
                        [k.template_id for k in keys],
                    )
        except Exception as e:  # any database trouble is a lost write, never a failed batch
            self.db_errors += 1
            log.warning("result cache write to Postgres failed, %d results kept in memory only: %s", len(keys), e)

    def clear_memory(self) -> None:
        self._lru.clear()
