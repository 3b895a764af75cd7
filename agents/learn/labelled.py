"""Reader for the labelled evaluation data (../shared/data format) and its split rules.

Files (see ../shared/data/README.md):
- conversations: ``*.jsonl.gz`` lines ``{"conversation_id", "turns": [{"speaker", "text"}], "labels", "meta"}``
- ``questions.json``: ``question_id, dataset, question, positive_label, scope, exclude, n_yes, n_no``
- ``answers.jsonl.gz``: gold ``{"question_id", "conversation_id", "answer"}`` rows

Ground truth (``labels``, ``meta``, answers) stays in this module's records: `to_conversation`
builds the `Conversation` the classifier sees with ``metadata = {"dataset": ...}`` only; ``meta``
holds questionnaire answers, i.e. leaked labels, and is never passed on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from agents.chunking import Turn
from agents.questions import Question, QuestionSet
from agents.types import Conversation

TENANT = "eval"


class Split(StrEnum):
    TRAIN = "train"
    EVAL = "eval"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class LabelledConversation:
    conversation_id: str
    turns: tuple[tuple[str, str], ...]  # (speaker, text)
    labels: frozenset[str] = field(default_factory=frozenset)

    @property
    def dataset(self) -> str:
        return dataset_of(self.conversation_id)


@dataclass(frozen=True, slots=True)
class LabelledQuestion:
    question_id: str
    dataset: str
    text: str
    positive_label: tuple[str, ...]  # any of
    scope: tuple[tuple[str, ...], ...]  # every item must hold; an item holds when any alternative is present
    exclude: tuple[str, ...]  # any present -> not asked
    n_yes: int = 0
    n_no: int = 0

    def asked(self, conv: LabelledConversation) -> bool:
        """Whether this question applies to `conv` at all (dataset, scope, exclude)."""
        if conv.dataset != self.dataset:
            return False
        if any(label in conv.labels for label in self.exclude):
            return False
        return all(any(alt in conv.labels for alt in item) for item in self.scope)

    def gold(self, conv: LabelledConversation) -> bool | None:
        """True/False when asked, None when the question does not apply."""
        if not self.asked(conv):
            return None
        return any(label in conv.labels for label in self.positive_label)


def dataset_of(conversation_id: str) -> str:
    if conversation_id.startswith("sgd-"):
        return "sgd"
    if conversation_id.startswith("star-"):
        return "star"
    raise ValueError(f"unknown dataset for conversation id {conversation_id!r}")


def split_of(conversation_id: str) -> Split:
    """sgd-train-* and star-N (N % 5 != 0) train; sgd-dev-* and star-N (N % 5 == 0) evaluate."""
    if conversation_id.startswith("sgd-train-"):
        return Split.TRAIN
    if conversation_id.startswith("sgd-dev-"):
        return Split.EVAL
    if conversation_id.startswith("star-"):
        n = int(conversation_id.removeprefix("star-"))
        return Split.EVAL if n % 5 == 0 else Split.TRAIN
    raise ValueError(f"no split rule for conversation id {conversation_id!r}")


def in_split(conversation_id: str, split: Split | str) -> bool:
    split = Split(split)
    return split is Split.ALL or split_of(conversation_id) is split


def _open(path: str | Path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_conversations(
    paths: Iterable[str | Path], split: Split | str = Split.ALL, limit: int | None = None
) -> list[LabelledConversation]:
    """Conversations of `split` from every file, in file order; `limit` caps the count per file."""
    out: list[LabelledConversation] = []
    for path in paths:
        taken = 0
        with _open(path) as f:
            for line in f:
                if limit is not None and taken >= limit:
                    break
                row = json.loads(line)
                cid = row["conversation_id"]
                if not in_split(cid, split):
                    continue
                turns = tuple((str(t["speaker"]), str(t["text"])) for t in row["turns"])
                if not turns:
                    continue
                out.append(LabelledConversation(cid, turns, frozenset(row.get("labels", ()))))
                taken += 1
    return out


def read_questions(path: str | Path) -> list[LabelledQuestion]:
    with _open(path) as f:
        raw = json.load(f)
    return [
        LabelledQuestion(
            question_id=q["question_id"],
            dataset=q["dataset"],
            text=q["question"],
            positive_label=tuple(q["positive_label"].split("|")),
            scope=tuple(tuple(item.split("|")) for item in q.get("scope", [])),
            exclude=tuple(q.get("exclude", [])),
            n_yes=int(q.get("n_yes", 0)),
            n_no=int(q.get("n_no", 0)),
        )
        for q in raw
    ]


def read_answers(path: str | Path, ids: set[str] | None = None) -> dict[tuple[str, str], bool]:
    """Gold answers keyed by (question_id, conversation_id); `ids` keeps only those conversations."""
    gold: dict[tuple[str, str], bool] = {}
    with _open(path) as f:
        for line in f:
            row = json.loads(line)
            if ids is not None and row["conversation_id"] not in ids:
                continue
            gold[(row["question_id"], row["conversation_id"])] = row["answer"] == "yes"
    return gold


def to_conversation(conv: LabelledConversation) -> Conversation:
    """What the classifier sees: turns and the dataset name, never labels or meta."""
    turns = tuple(Turn(f"t{i + 1}", speaker, text) for i, (speaker, text) in enumerate(conv.turns))
    return Conversation(TENANT, conv.conversation_id, 1, turns, {"dataset": conv.dataset})


def question_set(questions: Sequence[LabelledQuestion], heads: dict[str, str] | None = None) -> QuestionSet:
    """A questions.yaml-compatible set: applies_to selects the dataset; `heads` maps id -> head id."""
    heads = heads or {}
    return QuestionSet(
        questions=[
            Question(
                id=q.question_id,
                version=1,
                text=q.text,
                applies_to={"dataset": q.dataset},
                head=heads.get(q.question_id),
            )
            for q in questions
        ]
    )


def shared_data_dir(repo_root: str | Path | None = None) -> Path:
    """$FLEXOR_SHARED_DATA, else ../shared/data relative to the repository root."""
    env = os.environ.get("FLEXOR_SHARED_DATA")
    if env:
        return Path(env)
    root = Path(repo_root) if repo_root else Path(__file__).resolve().parents[2]  # agents/learn/ -> the repo
    return root.parent / "shared" / "data"


def iter_gold(
    questions: Sequence[LabelledQuestion],
    convs: Sequence[LabelledConversation],
    answers: dict[tuple[str, str], bool],
) -> Iterator[tuple[LabelledQuestion, list[int], list[bool]]]:
    """Per question: indices into `convs` that have a gold answer, and those answers."""
    for q in questions:
        idx, y = [], []
        for i, c in enumerate(convs):
            a = answers.get((q.question_id, c.conversation_id))
            if a is not None:
                idx.append(i)
                y.append(a)
        yield q, idx, y


def source_names(paths: Sequence[str | Path]) -> list[str]:
    """Input files as results name them: file names only, so a result reads the same on any machine."""
    return [Path(p).name for p in paths]


def add_data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    """The labelled-data arguments `flexor train` and `flexor eval` share (either format, see
    `agents.learn.datasets`); --conversations and --answers are not needed with --from-store."""
    from models.embedder import BACKENDS

    parser.add_argument("--conversations", nargs="+", default=None,
                        help="conversation files: the labelled-data format or conversation.v1 JSONL")
    parser.add_argument("--questions", default=None,
                        help="questions.json or questions.yaml (--from-store: default the configured questions_file)")
    parser.add_argument("--answers", default=None, help="gold answers: answers.jsonl.gz or a labels JSONL")
    parser.add_argument("--split", default=split, choices=["train", "eval", "all"])
    parser.add_argument("--embedder", default=None, choices=BACKENDS,
                        help="default: onnx-int8 (--from-store: the configured models.embedder)")
    parser.add_argument("--no-cache", action="store_true", help="embed everything, without the on-disk cache")
    parser.add_argument("--limit", type=int, default=None, help="at most this many conversations per file")
    parser.add_argument("--config", default=None, help="YAML config file (--from-store: the database)")


def check_data_arguments(args: argparse.Namespace) -> None:
    missing = [f"--{k}" for k in ("conversations", "questions", "answers") if not getattr(args, k)]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --from-store)")
