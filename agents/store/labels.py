"""The `labels` table: answers given by people (`human`), imported files (`import`) and teacher
models (`teacher:<model id>`), per (tenant, conversation, revision, question id and version).

A label replaces an existing one only when its source ranks at least as high: a reviewer's
correction overrides an imported or a teacher's answer, and a teacher never overrides a person.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

HUMAN = "human"
IMPORT = "import"
TEACHER_PREFIX = "teacher:"


def teacher_source(model_id: str) -> str:
    return TEACHER_PREFIX + model_id


def source_rank(source: str) -> int:
    if source == HUMAN:
        return 3
    if source == IMPORT:
        return 2
    if source.startswith(TEACHER_PREFIX) and len(source) > len(TEACHER_PREFIX):
        return 1
    raise ValueError(f"unknown label source {source!r}: use human, import or teacher:<model id>")


@dataclass(frozen=True, slots=True)
class Label:
    tenant_id: str
    conversation_id: str
    revision: int
    question_id: str
    question_version: int
    answer: str  # "yes" | "no"
    source: str
    given_by: str
    created_at: datetime | None = None  # set by the database

    def __post_init__(self) -> None:
        if self.answer not in ("yes", "no"):
            raise ValueError(f"answer must be 'yes' or 'no', not {self.answer!r}")
        source_rank(self.source)


_COLUMNS = ("tenant_id", "conversation_id", "revision", "question_id", "question_version", "answer", "source",
            "given_by")
_RANK_SQL = "CASE {0}.source WHEN 'human' THEN 3 WHEN 'import' THEN 2 ELSE 1 END"
_UPSERT_SQL = f"""
INSERT INTO labels AS l ({", ".join(_COLUMNS)})
SELECT {", ".join(_COLUMNS)} FROM labels_in
ON CONFLICT (tenant_id, conversation_id, revision, question_id, question_version) DO UPDATE
SET answer = EXCLUDED.answer, source = EXCLUDED.source, given_by = EXCLUDED.given_by, created_at = now()
WHERE {_RANK_SQL.format("EXCLUDED")} >= {_RANK_SQL.format("l")}
"""


class LabelsTable:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def upsert(self, labels: Sequence[Label]) -> int:
        """Store labels in one transaction (COPY into a temporary table, then one upsert); returns
        how many rows were inserted or replaced. Within `labels`, the last one per key wins."""
        if not labels:
            return 0
        last: dict[tuple[str, str, int, str, int], Label] = {}
        for lab in labels:
            key = (lab.tenant_id, lab.conversation_id, lab.revision, lab.question_id, lab.question_version)
            last.pop(key, None)
            last[key] = lab
        rows = [tuple(getattr(lab, c) for c in _COLUMNS) for lab in last.values()]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("CREATE TEMPORARY TABLE labels_in (LIKE labels INCLUDING DEFAULTS) ON COMMIT DROP")
            await conn.copy_records_to_table("labels_in", records=rows, columns=_COLUMNS)
            status = await conn.execute(_UPSERT_SQL)
        return int(status.split()[-1])

    async def fetch(
        self, question_ids: Sequence[str] | None = None, tenant_id: str | None = None
    ) -> list[Label]:
        rows = await self._pool.fetch(
            f"""
            SELECT {", ".join(_COLUMNS)}, created_at FROM labels
            WHERE ($1::text[] IS NULL OR question_id = ANY($1)) AND ($2::text IS NULL OR tenant_id = $2)
            ORDER BY tenant_id, conversation_id, revision, question_id, question_version
            """,
            list(question_ids) if question_ids is not None else None,
            tenant_id,
        )
        return [Label(**dict(r)) for r in rows]

    async def count_by_source(self, question_ids: Sequence[str] | None = None) -> dict[tuple[str, str], int]:
        """(question id, source) -> number of labels."""
        rows = await self._pool.fetch(
            """
            SELECT question_id, source, count(*) AS n FROM labels
            WHERE $1::text[] IS NULL OR question_id = ANY($1)
            GROUP BY question_id, source
            """,
            list(question_ids) if question_ids is not None else None,
        )
        return {(r["question_id"], r["source"]): r["n"] for r in rows}

    async def count(
        self, question_id: str, question_version: int, *, source: str | None = None, tenant_id: str | None = None,
        answer: str | None = None,
    ) -> int:
        """Labels of one question version; of one source and one answer when those are given."""
        return int(await self._pool.fetchval(
            """
            SELECT count(*) FROM labels
            WHERE question_id = $1 AND question_version = $2 AND ($3::text IS NULL OR source = $3)
              AND ($4::text IS NULL OR tenant_id = $4) AND ($5::text IS NULL OR answer = $5)
            """,
            question_id, question_version, source, tenant_id, answer,
        ))

    async def labelled(
        self, question_id: str, question_version: int, *, tenant_id: str | None = None
    ) -> set[tuple[str, str, int]]:
        """(tenant, conversation, revision) of every label of one question version."""
        rows = await self._pool.fetch(
            """
            SELECT tenant_id, conversation_id, revision FROM labels
            WHERE question_id = $1 AND question_version = $2 AND ($3::text IS NULL OR tenant_id = $3)
            """,
            question_id, question_version, tenant_id,
        )
        return {(r["tenant_id"], r["conversation_id"], r["revision"]) for r in rows}
