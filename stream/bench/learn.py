"""`flexor bench --learn`: the labelling loop, `uncertainty` against `random`, against heads
trained on every label of the pool, in one run.

    flexor bench --learn --conversations F [F ...] --questions Q --answers A [--rounds 20,40,...]
        [--teacher gold:FILE|ENGINE] [--limit N] --report DIR

- Data: split ``train`` is the pool, split ``eval`` measures (research files: the id rule;
  the service's formats: 80/20 by a hash of the conversation id).
- The pool is stored through the service's store (`PgEvidenceStore`: chunks, vectors,
  conversations rows) in an embedded Postgres, once; every strategy works on its own copy of
  that database (CREATE DATABASE ... TEMPLATE), so their labels never mix.
- ``learn.full_macro_f1``: heads trained on every gold label of the pool (`train_heads`, the code
  of `flexor train`), evaluated on the eval split. The zero-shot path is the curves' first point.
- Per strategy and round n: each question gets labels from the teacher up to n in all
  (`label_question`, the code of `flexor label`: candidates are the stored conversations the
  question applies to that the teacher can answer; `uncertainty` scores them with the previous
  round's heads); then heads are trained from the store (`read_store` + `train_heads`, the code
  of `flexor train --from-store`) and evaluated on the eval split (`evaluate`, the code of
  `flexor eval`). ``teacher_calls`` counts the pairs the teacher answered so far.
- The teacher is ``gold:<answers>`` by default. With an LLM teacher, its answers are compared with
  the gold ones: ``learn.teacher_agreement``.

Writes DIR/bench.json, DIR/bench.md and DIR/learn.png.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.learn.datasets import LabelledSet, read_labelled
from agents.learn.select import STRATEGIES
from agents.learn.teacher import GOLD_PREFIX, Teacher, load_teacher
from agents.questions import QuestionSet
from agents.types import EmbeddedConversation
from models.embedder import Embedder
from stream.bench import fresh_database, machine, write_json

log = logging.getLogger(__name__)

ROUNDS = (20, 40, 70, 100, 150, 200)
GOAL_SHARE_OF_FULL = 0.95
GOAL_AT = 200
COMPARE_AT = 100
STORE_BATCH = 256


def parse_rounds(text: str) -> list[int]:
    try:
        rounds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--rounds takes comma-separated label counts, not {text!r}") from None
    if not rounds or any(r < 1 for r in rounds) or rounds != sorted(set(rounds)):
        raise ValueError(f"--rounds must be increasing positive label counts, not {text!r}")
    return rounds


# -- the stored pool -------------------------------------------------------------------------------


async def _store_pool(url: str, embedded: Sequence[EmbeddedConversation], embedder_id: str) -> None:
    from agents.learn.stored import open_pool
    from agents.store.chunks import PgEvidenceStore

    pool = await open_pool(url)
    try:
        store = PgEvidenceStore(pool)
        for start in range(0, len(embedded), STORE_BATCH):
            await store.upsert(embedded[start : start + STORE_BATCH], embedder_id)
    finally:
        await pool.close()


async def _load_pool(url: str, embedder_id: str) -> list[EmbeddedConversation]:
    """The stored pool with its stored vectors, as `flexor label` reads it."""
    from agents.learn.stored import open_pool
    from agents.store.conversations import ConversationsTable

    pool = await open_pool(url)
    try:
        table = ConversationsTable(pool)
        out: list[EmbeddedConversation] = []
        after = None
        while keys := await table.keys(after=after):
            after = (keys[-1].tenant_id, keys[-1].conversation_id)
            out += await table.load([(k.tenant_id, k.conversation_id) for k in keys], embedder_id)
        return out
    finally:
        await pool.close()


# -- one strategy -----------------------------------------------------------------------------------


def _macro_f1(report: dict[str, Any]) -> float | None:
    v = report.get("macro_f1")
    return round(float(v), 4) if v is not None else None


def _score(eval_set: LabelledSet, embedder: Embedder, heads: Path | None) -> dict[str, Any]:
    from agents.learn.evaluate import build_report, evaluate

    answers, by_question, _, seconds = evaluate(eval_set, embedder, heads)
    report, _ = build_report(eval_set.questions.questions, [c.conversation_id for c in eval_set.conversations],
                             answers, eval_set.gold, heads_by_question=by_question, seconds=seconds)
    return report


async def run_strategy(
    strategy: str,
    url: str,
    loaded: list[EmbeddedConversation],
    questions: QuestionSet,
    teacher: Teacher,
    rounds: Sequence[int],
    eval_set: LabelledSet,
    embedder: Embedder,
    work: Path,
    seed: int,
    gold: dict[tuple[str, str], bool],
) -> dict[str, Any]:
    """The curve of one strategy, and what its teacher said against the gold answers."""
    from agents.learn.evaluate import build_pipeline
    from agents.learn.label import label_question
    from agents.learn.stored import open_pool
    from agents.learn.train import read_store, train_heads
    from agents.store.labels import LabelsTable, teacher_source

    curve: list[dict[str, Any]] = []
    heads: Path | None = None
    calls = 0
    pool = await open_pool(url)
    try:
        for n in rounds:
            t0 = time.perf_counter()
            pipeline, by_question, _ = build_pipeline(embedder, heads)
            yes = 0
            for q in questions.questions:
                q = q.model_copy(update={"head": by_question.get(q.id)})
                run = await label_question(pool, q, teacher, n, strategy=strategy, cascade=pipeline.cascade,
                                           embedder_id=embedder.model_id, seed=seed + n, loaded=loaded)
                calls += run.asked
                yes += run.yes
            t_label = time.perf_counter() - t0
            data, text = await read_store(pool, questions, embedder.model_id, "all")
            heads = work / f"{strategy}-{n}"
            await asyncio.to_thread(train_heads, data, embedder, heads, lexicon_text=text,
                                    manifest={"split": "all", "from_store": True}, log_to=_Quiet())
            t_train = time.perf_counter() - t0 - t_label
            report = await asyncio.to_thread(_score, eval_set, embedder, heads)
            point = {"labels_per_question": n, "macro_f1": _macro_f1(report), "teacher_calls": calls,
                     "labelled_pairs": len(data.gold),
                     "per_question_f1": {q: e["f1"] for q, e in report["questions"].items()},
                     "per_question": {q: {k: e[k] for k in ("n_yes", "n_pred_yes", "precision", "recall", "roc_auc")}
                                      for q, e in report["questions"].items()},
                     "labelled_yes": {q: sum(y for (qq, _), y in data.gold.items() if qq == q)
                                      for q in questions.by_id()},
                     "seconds": {"label": round(t_label, 1), "train": round(t_train, 1),
                                 "eval": round(time.perf_counter() - t0 - t_label - t_train, 1)}}
            curve.append(point)
            print(f"{strategy} {n}/question: macro-F1 {point['macro_f1']} after {calls} teacher answers "
                  f"({point['seconds']})", file=sys.stderr)
        given = await LabelsTable(pool).fetch(list(questions.by_id()))
    finally:
        await pool.close()
    mine = [g for g in given if g.source == teacher_source(teacher.model_id)]
    known = [(g, gold.get((g.question_id, g.conversation_id))) for g in mine]
    known = [(g, y) for g, y in known if y is not None]
    return {"curve": curve, "agreement": agreement([(g.answer == "yes", y) for g, y in known])}


def agreement(pairs: Sequence[tuple[bool, bool]]) -> dict[str, Any]:
    """The teacher's answers against the gold ones: raw agreement, and Cohen's kappa, which
    discounts what a teacher answering "no" to everything would agree by chance."""
    n = len(pairs)
    both_yes = sum(t and g for t, g in pairs)
    agree = sum(t == g for t, g in pairs)
    t_yes, g_yes = sum(t for t, _ in pairs), sum(g for _, g in pairs)
    chance = (t_yes * g_yes + (n - t_yes) * (n - g_yes)) / n**2 if n else 0.0
    return {
        "pairs": n, "agree": agree, "rate": round(agree / n, 4) if n else None,
        "teacher_yes": t_yes, "gold_yes": g_yes, "both_yes": both_yes,
        "kappa": round((agree / n - chance) / (1 - chance), 4) if n and chance < 1 else None,
    }


class _Quiet:
    """Training's per-question lines go to the log, not the terminal."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug(text.strip())
        return len(text)

    def flush(self) -> None:
        pass


# -- the benchmark ----------------------------------------------------------------------------------


def learn(
    *,
    conversations: Sequence[Path],
    questions_path: Path,
    answers_path: Path,
    report: Path,
    rounds: Sequence[int] = ROUNDS,
    teacher_spec: str | None = None,
    strategies: Sequence[str] = STRATEGIES,
    limit: int | None = None,
    only: Sequence[str] | None = None,
    seed: int = 13,
    embedder_backend: str = "onnx-int8",
) -> dict[str, Any]:
    from agents.learn.embedcache import CachingEmbedder
    from agents.learn.train import train_heads
    from agents.pipeline import embed_conversations
    from models.embedder import load_embedder
    from stream.dev.infra import EmbeddedPostgres

    t_start = time.perf_counter()
    pool_set = read_labelled(conversations, questions_path, answers_path, "train", limit)
    eval_set = read_labelled(conversations, questions_path, answers_path, "eval", limit)
    if only:
        keep = [q for q in pool_set.questions.questions if q.id in set(only)]
        if not keep:
            raise ValueError(f"--only {' '.join(only)}: no such question")
        qs = QuestionSet(questions=keep)
        for data in (pool_set, eval_set):
            data.questions = qs
            data.gold = {k: v for k, v in data.gold.items() if k[0] in set(only)}
    questions = pool_set.questions
    embedder = CachingEmbedder(load_embedder(embedder_backend))
    print(f"pool: {len(pool_set.conversations)} conversations, {len(pool_set.gold)} labelled pairs; "
          f"eval: {len(eval_set.conversations)} conversations, {len(eval_set.gold)} pairs", file=sys.stderr)
    pool_set.embedded = embed_conversations(embedder, pool_set.conversations)
    eval_set.embedded = embed_conversations(embedder, eval_set.conversations)
    embedder.flush()
    gold = {(q, pool_set.conversations[i].conversation_id): y for (q, i), y in pool_set.gold.items()}

    with tempfile.TemporaryDirectory(prefix="flexor-learn-") as tmp:
        work = Path(tmp)
        print("full: heads on every label of the pool ...", file=sys.stderr)
        t0 = time.perf_counter()
        train_heads(pool_set, embedder, work / "full", manifest={"split": "train"}, log_to=_Quiet())
        full = _score(eval_set, embedder, work / "full")
        t_full = time.perf_counter() - t0
        zero = _score(eval_set, embedder, None)
        print(f"full macro-F1 {_macro_f1(full)} ({t_full:.0f} s); zero-shot {_macro_f1(zero)}", file=sys.stderr)

        answers_name = Path(answers_path).name
        spec = teacher_spec or f"{GOLD_PREFIX}{answers_path}"
        pg = EmbeddedPostgres(work)
        pg.start()
        try:
            url = asyncio.run(fresh_database(pg.url, "learn"))
            base = url.rsplit("/", 1)[1]
            asyncio.run(_store_pool(url, pool_set.embedded, embedder.model_id))
            loaded = asyncio.run(_load_pool(url, embedder.model_id))
            results: dict[str, Any] = {}
            costs: dict[str, Any] = {}
            for strategy in strategies:
                teacher = load_teacher(spec)
                db = asyncio.run(fresh_database(pg.url, f"{base}_{strategy}", template=base))
                results[strategy] = asyncio.run(run_strategy(
                    strategy, db, loaded, questions, teacher, rounds, eval_set, embedder, work, seed, gold))
                c = teacher.cost()
                costs[strategy] = {"pairs": c.pairs, "calls": c.calls, "prompt_tokens": c.prompt_tokens,
                                   "generated_tokens": c.generated_tokens}
                close = getattr(getattr(teacher, "engine", None), "close", None)
                if close is not None:
                    close()
        finally:
            pg.stop()

    full_f1 = _macro_f1(full)
    curves = {s: [{k: p[k] for k in ("labels_per_question", "macro_f1", "teacher_calls")} for p in r["curve"]]
              for s, r in results.items()}
    zero_point = {"labels_per_question": 0, "macro_f1": _macro_f1(zero), "teacher_calls": 0}
    result: dict[str, Any] = {
        "mode": "learn",
        "learn": {
            "full_macro_f1": full_f1,
            "zero_shot_macro_f1": zero_point["macro_f1"],
            "pool_pairs": len(pool_set.gold),
            "pool_conversations": len(pool_set.conversations),
            "eval_pairs": len(eval_set.gold),
            "eval_conversations": len(eval_set.conversations),
            "questions": len(questions.questions),
            "curves": {s: [zero_point, *c] for s, c in curves.items()},
            "teacher": spec if not spec.startswith(GOLD_PREFIX) else f"{GOLD_PREFIX}{answers_name}",
            "teacher_cost": costs,
            "goals": _goals(full_f1, curves, len(pool_set.gold), len(questions.questions)),
            "per_question": {
                "full": {q: e["f1"] for q, e in full["questions"].items()},
                "zero_shot": {q: e["f1"] for q, e in zero["questions"].items()},
                **{s: r["curve"][-1]["per_question_f1"] for s, r in results.items()},
            },
            "rounds_detail": {s: r["curve"] for s, r in results.items()},
        },
        "format": pool_set.format,
        "sources": [Path(p).name for p in conversations],
        "seconds": round(time.perf_counter() - t_start, 1),
        "full_training_seconds": round(t_full, 1),
        "machine": machine(),
    }
    if not spec.startswith(GOLD_PREFIX):
        result["learn"]["teacher_agreement"] = {s: r["agreement"] for s, r in results.items()}
    report.mkdir(parents=True, exist_ok=True)
    write_json(report, result)
    write_markdown(result, report / "bench.md")
    write_chart(result, report / "learn.png")
    return result


def _at(curve: Sequence[dict[str, Any]], n: int) -> dict[str, Any] | None:
    return next((p for p in curve if p["labels_per_question"] == n), None)


def _goals(full: float | None, curves: dict[str, list[dict[str, Any]]], pool_pairs: int,
           n_questions: int) -> dict[str, Any]:
    unc, rnd = curves.get("uncertainty", []), curves.get("random", [])
    at_goal, u100, r100 = _at(unc, GOAL_AT), _at(unc, COMPARE_AT), _at(rnd, COMPARE_AT)
    goals: dict[str, Any] = {}
    if at_goal and full and at_goal["macro_f1"] is not None:
        goals["uncertainty_200_vs_full"] = round(at_goal["macro_f1"] / full, 4)
        goals["uncertainty_200_met"] = at_goal["macro_f1"] >= GOAL_SHARE_OF_FULL * full
    if u100 and r100 and u100["macro_f1"] is not None and r100["macro_f1"] is not None:
        goals["uncertainty_above_random_at_100"] = u100["macro_f1"] > r100["macro_f1"]
    if at_goal:
        goals["teacher_pairs_at_200"] = at_goal["teacher_calls"]
        goals["teacher_pairs_max"] = GOAL_AT * n_questions
        goals["pool_pairs_per_teacher_pair"] = round(pool_pairs / max(at_goal["teacher_calls"], 1), 1)
    return goals


def write_markdown(result: dict[str, Any], path: Path) -> None:
    learn_ = result["learn"]
    lines = [
        "# Labelling loop: uncertainty vs random",
        "",
        f"- pool: {learn_['pool_conversations']} conversations, {learn_['pool_pairs']} (conversation, question) "
        f"pairs; eval: {learn_['eval_conversations']} conversations, {learn_['eval_pairs']} pairs; "
        f"{learn_['questions']} questions; teacher `{learn_['teacher']}`",
        f"- heads on every label of the pool: macro-F1 {learn_['full_macro_f1']}; zero-shot "
        f"{learn_['zero_shot_macro_f1']}",
        "",
        "| labels per question | " + " | ".join(f"{s} macro-F1 | {s} teacher pairs" for s in learn_["curves"]) + " |",
        "| ---: | " + " | ".join("---: | ---:" for _ in learn_["curves"]) + " |",
    ]
    ns = sorted({p["labels_per_question"] for c in learn_["curves"].values() for p in c})
    for n in ns:
        cells = []
        for c in learn_["curves"].values():
            p = _at(c, n)
            cells += [str(p["macro_f1"]) if p else "-", str(p["teacher_calls"]) if p else "-"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", f"- goals: {learn_['goals']}"]
    if "teacher_agreement" in learn_:
        lines.append(f"- teacher agreement with gold: {learn_['teacher_agreement']}")
    path.write_text("\n".join(lines) + "\n")


def write_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learn_ = result["learn"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for strategy, curve in learn_["curves"].items():
        pts = [p for p in curve if p["macro_f1"] is not None]
        ax.plot([p["labels_per_question"] for p in pts], [p["macro_f1"] for p in pts], marker="o", label=strategy)
    full = learn_["full_macro_f1"]
    if full is not None:
        ax.axhline(full, color="black", lw=1, label=f"every label of the pool ({learn_['pool_pairs']} pairs)")
        ax.axhline(GOAL_SHARE_OF_FULL * full, color="grey", lw=0.8, ls="--", label=f"{GOAL_SHARE_OF_FULL:.0%} of it")
    ax.set(xlabel="labels per question", ylabel="macro-F1 (eval split)", ylim=(0, 1),
           title=f"Labelling loop, teacher {learn_['teacher']}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_learn(args: argparse.Namespace) -> int:
    if not sys.stderr.isatty():
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    missing = [f"--{k}" for k in ("questions", "answers") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"--learn needs {' and '.join(missing)}")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies or any(s not in STRATEGIES for s in strategies):
        raise ValueError(f"--strategies takes {' and/or '.join(STRATEGIES)}, not {args.strategies!r}")
    result = learn(
        conversations=[Path(p) for p in args.conversations], questions_path=Path(args.questions),
        answers_path=Path(args.answers), report=Path(args.report),
        rounds=parse_rounds(args.rounds) if args.rounds is not None else ROUNDS,
        teacher_spec=args.teacher, strategies=strategies, limit=args.limit, only=args.only, seed=args.seed,
    )
    learn_ = result["learn"]
    last = {s: c[-1] for s, c in learn_["curves"].items()}
    print(f"full macro-F1 {learn_['full_macro_f1']} on {learn_['pool_pairs']} pool pairs; "
          + "; ".join(f"{s}: {p['macro_f1']} at {p['labels_per_question']}/question ({p['teacher_calls']} teacher "
                      f"pairs)" for s, p in last.items())
          + f" -> {Path(args.report) / 'bench.json'}")
    return 0
