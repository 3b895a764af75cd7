"""Corpus search: the stored chunks closest to a query vector across every conversation, through
the HNSW index on chunk embeddings (migrations 005 and 012), for the person writing a question.
It searches the chunks of stored revisions that are not open: an open revision's chunks are
replaced by the next revision's and stay out of the index (migration 012).

HNSW is approximate: `ef_search` is the size of its candidate list, the knob between recall and
latency (`flexor bench --backfill` measures both against `exact=True`, a sequential scan). With a
tenant filter, pgvector 0.8's iterative scan keeps searching the graph until `k` chunks pass the
filter, so a small tenant still gets `k` hits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np

DEFAULT_EF_SEARCH = 600
# The index as migration 012 leaves it, for tools that drop and rebuild it (`flexor bench --backfill`).
# A build needs maintenance_work_mem of 1 GB or more to keep the graph in memory (migration 005).
CREATE_INDEX_SQL = """
SET LOCAL maintenance_work_mem = '1GB';
CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops) WHERE NOT open;
"""

SEARCH_SQL = """
SELECT tenant_id, conversation_id, revision, chunk_id, turn_ids, char_start, char_end, text,
       1 - (embedding <=> $1) AS score
FROM chunks
WHERE NOT open AND embedder = $2 AND ($3::text IS NULL OR tenant_id = $3)
ORDER BY embedding <=> $1
LIMIT $4
"""


@dataclass(frozen=True, slots=True)
class Hit:
    tenant_id: str
    conversation_id: str
    revision: int
    chunk_id: str
    turn_ids: tuple[str, ...]
    char_start: int  # offsets into the conversation's transcript, as in published evidence
    char_end: int
    text: str
    score: float  # cosine similarity

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id, "conversation_id": self.conversation_id, "revision": self.revision,
            "chunk_id": self.chunk_id, "turn_ids": list(self.turn_ids), "char_start": self.char_start,
            "char_end": self.char_end, "text": self.text, "score": round(self.score, 4),
        }


class CorpusSearch:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def search(
        self,
        query: np.ndarray,
        embedder_id: str,
        *,
        k: int = 20,
        tenant_id: str | None = None,
        ef_search: int = DEFAULT_EF_SEARCH,
        exact: bool = False,
    ) -> list[Hit]:
        """The `k` chunks embedded by `embedder_id` closest to `query`, best first. `exact` scans
        every chunk instead of the index (the reference for recall)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        async with self._pool.acquire() as conn, conn.transaction():
            if exact:
                await conn.execute("SET LOCAL enable_indexscan = off")
            else:
                # The candidate list must hold at least k (pgvector caps ef_search at 1000).
                await conn.execute("SELECT set_config('hnsw.ef_search', $1, true)", str(min(1000, max(ef_search, k))))
                await conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            rows = await conn.fetch(SEARCH_SQL, np.asarray(query, np.float32), embedder_id, tenant_id, k)
        return [
            Hit(r["tenant_id"], r["conversation_id"], r["revision"], r["chunk_id"], tuple(r["turn_ids"]),
                r["char_start"], r["char_end"], r["text"], float(r["score"]))
            for r in rows
        ]
