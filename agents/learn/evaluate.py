"""`flexor eval`: run the service's pipeline on labelled conversations and write a report.

    flexor eval --conversations star.jsonl.gz sgd.jsonl.gz --questions questions.json \
        --answers answers.jsonl.gz --split eval [--heads DIR] --report DIR
    flexor eval --conversations conversations.jsonl --questions questions.yaml \
        --answers labels.jsonl --split all --report DIR
    flexor eval --from-store [--questions questions.yaml] [--split eval] [--heads DIR] --report DIR

Data (`agents.learn.datasets`): the research files; the service's formats (conversation.v1,
questions.yaml, labels JSONL; split 80/20 by a hash of the conversation id; questions select
conversations by `applies_to`); or, with ``--from-store``, the labels table and the stored
conversations with their stored vectors (split ``eval``: the held-out share `train
--from-store` leaves out). Only labelled (conversation, question) pairs are scored.

The same code as the service answers every conversation: chunking, embedding (with the
service's default reuse cache, `agents.embedding_cache`), evidence retrieval (the in-memory
store, ranked as pgvector ranks) and the cascade (heads where DIR has one, else the zero-shot
scorer). Only then are gold answers compared.
Writes DIR/report.json, DIR/report.md, DIR/pr_curves.png and DIR/reliability.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.cascade import Cascade
from agents.embedding_cache import DEFAULT_MB, EmbeddingCache
from agents.evidence import MemoryEvidenceStore
from agents.learn.datasets import HOLDOUT, LabelledSet, read_labelled, read_questions_file
from agents.learn.embedcache import CachingEmbedder
from agents.learn.labelled import add_data_arguments, check_data_arguments, source_names
from agents.learn.metrics import pr_curve, reliability, summarize
from agents.pipeline import Pipeline
from agents.questions import Question, QuestionSet
from agents.similarity import SimilarityScorer
from agents.types import Answer, Conversation
from models.embedder import Embedder, load_embedder

log = logging.getLogger(__name__)

BATCH = 256
# decided_by -> report path; "*-fallback" answers count for the stage-1 path that gave them.
PATHS = {"head": "head", "few-shot": "few-shot", "similarity": "zero-shot", "llm": "llm", "cache": "cache"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, split="eval")
    parser.add_argument("--from-store", action="store_true",
                        help="score the labels table's held-out share on the stored conversations")
    parser.add_argument("--holdout", type=float, default=HOLDOUT,
                        help="--from-store: share of conversations (by id hash) held out as split eval")
    parser.add_argument("--tenant", default=None, help="--from-store: this tenant's labels only")
    parser.add_argument("--heads", default=None, help="heads directory from `flexor train`")
    parser.add_argument("--report", required=True, help="directory for report.json, report.md and plots")
    parser.add_argument("--batch", type=int, default=BATCH, help="conversations per pipeline call")
    parser.add_argument("--no-progress", action="store_true")


def build_pipeline(embedder: Embedder, heads_dir: str | Path | None) -> tuple[Pipeline, dict[str, str], str]:
    """The service's pipeline with the in-memory store; (pipeline, question id -> head id, heads version)."""
    heads: dict[str, Any] = {}
    version = "none"
    by_question: dict[str, str] = {}
    if heads_dir is not None:
        from agents.heads import head_ids_by_question, load_heads

        heads, version = load_heads(heads_dir, embedder)
        by_question = {q: h for q, h in head_ids_by_question(heads_dir).items() if h in heads}
    cascade = Cascade(SimilarityScorer(embedder), heads)
    # The service's reuse cache too: a turn repeated across conversations is embedded once.
    cache = EmbeddingCache(DEFAULT_MB * 2**20)
    return Pipeline(embedder, MemoryEvidenceStore(), cascade, cache=cache), by_question, version


async def classify_all(
    pipeline: Pipeline,
    convs: Sequence[Conversation],
    questions: QuestionSet,
    batch: int = BATCH,
    progress: bool = True,
) -> tuple[list[list[Answer]], float]:
    """Answers per conversation, and the wall time spent in the pipeline."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    answers: list[list[Answer]] = []
    spent = 0.0
    with Progress(
        TextColumn("classifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task("classify", total=len(convs))
        for start in range(0, len(convs), batch):
            part = convs[start : start + batch]
            t = time.perf_counter()
            result = await pipeline.classify(part, questions)
            spent += time.perf_counter() - t
            answers.extend(result.answers)
            bar.advance(task, len(part))
    return answers, spent


def _path_of(decided_by: str) -> str:
    return PATHS.get(decided_by.removesuffix("-fallback"), decided_by)


def build_report(
    questions: Sequence[Question],
    conv_ids: Sequence[str],
    answers: Sequence[Sequence[Answer]],
    gold: dict[tuple[str, int], bool],
    *,
    heads_by_question: dict[str, str],
    seconds: float,
    groups: dict[str, str | None] | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """report.json content, and per question (gold, p_yes) arrays for the plots. `gold` is keyed
    by (question id, index into conv_ids); `groups` gives each question's dataset, if any."""
    by_key: dict[tuple[str, int], Answer] = {}
    stages: Counter[str] = Counter()
    for i, row in enumerate(answers):
        for a in row:
            by_key[(a.question_id, i)] = a
            stages[a.decided_by] += 1
    per_q: dict[str, Any] = {}
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    labelled: dict[str, list[tuple[int, bool]]] = {}
    for (qid, i), y in gold.items():
        labelled.setdefault(qid, []).append((i, y))
    for q in questions:
        rows = [(y, by_key.get((q.id, i))) for i, y in sorted(labelled.get(q.id, []))]
        missing = sum(a is None for _, a in rows)
        if missing:
            log.warning("%s: %d gold rows got no answer (question did not apply)", q.id, missing)
        rows = [(y, a) for y, a in rows if a is not None]
        y = np.array([r[0] for r in rows], bool)
        p = np.array([r[1].p_yes for r in rows], np.float64)
        pred = np.array([r[1].answer == "yes" for r in rows], bool)
        paths = Counter(_path_of(r[1].decided_by) for r in rows)
        entry: dict[str, Any] = {
            "path": paths.most_common(1)[0][0] if paths else ("head" if q.id in heads_by_question
                                                              else "zero-shot"),
            "paths": dict(paths),
            "dataset": (groups or {}).get(q.id),
            "question": q.text,
        }
        entry.update(summarize(y, p, pred))
        per_q[q.id] = _clean(entry)
        arrays[q.id] = (y, p)
    f1s = [e["f1"] for e in per_q.values() if e["n"]]
    aucs = [e["roc_auc"] for e in per_q.values() if e["roc_auc"] is not None]
    total = sum(stages.values())
    report = {
        "questions": per_q,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "conversations": len(conv_ids),
        "answers": total,
        "seconds": round(seconds, 3),
        "conversations_per_s": round(len(conv_ids) / seconds, 2) if seconds > 0 else None,
        "stage_share": {k: round(v / total, 4) for k, v in sorted(stages.items())} if total else {},
        **(extra or {}),
    }
    return report, arrays


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            v = None if math.isnan(v) else round(v, 4)
        out[k] = v
    return out


def write_markdown(report: dict[str, Any], path: Path) -> None:
    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = [
        "# Evaluation report",
        "",
        f"- conversations: {report['conversations']} (split {report.get('split')}), answers: {report['answers']}",
        f"- heads: {report.get('heads') or 'none (zero-shot)'}; embedder: {report.get('embedder')}",
        f"- macro F1: {fmt(report['macro_f1'])}; macro ROC-AUC: {fmt(report['macro_roc_auc'])}",
        f"- throughput: {fmt(report['conversations_per_s'])} conversations/s "
        f"({report['seconds']} s in the pipeline; embedding cache: {report.get('embedding_cache')})",
        f"- decided by: {', '.join(f'{k} {v:.1%}' for k, v in report['stage_share'].items())}",
        "",
        "| question | path | n | n_yes | n_pred_yes | precision | recall | F1 | ROC-AUC | PR-AUC | ECE | ECE floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for qid, e in report["questions"].items():
        lines.append(
            f"| {qid} | {e['path']} | {e['n']} | {e['n_yes']} | {e['n_pred_yes']} | {fmt(e['precision'])} | "
            f"{fmt(e['recall'])} | {fmt(e['f1'])} | {fmt(e['roc_auc'])} | {fmt(e['pr_auc'])} | {fmt(e['ece'])} | "
            f"{fmt(e['ece_floor'])} |"
        )
    lines += [
        "",
        "ECE floor: the median ECE that a perfectly calibrated model with the same p_yes would show on",
        "these rows (sampling noise alone); an ECE close to it is not evidence of miscalibration.",
    ]
    lines += ["", "Questions:", ""]
    lines += [f"- {qid}: {e['question']}" for qid, e in report["questions"].items()]
    path.write_text("\n".join(lines) + "\n")


def write_answers(path: Path, convs: Sequence[Conversation], answers: Sequence[Sequence[Answer]]) -> None:
    """Every answer the pipeline gave (no gold): what the service would have published."""
    with open(path, "w") as f:
        for c, row in zip(convs, answers, strict=True):
            for a in row:
                f.write(json.dumps({"tenant_id": c.tenant_id, "conversation_id": c.conversation_id,
                                    "revision": c.revision, **a.as_dict()}) + "\n")


def write_plots(arrays: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qids = [q for q, (y, _) in arrays.items() if len(y)]
    cols = 4
    rows = max(1, math.ceil(len(qids) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, qid in zip(axes.flat, qids, strict=False):
        y, p = arrays[qid]
        if y.any():
            precision, recall, _ = pr_curve(y, p)
            ax.plot(np.r_[0.0, recall], np.r_[1.0, precision], lw=1.5)
        ax.axhline(y.mean() if len(y) else 0, color="grey", lw=0.8, ls="--")
        ax.set(title=f"{qid} (n={len(y)}, yes={int(y.sum())})", xlabel="recall", ylabel="precision",
               xlim=(0, 1), ylim=(0, 1.02))
    for ax in list(axes.flat)[len(qids):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "pr_curves.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for qid in qids:
        y, p = arrays[qid]
        bins = [b for b in reliability(y, p) if b["n"]]
        ax.plot([b["p_mean"] for b in bins], [b["y_rate"] for b in bins], marker="o", ms=3, lw=1, label=qid)
    ax.set(title="Reliability (10 bins)", xlabel="mean p_yes", ylabel="observed yes rate", xlim=(0, 1),
           ylim=(0, 1))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=80)
    plt.close(fig)
    return ["pr_curves.png", "reliability.png"]


def read_eval_data(args: argparse.Namespace, embedder: Embedder) -> tuple[LabelledSet, list[str]]:
    """(labelled set of the split, source names) from the files or, with --from-store, the store."""
    if not args.from_store:
        check_data_arguments(args)
        data = read_labelled(args.conversations, args.questions, args.answers, args.split, args.limit)
        return data, source_names(args.conversations)
    from agents.learn.stored import load_labelled, open_settings_pool

    if not hasattr(args, "settings"):
        raise ValueError("--from-store reads the database from the flexor settings: run `flexor eval --from-store`")
    settings = args.settings()
    questions = read_questions_file(args.questions or settings.questions_file)[0]

    async def go() -> LabelledSet:
        pool = await open_settings_pool(settings)
        try:
            return await load_labelled(pool, questions, embedder.model_id, args.split, holdout=args.holdout,
                                       tenant_id=args.tenant)
        finally:
            await pool.close()

    return asyncio.run(go()), ["store"]


def evaluate(
    data: LabelledSet,
    embedder: Embedder,
    heads: str | Path | None,
    *,
    batch: int = BATCH,
    progress: bool = False,
) -> tuple[list[list[Answer]], dict[str, str], str, float]:
    """The pipeline's answers for every conversation of `data` (answers, question id -> head id,
    heads version, seconds in the pipeline). Stored vectors (`data.embedded`) are used as they
    are: nothing is embedded again."""
    from agents.learn.stored import StoredVectors

    if data.embedded is not None:
        embedder = StoredVectors(embedder, data.embedded)
    pipeline, heads_by_question, heads_version = build_pipeline(embedder, heads)
    qset = QuestionSet(questions=[q.model_copy(update={"head": heads_by_question.get(q.id)})
                                  for q in data.questions.questions])
    # The classifier sees the conversations only; gold answers are compared after it has answered.
    answers, seconds = asyncio.run(classify_all(pipeline, data.conversations, qset, batch, progress=progress))
    return answers, heads_by_question, heads_version, seconds


def run(args: argparse.Namespace) -> int:
    name = args.embedder or (args.settings().models.embedder if args.from_store else "onnx-int8")
    base = load_embedder(name)
    embedder: Embedder = base if args.no_cache or args.from_store else CachingEmbedder(base)
    data, sources = read_eval_data(args, embedder)
    for note in data.notes:
        print(note, file=sys.stderr)
    if not data.conversations:
        print("no labelled conversations in the requested split", file=sys.stderr)
        return 2
    answers, heads_by_question, heads_version, seconds = evaluate(
        data, embedder, args.heads, batch=args.batch, progress=not args.no_progress and sys.stderr.isatty()
    )
    for q in data.questions.questions:
        if args.heads and q.id not in heads_by_question:
            print(f"{q.id}: no head in {args.heads}: zero-shot path", file=sys.stderr)
    if isinstance(embedder, CachingEmbedder):
        embedder.flush()
        cache: Any = {"hits": embedder.hits, "misses": embedder.misses}
    else:
        cache = "stored vectors" if data.embedded is not None else "off"
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    report, arrays = build_report(
        data.questions.questions,
        [c.conversation_id for c in data.conversations],
        answers,
        data.gold,
        heads_by_question=heads_by_question,
        seconds=seconds,
        groups=data.groups,
        extra={
            "split": args.split,
            "format": "store" if args.from_store else data.format,
            "labelled_pairs": len(data.gold),
            "heads": str(args.heads) if args.heads else None,
            "heads_version": heads_version,
            "embedder": embedder.model_id,
            "embedding_cache": cache,
            "sources": sources,
            "notes": data.notes,
        },
    )
    report["plots"] = write_plots(arrays, out)
    write_answers(out / "answers.jsonl", data.conversations, answers)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out / "report.md")
    print((out / "report.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="flexor eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
