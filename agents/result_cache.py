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

from agents.store.llm_results import LLMResultsTable

log = logging.getLogger(__name__)

KEY_VERSION = "2"  # bump when the key's recipe changes

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
        self.table = LLMResultsTable(pool) if pool is not None else None
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
        if rest and self.table is not None:
            rest = list(dict.fromkeys(rest))
            try:
                async with asyncio.timeout(self.db_timeout_s):
                    stored = await self.table.get(rest)
            except Exception as e:  # any database trouble is a miss, never a failed batch
                self.db_errors += 1
                log.warning("result cache lookup in Postgres failed, treating %d keys as misses: %s", len(rest), e)
                stored = {}
            for key, p in stored.items():
                self._remember(key, p)
                found[key] = p
        return found

    async def put_many(self, results: Mapping[CacheKey, float]) -> None:
        """Remember results in memory and, best effort, in Postgres."""
        if not results:
            return
        for k, p in results.items():
            self._remember(k.key, float(p))
        if self.table is None:
            return
        keys = list(results)
        try:
            async with asyncio.timeout(self.db_timeout_s):
                await self.table.put(
                    [(k.key, float(results[k]), k.question_id, k.question_version, k.model_id, k.template_id)
                     for k in keys]
                )
        except Exception as e:  # any database trouble is a lost write, never a failed batch
            self.db_errors += 1
            log.warning("result cache write to Postgres failed, %d results kept in memory only: %s", len(keys), e)

    def clear_memory(self) -> None:
        self._lru.clear()
