"""The labels table on a real Postgres: round trip, source precedence, validation."""

from __future__ import annotations

import asyncpg
import pytest

from agents.store.labels import Label, LabelsTable, source_rank, teacher_source


@pytest.fixture
def table(pool: asyncpg.Pool) -> LabelsTable:
    return LabelsTable(pool)


def label(answer: str, source: str, conv: str = "c1", given_by: str = "someone") -> Label:
    return Label("acme", conv, 1, "q", 1, answer, source, given_by)


async def test_labels_round_trip_and_count_by_source(table: LabelsTable) -> None:
    stored = [label("yes", "import", "c1", "labels.jsonl"), label("no", teacher_source("m"), "c2", "m")]
    assert await table.upsert(stored) == 2
    got = await table.fetch(["q"])
    assert [(g.conversation_id, g.answer, g.source, g.given_by) for g in got] == [
        ("c1", "yes", "import", "labels.jsonl"), ("c2", "no", "teacher:m", "m")]
    assert all(g.created_at is not None for g in got)
    assert await table.count_by_source() == {("q", "import"): 1, ("q", "teacher:m"): 1}
    assert await table.fetch(["other"]) == []
    assert await table.fetch(tenant_id="nobody") == []


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [
        ("teacher:m", "human", "human"),  # a reviewer's correction replaces a teacher's answer
        ("human", "teacher:m", "human"),  # a teacher never overrides a person
        ("human", "import", "human"),
        ("import", "human", "human"),
        ("import", "import", "import"),  # equal rank: the newer one wins
    ],
)
async def test_higher_or_equal_precedence_replaces(table: LabelsTable, first: str, second: str, kept: str) -> None:
    await table.upsert([label("yes", first, given_by="first")])
    await table.upsert([label("no", second, given_by="second")])
    (got,) = await table.fetch()
    assert got.source == kept
    assert (got.answer, got.given_by) == (("no", "second") if kept == second else ("yes", "first"))


async def test_last_label_per_key_in_one_call_wins(table: LabelsTable) -> None:
    assert await table.upsert([label("yes", "human", given_by="a"), label("no", "human", given_by="b")]) == 1
    (got,) = await table.fetch()
    assert (got.answer, got.given_by) == ("no", "b")


@pytest.mark.parametrize(("answer", "source"), [("maybe", "human"), ("yes", "teacher:"), ("yes", "robot")])
def test_invalid_labels_are_refused(answer: str, source: str) -> None:
    with pytest.raises(ValueError, match=r"answer|source"):
        label(answer, source)


def test_source_ranks() -> None:
    assert source_rank("human") > source_rank("import") > source_rank(teacher_source("m"))
