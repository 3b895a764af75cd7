"""Label files: read and check them, and `flexor labels import FILE` into the labels table.

Two row formats, one JSON object per line (`.gz` read transparently):
- labels JSONL, as `examples/labels.jsonl`: ``conversation_id``, ``question_id``, ``answer``, and
  optionally ``tenant_id``, ``revision``, ``question_version`` and ``given_by``;
- the shared answers format (``../shared/data/answers.jsonl.gz``): ``question_id``,
  ``conversation_id``, ``answer``. It is the same format with every optional field left out.

A field a row leaves out takes a default (`resolve`):
- ``tenant_id``: ``--tenant``, else the tenant under which that conversation id is stored (it
  must be stored under exactly one);
- ``revision``: the stored revision of the conversation, else 1 (the revision `flexor produce`
  gives a conversation of the labelled-data format);
- ``question_version``: the version of the question in the questions file;
- ``given_by``: ``--given-by``, else the file's name.

Every line is checked before anything is stored: a file with a bad line imports nothing, and
every bad line is reported with its number and reason.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.questions import QuestionSet
from agents.store.labels import IMPORT, Label

MAX_REPORTED = 20
_OPTIONAL_INT = {"revision": 0, "question_version": 1}  # field -> smallest value


@dataclass(frozen=True, slots=True)
class LabelRow:
    """One line of a label file, as written: fields the line leaves out are None."""

    line: int
    conversation_id: str
    question_id: str
    answer: str
    tenant_id: str | None = None
    revision: int | None = None
    question_version: int | None = None
    given_by: str | None = None


class LabelFileError(ValueError):
    """A label file with bad lines; `errors` holds (line number, reason) for every one."""

    def __init__(self, path: str | Path, errors: Sequence[tuple[int, str]]) -> None:
        self.path = Path(path)
        self.errors = list(errors)
        line, reason = self.errors[0]
        more = f" (and {len(self.errors) - 1} more bad lines)" if len(self.errors) > 1 else ""
        super().__init__(f"{self.path}:{line}: {reason}{more}")

    def lines(self, limit: int = MAX_REPORTED) -> list[str]:
        """One `FILE:LINE: reason` line per bad line, at most `limit`, then how many were left out."""
        out = [f"{self.path}:{n}: {reason}" for n, reason in self.errors[:limit]]
        if len(self.errors) > limit:
            out.append(f"... and {len(self.errors) - limit} more bad lines")
        return out


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            yield from enumerate(f, 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file {path} does not exist") from None
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise ValueError(f"label file {path} cannot be read: {e}") from None


def parse_row(n: int, raw: bytes) -> LabelRow:
    """One line -> LabelRow; ValueError with the reason when it is not a valid label row."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    missing = [k for k in ("conversation_id", "question_id", "answer") if k not in data]
    if missing:
        raise ValueError(f"missing field {', '.join(missing)}")
    for key in ("conversation_id", "question_id", "tenant_id", "given_by"):
        value = data.get(key)
        if key in data and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{key} must be a non-empty string, not {json.dumps(value)}")
    if data["answer"] not in ("yes", "no"):
        raise ValueError(f"answer must be \"yes\" or \"no\", not {json.dumps(data['answer'])}")
    for key, low in _OPTIONAL_INT.items():
        value = data.get(key)
        if key in data and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{key} must be an integer >= {low}, not {json.dumps(value)}")
    return LabelRow(
        line=n, conversation_id=data["conversation_id"], question_id=data["question_id"], answer=data["answer"],
        tenant_id=data.get("tenant_id"), revision=data.get("revision"),
        question_version=data.get("question_version"), given_by=data.get("given_by"),
    )


def read_label_rows(path: str | Path) -> list[LabelRow]:
    """Every label row of the file; LabelFileError naming every bad line. Blank lines are skipped."""
    path = Path(path)
    rows: list[LabelRow] = []
    errors: list[tuple[int, str]] = []
    for n, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            rows.append(parse_row(n, raw))
        except ValueError as e:
            errors.append((n, str(e)))
    if errors:
        raise LabelFileError(path, errors)
    if not rows:
        raise ValueError(f"label file {path} holds no labels")
    return rows


StoredRevisions = dict[str, list[tuple[str, int]]]  # conversation id -> [(tenant id, stored revision)]


def resolve(
    path: str | Path,
    rows: Sequence[LabelRow],
    questions: QuestionSet,
    stored: StoredRevisions,
    *,
    tenant: str | None = None,
    given_by: str | None = None,
    source: str = IMPORT,
) -> list[Label]:
    """Rows -> labels with every default filled in (see the module docstring); LabelFileError
    naming every row that cannot be: an unknown question, a tenant that cannot be told, two
    lines giving one label different answers."""
    versions = {q.id: q.version for q in questions.questions}
    who = given_by or Path(path).name
    labels: list[Label] = []
    errors: list[tuple[int, str]] = []
    seen: dict[tuple[str, str, int, str, int], tuple[int, str]] = {}
    for r in rows:
        if r.question_id not in versions:
            errors.append((r.line, f"unknown question_id {r.question_id!r} (not in the questions file)"))
            continue
        places = [(t, rev) for t, rev in stored.get(r.conversation_id, []) if tenant is None or t == tenant]
        t_id = r.tenant_id or tenant
        if t_id is None:
            if len(places) != 1:
                why = "is not stored" if not places else f"is stored for {len(places)} tenants"
                errors.append((r.line, f"no tenant_id, and conversation {r.conversation_id!r} {why}: "
                                       "add tenant_id or pass --tenant"))
                continue
            t_id = places[0][0]
        revision = r.revision
        if revision is None:
            revision = next((rev for t, rev in places if t == t_id), 1)
        version = r.question_version or versions[r.question_id]
        key = (t_id, r.conversation_id, revision, r.question_id, version)
        prior = seen.get(key)
        if prior is not None and prior[1] != r.answer:
            errors.append((r.line, f"answers {r.answer!r} where line {prior[0]} answered {prior[1]!r} for the same "
                                   "conversation, revision and question"))
            continue
        seen[key] = (r.line, r.answer)
        labels.append(Label(t_id, r.conversation_id, revision, r.question_id, version, r.answer, source,
                            r.given_by or who))
    if errors:
        raise LabelFileError(path, errors)
    return labels


@dataclass(frozen=True, slots=True)
class ImportResult:
    rows: int
    stored: int  # inserted or replaced; the others were kept: a label of higher precedence exists
    yes: int
    questions: int


async def import_labels(
    pool: Any,
    path: str | Path,
    questions: QuestionSet,
    *,
    tenant: str | None = None,
    given_by: str | None = None,
) -> ImportResult:
    """Check the whole file, then store its labels (source `import`) in one transaction.
    Raises LabelFileError (nothing stored) when any line is bad."""
    from agents.store.conversations import ConversationsTable
    from agents.store.labels import LabelsTable

    rows = read_label_rows(path)
    stored = await ConversationsTable(pool).revisions(sorted({r.conversation_id for r in rows}), tenant_id=tenant)
    labels = resolve(path, rows, questions, stored, tenant=tenant, given_by=given_by)
    n = await LabelsTable(pool).upsert(labels)
    return ImportResult(
        rows=len(labels), stored=n, yes=sum(lab.answer == "yes" for lab in labels),
        questions=len({lab.question_id for lab in labels}),
    )


def read_question_set(path: str | Path) -> QuestionSet:
    """questions.yaml, or the research questions.json (each question version 1)."""
    from agents.learn.datasets import read_questions_file

    return read_questions_file(path)[0]


# -- `flexor labels` --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="labels_command", required=True, metavar="ACTION",
                                parser_class=type(parser))
    p = sub.add_parser("import", help="check a label file and store its labels (source `import`)",
                       description="Check every line of a label file, then store its labels (source `import`). "
                                   "A file with a bad line imports nothing. Defaults for fields a row leaves "
                                   "out: docs/learning.md.")
    p.add_argument("file", type=Path, help="labels JSONL (examples/labels.jsonl) or answers.jsonl(.gz)")
    p.add_argument("--questions", type=Path, default=None,
                   help="questions.yaml or questions.json (default: the configured questions_file)")
    p.add_argument("--tenant", default=None, help="tenant of rows without tenant_id")
    p.add_argument("--given-by", default=None, help="who gave rows without given_by (default: the file name)")
    p.add_argument("--config", type=Path, help="YAML config file (environment variables override it)")


def run(args: argparse.Namespace) -> int:
    from agents.learn.stored import open_settings_pool

    settings = args.settings()
    questions = read_question_set(args.questions or settings.questions_file)

    async def go() -> ImportResult:
        pool = await open_settings_pool(settings, max_size=2)
        try:
            return await import_labels(pool, args.file, questions, tenant=args.tenant, given_by=args.given_by)
        finally:
            await pool.close()

    try:
        result = asyncio.run(go())
    except LabelFileError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        print(f"flexor labels import: {len(e.errors)} bad lines in {e.path}: nothing imported", file=sys.stderr)
        return 2
    kept = result.rows - result.stored
    print(
        f"imported {result.rows} labels from {args.file.name} ({result.questions} questions, {result.yes} yes, "
        f"{result.rows - result.yes} no): {result.stored} stored"
        + (f", {kept} kept as they were (a label of higher precedence exists)" if kept else "")
    )
    return 0
