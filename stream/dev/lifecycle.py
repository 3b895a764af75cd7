"""The learning loop on the examples, as `flexor up --demo` shows it after the answer table.

The conversations are split in two halves by the hash split that `train --from-store` and
`eval --from-store` use (`agents.learn.datasets.in_holdout_split`, with a held-out share of one
half). The labels of the first half go into the labels table (`flexor labels import`'s code),
heads are trained from the store on that half (`flexor train --from-store`'s code), the questions
that got a head get a new version, the service is restarted with the heads, and a backfill
(`flexor backfill`'s enqueue + follow) answers the stored conversations again from their stored
chunks. The held-out half is scored before (the zero-shot events) and after (the backfilled ones).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import yaml
from sklearn.metrics import precision_recall_fscore_support

from agents.heads import read_manifest
from agents.learn.datasets import in_holdout_split
from agents.learn.labels_import import import_labels, read_label_rows
from agents.learn.train import read_store, train_heads
from agents.questions import QuestionSet, load_questions
from agents.store.backfill import BackfillJobs
from models.embedder import load_embedder
from stream.backfill_command import enqueue, follow
from stream.config import Settings

HALF = 0.5  # the held-out share of the hash split: the second half is scored, the first trains
FIRST, HELD_OUT = "train", "eval"  # the split names of `in_holdout_split`

Key = tuple[str, int, str]  # (conversation id, revision, question id)


@dataclass(frozen=True, slots=True)
class Score:
    precision: float
    recall: float
    f1: float
    pairs: int  # labelled (conversation, question) pairs scored


@dataclass
class Lifecycle:
    labels_imported: int
    heads: dict[str, str]  # question id -> head id
    zero_shot: dict[str, str]  # question id -> why it keeps the zero-shot path
    questions: QuestionSet  # the bumped question set the backfill answered
    backfilled: int  # conversations the backfill job answered
    before: dict[str, Score]  # on the held-out half
    after: dict[str, Score]
    seconds: float


def gold_labels(path: str | Path) -> dict[Key, bool]:
    """The labels file as (conversation id, revision, question id) -> yes."""
    return {(r.conversation_id, r.revision or 1, r.question_id): r.answer == "yes" for r in read_label_rows(path)}


def latest_answers(rows: Iterable[Mapping[str, Any]]) -> dict[Key, bool]:
    """Answers of each conversation's latest revision among `rows` (classification rows or events:
    conversation_id, revision, answers)."""
    latest: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        seen = latest.get(row["conversation_id"])
        if seen is None or row["revision"] > seen["revision"]:
            latest[row["conversation_id"]] = row
    return {(cid, row["revision"], a["question_id"]): a["answer"] == "yes"
            for cid, row in latest.items() for a in row["answers"]}


def score(predicted: Mapping[Key, bool], gold: Mapping[Key, bool], question_ids: Sequence[str]) -> dict[str, Score]:
    """Precision, recall and F1 of yes per question, on the labelled pairs that were answered."""
    out = {}
    for qid in question_ids:
        keys = [k for k in predicted if k[2] == qid and k in gold]
        p, r, f, _ = precision_recall_fscore_support(
            [gold[k] for k in keys], [predicted[k] for k in keys], average="binary", zero_division=0.0,
        )
        out[qid] = Score(float(p), float(r), float(f), len(keys))
    return out


async def stored_answers(pool: asyncpg.Pool, question_set: str) -> dict[Key, bool]:
    """Latest-revision answers of the stored classifications under one question set version."""
    rows = await pool.fetch(
        "SELECT conversation_id, revision, answers FROM classifications WHERE question_set = $1", question_set
    )
    return latest_answers({**r, "answers": orjson.loads(r["answers"])} for r in rows)


def held_out(answers: Mapping[Key, bool]) -> dict[Key, bool]:
    return {k: v for k, v in answers.items() if in_holdout_split(k[0], HELD_OUT, HALF)}


def first_half_labels(labels: Path, out: Path) -> Path:
    """The lines of the labels file whose conversation is in the first half, as a file to import."""
    lines = [raw for raw in labels.read_bytes().splitlines(keepends=True)
             if raw.strip() and in_holdout_split(orjson.loads(raw)["conversation_id"], FIRST, HALF)]
    out.write_bytes(b"".join(lines))
    return out


def bump_versions(trained: Path, heads: Mapping[str, str], out: Path) -> QuestionSet:
    """The trained heads' questions.yaml with a new version for every question that got a head:
    the backfill answers only new or changed question versions."""
    qs = load_questions(trained / "questions.yaml")
    bumped = [q.model_copy(update={"version": q.version + 1}) if q.id in heads else q for q in qs.questions]
    out.write_text(yaml.safe_dump({"questions": [q.model_dump(mode="json") for q in bumped]}, sort_keys=False,
                                  allow_unicode=True))
    return load_questions(out)


async def run_lifecycle(
    settings: Settings,
    pool: asyncpg.Pool,
    labels: Path,
    workdir: Path,
    serve: Callable[[Settings], AbstractAsyncContextManager[Any]],
    say: Callable[[str], None] = print,
) -> Lifecycle:
    """Run the loop on conversations the service classified under `settings` and stored (the
    service is stopped); `serve(settings)` runs the service while the backfill goes on."""
    started = time.monotonic()
    questions = load_questions(settings.questions_file)
    qids = [q.id for q in questions.questions]
    gold = gold_labels(labels)
    before = score(held_out(await stored_answers(pool, questions.version)), gold, qids)

    say(f"split: conversations in two halves by a hash of their id (the split of `flexor train/eval "
        f"--from-store`, held-out share {HALF})")
    part = first_half_labels(labels, workdir / "labels-first-half.jsonl")
    imported = await import_labels(pool, part, questions, given_by=labels.name)
    say(f"labels import: {imported.rows} labels of the first half stored ({imported.yes} yes)")

    t = time.monotonic()
    embedder = await asyncio.to_thread(load_embedder, settings.models.embedder, settings.models.device,
                                       settings.models.dtype)
    data, text = await read_store(pool, questions, embedder.model_id, FIRST, holdout=HALF)
    heads_dir = workdir / "heads"
    heads = await asyncio.to_thread(
        train_heads, data, embedder, heads_dir, lexicon_text=text, log_to=io.StringIO(),
        manifest={"split": FIRST, "from_store": True, "holdout": HALF},
    )
    zero_shot = {qid: e["reason"] for qid, e in read_manifest(heads_dir)["questions"].items() if e["head"] is None}
    say(f"train --from-store: {len(heads)} heads from {len(data.gold)} labels of the stored revisions, "
        f"nothing embedded again ({time.monotonic() - t:.1f} s)")
    for qid, why in zero_shot.items():
        say(f"  {qid} keeps the zero-shot path: {why}")

    bumped = bump_versions(heads_dir, heads, workdir / "questions.yaml")
    served = settings.model_copy(update={
        "questions_file": workdir / "questions.yaml",
        "models": settings.models.model_copy(update={"heads_dir": heads_dir}),
    })
    new = [q for q in bumped.questions if q.id in heads]
    versions = ", ".join(f"{q.id}@{q.version}" for q in new)
    say(f"restart: the service with the heads and new question versions ({versions})")
    t = time.monotonic()
    async with serve(served):
        job = await enqueue(served, pool, bumped.version, new)
        progress = await follow(BackfillJobs(pool), job, served.topics.backfill, poll_s=0.25)
    say(f"backfill: {progress.conversations_done} stored conversations answered again from their stored chunks "
        f"({time.monotonic() - t:.1f} s with the restart)")
    after = score(held_out(await stored_answers(pool, bumped.version)), gold, qids)
    return Lifecycle(imported.rows, heads, zero_shot, bumped, progress.conversations_done, before, after,
                     time.monotonic() - started)


def macro_f1(scores: Mapping[str, Score]) -> float:
    return sum(s.f1 for s in scores.values()) / len(scores) if scores else 0.0
