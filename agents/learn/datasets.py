"""Labelled data for `flexor train`, `flexor eval` and `flexor bench --learn`, in either format.

- research (``../shared/data``): STAR/SGD conversations with their ``labels``, ``questions.json``
  and ``answers.jsonl.gz`` (`agents.learn.labelled`); split by the ``star-``/``sgd-`` id rule.
- service: conversation.v1 JSONL (what the service consumes), ``questions.yaml`` (what it
  answers) and a labels JSONL (`agents.learn.labels_import`). Conversation ids are the user's:
  the split is 80/20 by a hash of the conversation id (`holdout`), the same one that
  ``--from-store`` uses on the labels table.

Either way a question selects conversations by ``applies_to`` on their metadata, and only
labelled (conversation, question) pairs where the question applies are kept.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agents.chunking import Turn
from agents.learn.labels_import import LabelFileError
from agents.questions import QuestionSet, load_questions
from agents.types import Conversation, EmbeddedConversation

RESEARCH = "research"
SERVICE = "service"
INPUT_SCHEMA = "conversation.v1"
# Share of conversations held out for evaluation by `holdout` (service formats, the labels table).
HOLDOUT = 0.2


class DataFormatError(ValueError):
    """A data file of the wrong or of a mixed format: the message names the file."""


def holdout_share(conversation_id: str) -> float:
    """A fixed number in [0, 1) per conversation id: the same on every machine and every run."""
    digest = hashlib.blake2b(conversation_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_holdout_split(conversation_id: str, split: str, holdout: float = HOLDOUT) -> bool:
    """`split` eval: the held-out `holdout` share; train: the rest; all: everything."""
    if split == "all":
        return True
    held_out = holdout_share(conversation_id) < holdout
    return held_out if split == "eval" else not held_out


@dataclass
class LabelledSet:
    """Conversations as the classifier sees them, questions, and gold answers per pair."""

    conversations: list[Conversation]
    questions: QuestionSet
    gold: dict[tuple[str, int], bool]  # (question id, index into conversations) -> yes
    format: str
    groups: dict[str, str | None] = field(default_factory=dict)  # question id -> dataset (research)
    embedded: list[EmbeddedConversation] | None = None  # the stored vectors, when read from the store
    label_sources: dict[str, dict[str, int]] = field(default_factory=dict)  # question id -> source -> n
    notes: list[str] = field(default_factory=list)

    def rows(self, question_id: str) -> tuple[list[int], list[bool]]:
        """Indices of the labelled conversations for one question (ascending) and their answers."""
        pairs = sorted((i, y) for (q, i), y in self.gold.items() if q == question_id)
        return [i for i, _ in pairs], [y for _, y in pairs]


# -- format detection -----------------------------------------------------------------------------


def _open_text(path: Path):  # type: ignore[no-untyped-def]
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def conversations_format(path: str | Path) -> str:
    """RESEARCH or SERVICE, from the first line of a conversations file."""
    path = Path(path)
    try:
        with _open_text(path) as f:
            first = next((line for line in f if line.strip()), None)
    except FileNotFoundError:
        raise DataFormatError(f"conversations file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataFormatError(f"conversations file {path} cannot be read: {e}") from None
    if first is None:
        raise DataFormatError(f"conversations file {path} is empty")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        raise DataFormatError(f"conversations file {path} is not JSONL (line 1 is not JSON)") from None
    if isinstance(row, dict) and row.get("schema") == INPUT_SCHEMA:
        return SERVICE
    if isinstance(row, dict) and "conversation_id" in row and isinstance(row.get("turns"), list):
        return RESEARCH
    raise DataFormatError(
        f"conversations file {path}: line 1 is neither conversation.v1 nor the labelled-data format"
    )


def read_questions_file(path: str | Path) -> tuple[QuestionSet, str, dict[str, str | None]]:
    """(questions, format, question id -> dataset) from questions.yaml or the research questions.json."""
    from agents.learn.labelled import question_set, read_questions

    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        qs = load_questions(path)
        return qs, SERVICE, {q.id: None for q in qs.questions}
    try:
        research = read_questions(path)
    except FileNotFoundError:
        raise DataFormatError(f"questions file {path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DataFormatError(
            f"questions file {path} is neither questions.yaml nor the research questions.json "
            f"({type(e).__name__}: {e})"
        ) from None
    return question_set(research), RESEARCH, {q.question_id: q.dataset for q in research}


# -- conversation.v1 files ---------------------------------------------------------------------------


def _conversation_v1(row: Any) -> Conversation:
    """A conversation.v1 record -> Conversation; ValueError with the reason when it is not one."""
    if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}, not an object")
    if row.get("schema") != INPUT_SCHEMA:
        raise ValueError(f"schema is {row.get('schema')!r}, expected {INPUT_SCHEMA!r}")
    for key in ("tenant_id", "conversation_id"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise ValueError(f"{key} must be a non-empty string")
    revision = row.get("revision")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise ValueError("revision must be an integer >= 0")
    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be an object")
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ValueError("turns must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("turn_id", "speaker", "text")):
            raise ValueError(f"turns.{i} must have string turn_id, speaker and text")
        out.append(Turn(t["turn_id"], t["speaker"], t["text"]))
    occurred = row.get("occurred_at")
    try:
        occurred_at = datetime.fromisoformat(occurred) if isinstance(occurred, str) else None
    except ValueError:
        raise ValueError(f"occurred_at {occurred!r} is not an ISO 8601 time") from None
    return Conversation(row["tenant_id"], row["conversation_id"], revision, tuple(out), metadata,
                        str(row.get("status", "closed")), occurred_at)


def read_service_conversations(
    path: str | Path, limit: int | None = None, split: str = "all"
) -> list[Conversation]:
    """conversation.v1 JSONL: the newest revision of each (tenant, conversation) of `split`, in file
    order of their first line, at most `limit`. DataFormatError naming the first bad line."""
    path = Path(path)
    newest: dict[tuple[str, str], Conversation] = {}
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(newest) >= limit:
                break
            try:
                conv = _conversation_v1(json.loads(line))
            except (json.JSONDecodeError, ValueError) as e:
                raise DataFormatError(f"conversations file {path}:{n}: {e}") from None
            if not in_holdout_split(conv.conversation_id, split):
                continue
            key = (conv.tenant_id, conv.conversation_id)
            if key not in newest or newest[key].revision <= conv.revision:
                newest[key] = conv
    return list(newest.values())


# -- both formats ------------------------------------------------------------------------------------


def read_labelled(
    conversations: Sequence[str | Path],
    questions: str | Path,
    answers: str | Path,
    split: str = "all",
    limit: int | None = None,
) -> LabelledSet:
    """The labelled set of `split` from files of one format (DataFormatError, naming the file,
    for a wrong or mixed one). `limit` caps the conversations per file."""
    formats = {Path(p): conversations_format(p) for p in conversations}
    first = next(iter(formats))
    for p, fmt in formats.items():
        if fmt != formats[first]:
            raise DataFormatError(f"conversations file {p} is {fmt} format but {first} is {formats[first]}: "
                                  "use one format")
    fmt = formats[first]
    qset, q_fmt, groups = read_questions_file(questions)
    if q_fmt != fmt:
        want = "questions.yaml" if fmt == SERVICE else "the research questions.json"
        raise DataFormatError(f"questions file {questions} is {q_fmt} format but the conversations are {fmt} "
                              f"format: use {want}")
    if fmt == RESEARCH:
        data = _read_research(conversations, questions, answers, split, limit, qset, groups)
    else:
        convs = [c for p in conversations for c in read_service_conversations(p, limit, split)]
        try:
            gold, notes = match_labels(answers, convs, qset)
        except LabelFileError as e:
            line, reason = e.errors[0]
            raise DataFormatError(f"answers file {answers}:{line}: {reason}") from None
        data = LabelledSet(convs, qset, gold, SERVICE, groups, notes=notes)
    if data.conversations and not data.gold:
        raise DataFormatError(f"answers file {answers}: no answer matches a conversation of split {split} and a "
                              "question that applies to it")
    return data


def _read_research(
    conversations: Sequence[str | Path], questions: str | Path, answers: str | Path, split: str,
    limit: int | None, qset: QuestionSet, groups: dict[str, str | None],
) -> LabelledSet:
    from agents.learn.labelled import read_answers, read_conversations, to_conversation

    try:
        labelled = read_conversations(conversations, split, limit=limit)
    except (KeyError, ValueError) as e:
        raise DataFormatError(f"conversations {', '.join(map(str, conversations))}: {e}") from None
    index = {c.conversation_id: i for i, c in enumerate(labelled)}
    try:
        answers_by_key = read_answers(answers, set(index))
    except (KeyError, json.JSONDecodeError) as e:
        raise DataFormatError(f"answers file {answers} is not the research answers format ({e!r})") from None
    known = {q.id for q in qset.questions}
    gold = {(q, index[cid]): y for (q, cid), y in answers_by_key.items() if q in known}
    return LabelledSet([to_conversation(c) for c in labelled], qset, gold, RESEARCH, groups)


def match_labels(
    path: str | Path, convs: Sequence[Conversation], questions: QuestionSet
) -> tuple[dict[tuple[str, int], bool], list[str]]:
    """Gold answers of a labels file for `convs`: (question id, index) -> yes, and notes on the
    rows left out. A row matches a conversation by id, and by tenant and revision when it names
    them; a row naming another question version than the questions file is left out, and so is a
    pair the question does not apply to."""
    from agents.learn.labels_import import read_label_rows

    by_id: dict[str, list[int]] = {}
    for i, c in enumerate(convs):
        by_id.setdefault(c.conversation_id, []).append(i)
    qs = questions.by_id()
    gold: dict[tuple[str, int], bool] = {}
    skipped: Counter[str] = Counter()
    errors: list[tuple[int, str]] = []
    for r in read_label_rows(path):
        q = qs.get(r.question_id)
        if q is None:
            skipped["unknown question"] += 1
            continue
        if r.question_version is not None and r.question_version != q.version:
            skipped["another question version"] += 1
            continue
        hits = [i for i in by_id.get(r.conversation_id, []) if r.tenant_id in (None, convs[i].tenant_id)]
        if len(hits) > 1:
            errors.append((r.line, f"conversation {r.conversation_id!r} exists for several tenants: add tenant_id"))
            continue
        if not hits:
            skipped["conversation not in the split"] += 1
            continue
        i = hits[0]
        if r.revision is not None and r.revision != convs[i].revision:
            skipped["another revision"] += 1
            continue
        if not q.applies(convs[i].metadata):
            skipped["question does not apply"] += 1
            continue
        gold[(q.id, i)] = r.answer == "yes"
    if errors:
        raise LabelFileError(path, errors)
    notes = [f"{n} labels left out: {why}" for why, n in sorted(skipped.items())]
    return gold, notes
