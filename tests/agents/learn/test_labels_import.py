"""`flexor labels import` on a real Postgres: both row formats, the defaults taken from the stored
conversations, and every kind of bad line reported by number with nothing imported."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from agents.learn.datasets import read_service_conversations
from agents.learn.labels_import import LabelFileError, import_labels
from agents.questions import load_questions
from agents.store.conversations import upsert_conversations
from agents.store.labels import LabelsTable

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
QUESTIONS = load_questions(EXAMPLES / "questions.yaml")


@pytest.fixture
async def pool(pool: asyncpg.Pool) -> asyncpg.Pool:
    """The migrated pool (tests/conftest.py) with the examples as the service stores them (turns and
    metadata; chunks play no part here)."""
    async with pool.acquire() as conn:
        await upsert_conversations(conn, read_service_conversations(EXAMPLES / "conversations.jsonl"), "e")
    return pool


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


async def test_examples_import_with_tenants_from_the_stored_conversations(pool: asyncpg.Pool) -> None:
    result = await import_labels(pool, EXAMPLES / "labels.jsonl", QUESTIONS)
    gold = [json.loads(line) for line in (EXAMPLES / "labels.jsonl").read_text().splitlines()]
    assert (result.rows, result.stored, result.questions) == (800, 800, 8)
    assert result.yes == sum(g["answer"] == "yes" for g in gold)
    tenants = {c.conversation_id: c.tenant_id for c in read_service_conversations(EXAMPLES / "conversations.jsonl")}
    stored = await LabelsTable(pool).fetch()
    assert {(s.tenant_id, s.conversation_id, s.revision, s.question_id, s.question_version, s.answer) for s in stored} \
        == {(tenants[g["conversation_id"]], g["conversation_id"], g["revision"], g["question_id"], 1, g["answer"])
           for g in gold}
    assert {(s.source, s.given_by) for s in stored} == {("import", "labels.jsonl")}
    assert len({s.tenant_id for s in stored}) > 1  # the examples span several tenants


async def test_answers_format_takes_the_defaults(pool: asyncpg.Pool, tmp_path: Path) -> None:
    f = write(tmp_path / "answers.jsonl", [
        {"question_id": "refund_request", "conversation_id": "c-002", "answer": "yes"},  # stored: its tenant
        {"question_id": "refund_request", "conversation_id": "new-1", "answer": "no", "tenant_id": "t9"},
        {"question_id": "fraud_report", "conversation_id": "c-003", "answer": "no", "revision": 7,
         "question_version": 3, "given_by": "qa-team"},
    ])
    await import_labels(pool, f, QUESTIONS, given_by="annotators")
    got = {(s.conversation_id, s.question_id): s for s in await LabelsTable(pool).fetch()}
    assert (got["c-002", "refund_request"].tenant_id, got["c-002", "refund_request"].revision) == ("acme", 1)
    assert got["new-1", "refund_request"].revision == 1  # not stored: the first revision
    c3 = got["c-003", "fraud_report"]
    assert (c3.revision, c3.question_version, c3.given_by) == (7, 3, "qa-team")
    assert got["c-002", "refund_request"].given_by == "annotators"


GOOD = {"conversation_id": "c-001", "revision": 1, "question_id": "refund_request", "answer": "no"}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a JSON list, not an object"),
        ({"conversation_id": "c-001", "question_id": "refund_request"}, "missing field answer"),
        ({**GOOD, "answer": "maybe"}, 'answer must be "yes" or "no"'),
        ({**GOOD, "answer": True}, 'answer must be "yes" or "no"'),
        ({**GOOD, "revision": "1"}, "revision must be an integer >= 0"),
        ({**GOOD, "question_version": 0}, "question_version must be an integer >= 1"),
        ({**GOOD, "conversation_id": ""}, "conversation_id must be a non-empty string"),
        ({**GOOD, "tenant_id": 5}, "tenant_id must be a non-empty string"),
        ({**GOOD, "question_id": "nope"}, "unknown question_id 'nope'"),
        ({**GOOD, "conversation_id": "never-stored"}, "no tenant_id, and conversation 'never-stored' is not stored"),
        ({**GOOD, "answer": "yes"}, "answers 'yes' where line 1 answered 'no'"),
    ],
)
async def test_a_bad_line_is_reported_by_number_and_nothing_is_imported(
    pool: asyncpg.Pool, tmp_path: Path, bad: object, reason: str
) -> None:
    f = write(tmp_path / "labels.jsonl", [GOOD, {**GOOD, "question_id": "fraud_report"}, "", bad])
    with pytest.raises(LabelFileError) as err:
        await import_labels(pool, f, QUESTIONS)
    assert err.value.errors[0][0] == 4 and reason in err.value.errors[0][1]
    assert f"labels.jsonl:4: {reason}" in str(err.value)
    assert await LabelsTable(pool).fetch() == []


async def test_every_bad_line_is_reported(pool: asyncpg.Pool, tmp_path: Path) -> None:
    f = write(tmp_path / "labels.jsonl", ["nope", GOOD, {**GOOD, "answer": "?"}, {**GOOD, "question_id": "x"}])
    with pytest.raises(LabelFileError) as err:
        await import_labels(pool, f, QUESTIONS)
    # parse errors first (the file is read whole), then the rows that cannot be resolved
    assert [n for n, _ in err.value.errors] == [1, 3]
    f = write(tmp_path / "labels.jsonl", [GOOD, {**GOOD, "question_id": "x"}, {**GOOD, "question_id": "y"}])
    with pytest.raises(LabelFileError) as err:
        await import_labels(pool, f, QUESTIONS)
    assert [n for n, _ in err.value.errors] == [2, 3]


def test_the_command_prints_each_bad_line_and_exits_2(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stream.cli import main

    monkeypatch.setenv("FLEXOR_DATABASE_URL", database)
    f = write(tmp_path / "labels.jsonl", [GOOD, "oops", {**GOOD, "answer": "perhaps"}])
    assert main(["labels", "import", str(f), "--questions", str(EXAMPLES / "questions.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{f}:2: not valid JSON")
    assert err[1] == f'{f}:3: answer must be "yes" or "no", not "perhaps"'
    assert err[2] == f"flexor labels import: 2 bad lines in {f}: nothing imported"
    assert main(["labels", "import", str(tmp_path / "absent.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
