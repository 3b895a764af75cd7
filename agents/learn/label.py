"""`flexor label`: a teacher labels stored conversations for one question.

    flexor label --teacher ENGINE|gold:FILE --question ID --budget N [--strategy uncertainty|random]

Candidates are the stored conversations (their latest revision) that the question applies to,
that have no label yet for the question's current version, and that the teacher can answer.
`--strategy` picks among them (`agents.learn.select`): ``uncertainty`` by the current stage-1
p_yes (the configured heads or `--heads`, else the zero-shot scorer; computed from the stored
vectors, nothing is embedded again), ``random`` as the control. The teacher answers in batches
of `--concurrency` pairs and every batch is stored (source ``teacher:<model id>``) before the
next is asked, so an interrupted run loses at most one batch.

`--budget N` is how many labels this teacher should have given the question in all: labels it
gave before count, so a rerun after a crash asks only for the rest, and a larger budget
continues where the last run stopped (rounds of active learning: 20, then 40, 80, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.cascade import Cascade
from agents.learn.select import (
    RANDOM,
    STRATEGIES,
    UNCERTAINTY,
    conversation_vectors,
    pick_random,
    pick_uncertain,
)
from agents.learn.teacher import Teacher, TeacherCost, load_teacher
from agents.questions import Question
from agents.store.labels import Label, LabelsTable, teacher_source
from agents.types import Conversation, EmbeddedConversation
from models.llm.engine import EngineError

log = logging.getLogger(__name__)

SEED = 13
CONCURRENCY = 8
# Share of uncertainty picks taken elsewhere while the question lacks labels of one answer
# (`agents.learn.select`: a cold start near a one-sided threshold keeps returning one answer):
# half to the likeliest holders of the missing answer, half at random.
COLD_START_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class LabelRun:
    question_id: str
    strategy: str
    teacher: str
    budget: int
    had: int  # this teacher's labels for the question before the run
    candidates: int
    asked: int
    yes: int
    cost: TeacherCost
    seconds: float

    def summary(self) -> str:
        c = self.cost
        return (
            f"{self.question_id}: teacher {self.teacher} answered {self.asked} pairs ({self.yes} yes, "
            f"{self.asked - self.yes} no; strategy {self.strategy}, {self.candidates} candidates), now "
            f"{self.had + self.asked}/{self.budget} of its labels; cost: {c.calls} calls, {c.prompt_tokens} "
            f"prompt tokens, {c.generated_tokens} generated tokens, {self.seconds:.1f} s"
        )


def stage1(cascade: Cascade, question: Question, convs: Sequence[EmbeddedConversation]) -> tuple[np.ndarray, float]:
    """(stage-1 p_yes per conversation, the decision threshold) for one question."""
    convs = list(convs)
    (result,) = cascade.stage1([(question, list(range(len(convs))))], convs)
    return np.asarray(result.p_yes, np.float64), float(result.threshold)


def choose(
    strategy: str, n: int, seed: int, convs: Sequence[EmbeddedConversation] | None = None,
    p_yes: np.ndarray | None = None, threshold: float = 0.5, n_candidates: int | None = None,
    explore: float = 0.0,
    seek: Sequence[bool] = (),
) -> np.ndarray:
    """Indices of the n candidates to ask (`random` needs only their number)."""
    if strategy == RANDOM:
        return pick_random(n_candidates if n_candidates is not None else len(convs or ()), n, seed)
    if strategy == UNCERTAINTY and convs is not None and p_yes is not None:
        return pick_uncertain(p_yes, threshold, conversation_vectors(convs), n, seed, explore=explore, seek=seek)
    raise ValueError(f"strategy {strategy!r} needs its candidates' vectors and p_yes (or use one of {STRATEGIES})")


async def ask(
    teacher: Teacher,
    question: Question,
    convs: Sequence[Conversation],
    table: LabelsTable,
    *,
    batch: int = CONCURRENCY,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Ask the teacher about every conversation, `batch` at a time, storing each batch's labels
    before asking the next; returns the number of yes answers."""
    source = teacher_source(teacher.model_id)
    yes = 0
    for start in range(0, len(convs), batch):
        part = convs[start : start + batch]
        answers = await asyncio.to_thread(teacher.answer, question, part)
        await table.upsert([Label(c.tenant_id, c.conversation_id, c.revision, question.id, question.version, a,
                                  source, teacher.model_id) for c, a in zip(part, answers, strict=True)])
        yes += sum(a == "yes" for a in answers)
        if on_batch is not None:
            on_batch(len(part))
    return yes


def _open(question: Question, teacher: Teacher, convs: Sequence[Conversation],
          labelled: set[tuple[str, str, int]]) -> list[int]:
    """Indices of `convs` the question applies to, without a label, that the teacher can answer."""
    idx = [i for i, c in enumerate(convs) if question.applies(c.metadata)
           and (c.tenant_id, c.conversation_id, c.revision) not in labelled]
    ok = teacher.answerable(question, [convs[i] for i in idx])
    return [i for i, good in zip(idx, ok, strict=True) if good]


async def _missing(table: LabelsTable, question: Question, tenant_id: str | None) -> tuple[bool, ...]:
    """The answers (True: yes) with too few labels to train a head (`agents.learn.train.MIN_PER_CLASS`)."""
    from agents.learn.train import MIN_PER_CLASS

    counts = {a: await table.count(question.id, question.version, answer=a, tenant_id=tenant_id) for a in ("yes", "no")}
    return tuple(a == "yes" for a, n in counts.items() if n < MIN_PER_CLASS)


async def candidates(
    pool: Any, question: Question, teacher: Teacher, *, tenant_id: str | None = None
) -> list[Conversation]:
    """Stored conversations the question applies to, without a label for its version, that the
    teacher can answer; in (tenant, conversation) order."""
    from agents.store.conversations import ConversationsTable

    labelled = await LabelsTable(pool).labelled(question.id, question.version, tenant_id=tenant_id)
    table = ConversationsTable(pool)
    out: list[Conversation] = []
    after = None
    while page := await table.scan(tenant_id=tenant_id, after=after):
        after = (page[-1].tenant_id, page[-1].conversation_id)
        out += [page[i] for i in _open(question, teacher, page, labelled)]
    return out


async def label_question(
    pool: Any,
    question: Question,
    teacher: Teacher,
    budget: int,
    *,
    strategy: str = UNCERTAINTY,
    cascade: Cascade | None = None,
    embedder_id: str | None = None,
    tenant_id: str | None = None,
    batch: int = CONCURRENCY,
    seed: int = SEED,
    progress: bool = False,
    loaded: Sequence[EmbeddedConversation] | None = None,
) -> LabelRun:
    """One `flexor label` run (see the module docstring); `cascade` and `embedder_id` are needed
    for `uncertainty`. `loaded`: the stored conversations (of `tenant_id`) already loaded with
    their vectors, to choose among without reading them again (many questions and rounds)."""
    from agents.store.conversations import ConversationsTable

    t0 = time.perf_counter()
    table = LabelsTable(pool)
    had = await table.count(question.id, question.version, source=teacher_source(teacher.model_id),
                            tenant_id=tenant_id)
    todo = max(0, budget - had)
    embedded: list[EmbeddedConversation] | None = None
    if not todo:
        cands: list[Conversation] = []
    elif loaded is not None:
        labelled = await table.labelled(question.id, question.version, tenant_id=tenant_id)
        embedded = [loaded[i] for i in _open(question, teacher, [e.conversation for e in loaded], labelled)]
        cands = [e.conversation for e in embedded]
    else:
        cands = await candidates(pool, question, teacher, tenant_id=tenant_id)
    n = min(todo, len(cands))
    chosen: list[Conversation] = []
    if n and strategy == UNCERTAINTY:
        if cascade is None or embedder_id is None:
            raise ValueError("the uncertainty strategy needs a cascade and the stored chunks' embedder id")
        if embedded is None:
            keys = [(c.tenant_id, c.conversation_id) for c in cands]
            embedded = [e for s in range(0, len(keys), 1000)
                        for e in await ConversationsTable(pool).load(keys[s : s + 1000], embedder_id)]
        p_yes, threshold = await asyncio.to_thread(stage1, cascade, question, embedded)
        missing = await _missing(table, question, tenant_id)
        picks = choose(strategy, n, seed, embedded, p_yes, threshold, explore=COLD_START_SHARE if missing else 0.0,
                       seek=missing)
        chosen = [embedded[i].conversation for i in picks]
    elif n:
        chosen = [cands[i] for i in choose(strategy, n, seed, n_candidates=len(cands))]
    before = teacher.cost()
    yes = await _ask_with_progress(teacher, question, chosen, table, batch, progress)
    after = teacher.cost()
    cost = TeacherCost(*(a - b for a, b in zip(
        (after.pairs, after.calls, after.prompt_tokens, after.generated_tokens),
        (before.pairs, before.calls, before.prompt_tokens, before.generated_tokens), strict=True)))
    return LabelRun(question.id, strategy, teacher.model_id, budget, had, len(cands), len(chosen), yes, cost,
                    time.perf_counter() - t0)


async def _ask_with_progress(
    teacher: Teacher, question: Question, convs: Sequence[Conversation], table: LabelsTable, batch: int,
    progress: bool,
) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"labelling {question.id}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress, transient=True) as bar:
        task = bar.add_task("label", total=len(convs))
        return await ask(teacher, question, convs, table, batch=batch, on_batch=lambda k: bar.advance(task, k))


# -- the command -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="an LLM engine spec (hf:PATH, openai:URL, ...) or gold:FILE")
    parser.add_argument("--question", required=True, help="question id (from the questions file)")
    parser.add_argument("--budget", type=int, required=True,
                        help="labels this teacher should have given the question in all (earlier ones count)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=UNCERTAINTY)
    parser.add_argument("--questions", type=Path, default=None, help="questions file (default: questions_file)")
    parser.add_argument("--heads", type=Path, default=None,
                        help="heads for the uncertainty strategy (default: models.heads_dir; none: zero-shot)")
    parser.add_argument("--tenant", default=None, help="only this tenant's conversations")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY,
                        help="pairs per teacher batch (in flight together; stored before the next)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--config", type=Path, help="YAML config file (environment variables override it)")


def run(args: argparse.Namespace) -> int:
    from agents.learn.datasets import read_questions_file
    from agents.learn.evaluate import build_pipeline
    from agents.learn.stored import open_settings_pool
    from models.embedder import load_embedder

    if args.budget < 1 or args.concurrency < 1:
        raise ValueError("--budget and --concurrency must be at least 1")
    settings = args.settings()
    questions = read_questions_file(args.questions or settings.questions_file)[0].by_id()
    if args.question not in questions:
        raise ValueError(f"question {args.question!r} is not in the questions file ({', '.join(questions)})")
    question = questions[args.question]
    teacher = load_teacher(args.teacher)
    cascade, embedder_id = None, None
    if args.strategy == UNCERTAINTY:
        embedder = load_embedder(settings.models.embedder)
        pipeline, heads, _ = build_pipeline(embedder, args.heads or settings.models.heads_dir)
        question = question.model_copy(update={"head": heads.get(question.id)})
        cascade, embedder_id = pipeline.cascade, embedder.model_id

    async def go() -> LabelRun:
        pool = await open_settings_pool(settings, max_size=2)
        try:
            return await label_question(
                pool, question, teacher, args.budget, strategy=args.strategy, cascade=cascade,
                embedder_id=embedder_id, tenant_id=args.tenant, batch=args.concurrency, seed=args.seed,
                progress=sys.stderr.isatty(),
            )
        finally:
            await pool.close()
            close = getattr(getattr(teacher, "engine", None), "close", None)
            if close is not None:
                close()

    try:
        result = asyncio.run(go())
    except EngineError as e:
        # Every batch before the failure is stored: the same command continues from there.
        print(f"flexor label: error: the teacher failed ({str(e).splitlines()[0]}); the labels stored so far are "
              "kept: rerun the same command to continue", file=sys.stderr)
        return 1
    print(result.summary())
    if result.had + result.asked < args.budget:
        print(f"{args.question}: only {result.candidates} unlabelled stored conversations the teacher can answer: "
              f"the budget of {args.budget} is not reached", file=sys.stderr)
    return 0
