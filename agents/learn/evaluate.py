"""`flexor eval`: run the service's pipeline on labelled conversations and write a report.

    flexor eval --conversations star.jsonl.gz sgd.jsonl.gz --questions questions.json \
        --answers answers.jsonl.gz --split eval [--heads DIR] --report DIR

The same code as the service answers every conversation: chunking, embedding, evidence
retrieval (the in-memory store, ranked as pgvector ranks) and the cascade (heads where
DIR has one, else the zero-shot scorer). Only then are gold answers read and compared.
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
from agents.evidence import MemoryEvidenceStore
from agents.learn.embedcache import CachingEmbedder
from agents.learn.labelled import (
    LabelledQuestion,
    add_data_arguments,
    question_set,
    read_answers,
    read_conversations,
    read_questions,
    source_names,
    to_conversation,
)
from agents.learn.metrics import pr_curve, reliability, summarize
from agents.pipeline import Pipeline
from agents.questions import QuestionSet
from agents.similarity import SimilarityScorer
from agents.types import Answer, Conversation
from models.embedder import Embedder, load_embedder

log = logging.getLogger(__name__)

BATCH = 256
# decided_by -> report path; "*-fallback" answers count for the stage-1 path that gave them.
PATHS = {"head": "head", "few-shot": "few-shot", "similarity": "zero-shot", "llm": "llm", "cache": "cache"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, split="eval")
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
    return Pipeline(embedder, MemoryEvidenceStore(), cascade), by_question, version


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
    questions: Sequence[LabelledQuestion],
    conv_ids: Sequence[str],
    answers: Sequence[Sequence[Answer]],
    gold: dict[tuple[str, str], bool],
    *,
    heads_by_question: dict[str, str],
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """report.json content, and per question (gold, p_yes) arrays for the plots."""
    by_key: dict[tuple[str, str], Answer] = {}
    stages: Counter[str] = Counter()
    for cid, row in zip(conv_ids, answers, strict=True):
        for a in row:
            by_key[(a.question_id, cid)] = a
            stages[a.decided_by] += 1
    per_q: dict[str, Any] = {}
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for q in questions:
        rows = [(gold[(q.question_id, cid)], by_key.get((q.question_id, cid))) for cid in conv_ids
                if (q.question_id, cid) in gold]
        missing = sum(a is None for _, a in rows)
        if missing:
            log.warning("%s: %d gold rows got no answer (question did not apply)", q.question_id, missing)
        rows = [(y, a) for y, a in rows if a is not None]
        y = np.array([r[0] for r in rows], bool)
        p = np.array([r[1].p_yes for r in rows], np.float64)
        pred = np.array([r[1].answer == "yes" for r in rows], bool)
        paths = Counter(_path_of(r[1].decided_by) for r in rows)
        entry: dict[str, Any] = {
            "path": paths.most_common(1)[0][0] if paths else ("head" if q.question_id in heads_by_question
                                                              else "zero-shot"),
            "paths": dict(paths),
            "dataset": q.dataset,
            "question": q.text,
        }
        entry.update(summarize(y, p, pred))
        per_q[q.question_id] = _clean(entry)
        arrays[q.question_id] = (y, p)
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


def write_answers(path: Path, conv_ids: Sequence[str], answers: Sequence[Sequence[Answer]]) -> None:
    """Every answer the pipeline gave (no gold): what the service would have published."""
    with open(path, "w") as f:
        for cid, row in zip(conv_ids, answers, strict=True):
            for a in row:
                f.write(json.dumps({"conversation_id": cid, **a.as_dict()}) + "\n")


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


def run(args: argparse.Namespace) -> int:
    questions = read_questions(args.questions)
    labelled = read_conversations(args.conversations, args.split, limit=args.limit)
    if not labelled:
        print("no conversations in the requested split", file=sys.stderr)
        return 2
    base = load_embedder(args.embedder)
    embedder: Embedder = base if args.no_cache else CachingEmbedder(base)
    pipeline, heads_by_question, heads_version = build_pipeline(embedder, args.heads)
    qset = question_set(questions, heads_by_question)
    for q in questions:
        if args.heads and q.question_id not in heads_by_question:
            print(f"{q.question_id}: no head in {args.heads}: zero-shot path", file=sys.stderr)
    convs = [to_conversation(c) for c in labelled]
    # The classifier sees `convs` only; gold answers are read after it has answered.
    answers, seconds = asyncio.run(
        classify_all(pipeline, convs, qset, args.batch, progress=not args.no_progress and sys.stderr.isatty())
    )
    if isinstance(embedder, CachingEmbedder):
        embedder.flush()
        cache = {"hits": embedder.hits, "misses": embedder.misses}
    else:
        cache = "off"
    gold = read_answers(args.answers, {c.conversation_id for c in labelled})
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    report, arrays = build_report(
        questions,
        [c.conversation_id for c in labelled],
        answers,
        gold,
        heads_by_question=heads_by_question,
        seconds=seconds,
        extra={
            "split": args.split,
            "heads": str(args.heads) if args.heads else None,
            "heads_version": heads_version,
            "embedder": embedder.model_id,
            "embedding_cache": cache,
            "sources": source_names(args.conversations),
        },
    )
    report["plots"] = write_plots(arrays, out)
    write_answers(out / "answers.jsonl", [c.conversation_id for c in labelled], answers)
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
