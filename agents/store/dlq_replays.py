"""The `dlq_replays` table: which dead letters `flexor dlq replay` has put back, claimed before
they are produced (at most once per DLQ offset)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

_CLAIM_SQL = """
INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, reason, replayed_to)
SELECT $1, p, o, r, $2 FROM unnest($3::int[], $4::bigint[], $5::text[]) AS n(p, o, r)
ON CONFLICT DO NOTHING
RETURNING dlq_partition, dlq_offset
"""
_REPLAYED_SQL = """
SELECT dlq_partition, dlq_offset FROM dlq_replays
WHERE dlq_topic = $1 AND (dlq_partition, dlq_offset) IN (SELECT * FROM unnest($2::int[], $3::bigint[]))
"""

# (partition, offset, reason)
Claim = tuple[int, int, str]


class DlqReplaysTable:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def claim(self, dlq_topic: str, replayed_to: str, records: Sequence[Claim]) -> set[tuple[int, int]]:
        """Record these DLQ offsets as replayed; returns those not replayed before (the ones to send)."""
        if not records:
            return set()
        parts, offsets, reasons = (list(c) for c in zip(*records, strict=True))
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_CLAIM_SQL, dlq_topic, replayed_to, parts, offsets, reasons)
        return {(r["dlq_partition"], r["dlq_offset"]) for r in rows}

    async def replayed(self, dlq_topic: str, keys: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        if not keys:
            return set()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_REPLAYED_SQL, dlq_topic, [p for p, _ in keys], [o for _, o in keys])
        return {(r["dlq_partition"], r["dlq_offset"]) for r in rows}
