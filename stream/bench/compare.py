"""`flexor bench --compare`: the seed baseline vs the cascade, same engine, same conversations.

    flexor bench --compare --conversations star.jsonl.gz sgd.jsonl.gz --questions questions.json \
        --answers answers.jsonl.gz [--heads DIR] --engine hf:smollm2-135m --limit 200 --report DIR

- Conversations: the evaluation split of each labelled file, ``limit`` in total, shared evenly
  between the files (STAR and SGD half each when both are given).
- Questions: the labelled questions; a question is asked of a conversation exactly when the
  evaluator would score it (its dataset, ``scope`` and ``exclude``), in both modes.
- Baseline (``agents.learn.baseline``): one conversation at a time, per question an evidence-finding
  ``generate`` (64 tokens) and a validation ``score``, both over the whole transcript.
- Cascade: the service's pipeline (chunk, embed, in-memory evidence store ranked as pgvector
  ranks, stage 1 from trained heads or the zero-shot scorer, the uncertain band to the
  ``LLMCascadeStage``) over batches of conversations. A conversation's latency is its batch's.
- One engine instance serves both; calls and prompt tokens are ``engine.stats`` deltas.
  Model loading and one warm-up pass are outside every timing.

Writes DIR/bench.json, DIR/bench.md and DIR/bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.learn.baseline import SeedBaseline
from agents.learn.labelled import (
    LabelledConversation,
    LabelledQuestion,
    Split,
    question_set,
    read_answers,
    read_conversations,
    read_questions,
    shared_data_dir,
    source_names,
    to_conversation,
)
from agents.learn.metrics import precision_recall_f1
from agents.llm_stage import LLMCascadeStage
from agents.questions import Question
from agents.types import Answer, Conversation
from models.llm.engine import StatsSnapshot, YesNoEngine
from stream.bench import engine_options

log = logging.getLogger(__name__)

BATCH = 32  # conversations per pipeline call (the service's batches are up to 64 events)
GOALS = {"prompt_tokens": 30.0, "throughput": 10.0}
ASK = "asks."  # metadata key prefix marking the questions asked of a conversation


# -- inputs ----------------------------------------------------------------------------------------


def load_inputs(
    paths: Sequence[str | Path], limit: int
) -> list[LabelledConversation]:
    """Evaluation-split conversations, ``limit`` in total, shared evenly between the files."""
    per_file = [limit // len(paths) + (1 if i < limit % len(paths) else 0) for i in range(len(paths))]
    out: list[LabelledConversation] = []
    for path, n in zip(paths, per_file, strict=True):
        if n:
            out.extend(read_conversations([path], Split.EVAL, limit=n))
    return out


def asked_questions(
    questions: Sequence[LabelledQuestion], heads: dict[str, str] | None = None
) -> list[Question]:
    """The questions as the pipeline reads them, each applying only where it is asked."""
    base = question_set(questions, heads).questions
    return [q.model_copy(update={"applies_to": {**q.applies_to, ASK + q.id: "yes"}}) for q in base]


def conversation_for(conv: LabelledConversation, questions: Sequence[LabelledQuestion]) -> Conversation:
    """The classifier's view (turns + dataset) plus which questions are asked of it.

    The markers say only *whether* a question applies (scope/exclude), never its answer."""
    c = to_conversation(conv)
    marks = {ASK + q.question_id: "yes" for q in questions if q.asked(conv)}
    return Conversation(c.tenant_id, c.conversation_id, c.revision, c.turns, {**c.metadata, **marks})


# -- measurement -----------------------------------------------------------------------------------


def _progress(label: str, total: int, enabled: bool):  # type: ignore[no-untyped-def]
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(f"{label:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )
    return bar, total


def run_baseline(
    engine: YesNoEngine, convs: Sequence[Conversation], questions: Sequence[Question], progress: bool = False
) -> tuple[list[list[Answer]], list[float], float]:
    """Answers, per-conversation latency (s) and wall time, one conversation at a time."""
    baseline = SeedBaseline(engine)
    answers, latency = [], []
    bar, total = _progress("baseline", len(convs), progress)
    with bar:
        task = bar.add_task("baseline", total=total)
        start = time.perf_counter()
        for c in convs:
            t = time.perf_counter()
            answers.append(baseline.classify(c, questions))
            latency.append(time.perf_counter() - t)
            bar.advance(task)
            if not progress:
                log.info("baseline: %d/%d conversations, last %.1f s", len(answers), len(convs), latency[-1])
        wall = time.perf_counter() - start
    return answers, latency, wall


async def run_cascade(
    pipeline: Any, convs: Sequence[Conversation], questions: Sequence[Question], batch: int, progress: bool = False
) -> tuple[list[list[Answer]], list[float], float]:
    """Answers, per-conversation latency (its batch's wall time) and total wall time."""
    from agents.questions import QuestionSet

    qset = QuestionSet(questions=list(questions))
    answers: list[list[Answer]] = []
    latency: list[float] = []
    bar, total = _progress("cascade", len(convs), progress)
    with bar:
        task = bar.add_task("cascade", total=total)
        start = time.perf_counter()
        for i in range(0, len(convs), batch):
            part = convs[i : i + batch]
            t = time.perf_counter()
            result = await pipeline.classify(part, qset)
            spent = time.perf_counter() - t
            answers.extend(result.answers)
            latency.extend([spent] * len(part))
            bar.advance(task, len(part))
        wall = time.perf_counter() - start
    return answers, latency, wall


def macro_f1(
    questions: Sequence[LabelledQuestion],
    conv_ids: Sequence[str],
    answers: Sequence[Sequence[Answer]],
    gold: dict[tuple[str, str], bool],
) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """Mean F1 over the questions with at least one gold *yes* among these conversations.

    Every question is reported per question, but one without a positive has no defined F1
    (precision and recall are 0/0) and would drag the mean to zero for both modes alike.
    """
    by_key = {(a.question_id, cid): a for cid, row in zip(conv_ids, answers, strict=True) for a in row}
    per_q: dict[str, dict[str, Any]] = {}
    for q in questions:
        rows = [(gold[(q.question_id, cid)], by_key.get((q.question_id, cid))) for cid in conv_ids
                if (q.question_id, cid) in gold]
        rows = [(y, a) for y, a in rows if a is not None]
        if not rows:
            continue
        y = np.array([r[0] for r in rows], bool)
        pred = np.array([r[1].answer == "yes" for r in rows], bool)
        p, r, f = precision_recall_f1(y, pred)
        per_q[q.question_id] = {"n": len(rows), "n_yes": int(y.sum()), "n_pred_yes": int(pred.sum()),
                                "precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}
    f1s = [e["f1"] for e in per_q.values() if e["n_yes"]]
    return (float(np.mean(f1s)) if f1s else None), per_q


def _mode_summary(
    n: int,
    wall: float,
    latency: Sequence[float],
    spent: StatsSnapshot,
    f1: float | None,
    answers: Sequence[Sequence[Answer]],
) -> dict[str, Any]:
    lat = np.asarray(latency, np.float64) * 1000.0
    decided = Counter(a.decided_by for row in answers for a in row)
    total = sum(decided.values())
    return {
        "conversations": n,
        "seconds": round(wall, 3),
        "conversations_per_s": round(n / wall, 4) if wall > 0 else None,
        "llm_calls_per_conversation": round(spent.prompts / n, 4),
        "llm_engine_batches_per_conversation": round(spent.calls / n, 4),
        "llm_prompt_tokens_per_conversation": round(spent.prompt_tokens / n, 2),
        "llm_generated_tokens_per_conversation": round(spent.generated_tokens / n, 2),
        "answers_per_conversation": round(total / n, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 2) if len(lat) else None,
        "macro_f1": round(f1, 4) if f1 is not None else None,
        "decided_by": {k: round(v / total, 4) for k, v in sorted(decided.items())} if total else {},
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "processor": platform.processor() or None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


# -- reports ---------------------------------------------------------------------------------------


def write_markdown(result: dict[str, Any], path: Path) -> None:
    b, c, r = result["baseline"], result["cascade"], result["ratios"]

    def f(v: Any, digits: int = 2) -> str:
        return "-" if v is None else (f"{v:,.{digits}f}" if isinstance(v, float) else str(v))

    rows = [
        ("conversations/s", "conversations_per_s", 3),
        ("LLM calls / conversation", "llm_calls_per_conversation", 2),
        ("LLM prompt tokens / conversation", "llm_prompt_tokens_per_conversation", 1),
        ("LLM generated tokens / conversation", "llm_generated_tokens_per_conversation", 1),
        ("latency p50 (ms)", "p50_ms", 0),
        ("latency p95 (ms)", "p95_ms", 0),
        ("macro F1", "macro_f1", 3),
    ]
    lines = [
        "# Baseline vs cascade",
        "",
        f"- engine: `{result['engine']}`, {result['n']} conversations ({', '.join(result['sources'])}), "
        f"{result['answers_per_conversation']} questions asked per conversation on average",
        f"- stage 1: {result['stage1']}; cascade batches of {result['batch']} conversations",
        f"- machine: {result['machine'].get('cpus')} CPUs, {result['machine'].get('platform')}",
        "",
        "| | baseline | cascade |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {f(b[key], d)} | {f(c[key], d)} |" for name, key, d in rows]
    lines += [
        "",
        f"- throughput ratio (cascade / baseline): **{f(r['throughput'])}x** (goal >= {GOALS['throughput']:.0f}x)",
        f"- prompt-token ratio (baseline / cascade): **{f(r['prompt_tokens'])}x** "
        f"(goal >= {GOALS['prompt_tokens']:.0f}x)",
        f"- macro F1: cascade {f(c['macro_f1'], 3)} vs baseline {f(b['macro_f1'], 3)} (goal: not lower)",
        f"- cascade decided by: {', '.join(f'{k} {v:.1%}' for k, v in c['decided_by'].items())}",
        f"- LLM stage: {result['llm_stage']}",
        "",
    ]
    path.write_text("\n".join(lines))


def write_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("conversations/s", "conversations_per_s", True),
        ("LLM prompt tokens / conversation", "llm_prompt_tokens_per_conversation", True),
        ("LLM calls / conversation", "llm_calls_per_conversation", True),
        ("latency p50 / p95 (ms)", None, True),
        ("macro F1", "macro_f1", False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    colors = {"baseline": "#9e9e9e", "cascade": "#1f77b4"}
    for ax, (title, key, log_scale) in zip(axes, panels, strict=True):
        if key is None:
            x = np.arange(2)
            for j, mode in enumerate(("baseline", "cascade")):
                vals = [result[mode]["p50_ms"] or 0, result[mode]["p95_ms"] or 0]
                ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=mode, color=colors[mode])
            ax.set_xticks(x, ["p50", "p95"])
            ax.legend(fontsize=8)
        else:
            vals = [result[m][key] or 0 for m in ("baseline", "cascade")]
            bars = ax.bar(["baseline", "cascade"], vals, color=[colors["baseline"], colors["cascade"]])
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=8)
        if log_scale:
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(title, fontsize=10)
    r = result["ratios"]
    fig.suptitle(
        f"{result['engine']}, {result['n']} conversations: throughput x{r['throughput']}, "
        f"prompt tokens /{r['prompt_tokens']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the command -----------------------------------------------------------------------------------


def _default(path: Path | str | None, name: str) -> Path:
    return Path(path) if path is not None else shared_data_dir() / name


def compare(
    *,
    conversations: Sequence[Path],
    questions_path: Path,
    answers_path: Path | None,
    heads: Path | None,
    engine_spec: str,
    limit: int,
    report: Path,
    batch: int = BATCH,
    embedder_backend: str = "onnx-int8",
    engine: YesNoEngine | None = None,
    engine_options: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    from agents.learn.evaluate import build_pipeline
    from models.embedder import load_embedder
    from models.llm.specs import load_engine

    progress = sys.stderr.isatty() if progress is None else progress
    labelled_questions = read_questions(questions_path)
    labelled = load_inputs(conversations, limit)
    if not labelled:
        raise ValueError("no evaluation-split conversations in the given files")
    convs = [conversation_for(c, labelled_questions) for c in labelled]

    engine = engine or load_engine(engine_spec, **(engine_options or {}))
    embedder = load_embedder(embedder_backend)
    pipeline, heads_by_question, heads_version = build_pipeline(embedder, heads)
    questions = asked_questions(labelled_questions, heads_by_question)
    stage = LLMCascadeStage(engine)
    fallbacks = [0]
    stage.on_fallback = lambda n: fallbacks.__setitem__(0, fallbacks[0] + n)
    cache_counts: Counter[str] = Counter()
    stage.on_cache = lambda result, n: cache_counts.update({result: n})

    async def cascade_run() -> tuple[list[list[Answer]], list[float], float, StatsSnapshot]:
        # Warm-up outside the timing: embedder, query vectors, prototypes / head features, and
        # one engine call. The LLM stage is off here, so no result is cached ahead of the run.
        from agents.questions import QuestionSet

        await pipeline.classify(convs[:1], QuestionSet(questions=questions))
        await asyncio.to_thread(engine.score, ["warm up: answer yes or no"])
        pipeline.cascade.llm = stage
        before = engine.stats.snapshot()
        try:
            answers, latency, wall = await run_cascade(pipeline, convs, questions, batch, progress)
        finally:
            await stage.aclose()
        return answers, latency, wall, engine.stats.snapshot() - before

    c_answers, c_latency, c_wall, c_spent = asyncio.run(cascade_run())

    engine.generate(["warm up: say none"], 4)
    before = engine.stats.snapshot()
    b_answers, b_latency, b_wall = run_baseline(engine, convs, questions, progress)
    b_spent = engine.stats.snapshot() - before

    conv_ids = [c.conversation_id for c in labelled]
    gold = read_answers(answers_path, set(conv_ids)) if answers_path is not None else {}
    b_f1, b_per_q = macro_f1(labelled_questions, conv_ids, b_answers, gold)
    c_f1, c_per_q = macro_f1(labelled_questions, conv_ids, c_answers, gold)
    n = len(convs)
    base = _mode_summary(n, b_wall, b_latency, b_spent, b_f1, b_answers)
    casc = _mode_summary(n, c_wall, c_latency, c_spent, c_f1, c_answers)
    base["per_question"], casc["per_question"] = b_per_q, c_per_q
    ratios = {
        "throughput": _ratio(casc["conversations_per_s"], base["conversations_per_s"]),
        "prompt_tokens": _ratio(base["llm_prompt_tokens_per_conversation"],
                                casc["llm_prompt_tokens_per_conversation"]),
        "llm_calls": _ratio(base["llm_calls_per_conversation"], casc["llm_calls_per_conversation"]),
    }
    f1_ok = None if b_f1 is None or c_f1 is None else c_f1 >= b_f1
    result: dict[str, Any] = {
        "mode": "compare",
        "engine": engine_spec,
        "model_id": engine.model_id,
        "n": n,
        "sources": source_names(conversations),
        "per_source": dict(Counter(c.dataset for c in labelled)),
        "split": "eval",
        "answers_per_conversation": base["answers_per_conversation"],
        "stage1": f"heads ({heads_version})" if heads_by_question else "zero-shot similarity",
        "heads": Path(heads).name if heads else None,
        "batch": batch,
        "embedder": embedder.model_id,
        "baseline": base,
        "cascade": casc,
        "ratios": ratios,
        "goals": {
            "prompt_tokens_ratio_min": GOALS["prompt_tokens"],
            "throughput_ratio_min": GOALS["throughput"],
            "prompt_tokens_met": None if ratios["prompt_tokens"] is None else ratios["prompt_tokens"] >= 30,
            "throughput_met": None if ratios["throughput"] is None else ratios["throughput"] >= 10,
            "macro_f1_not_lower": f1_ok,
        },
        "llm_stage": {
            "routed": sum(1 for row in c_answers for a in row if a.decided_by in ("llm", "cache")),
            "cache": dict(cache_counts),
            "fallbacks": fallbacks[0],
            "scheduler_batches": stage.scheduler.stats.batches,
        },
        "machine": machine(),
    }
    if ratios["prompt_tokens"] is None and casc["llm_prompt_tokens_per_conversation"] == 0:
        result["notes"] = ["the cascade sent nothing to the LLM: the prompt-token ratio is unbounded (null)"]
    report.mkdir(parents=True, exist_ok=True)
    (report / "bench.json").write_text(json.dumps(_finite(result), indent=2) + "\n")
    write_markdown(result, report / "bench.md")
    write_chart(result, report / "bench.png")
    return result


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def run_compare(args: argparse.Namespace) -> int:
    """Entry point from ``flexor bench --compare`` (stream.bench parses the arguments)."""
    if not sys.stderr.isatty():
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        result = compare(
            conversations=[Path(p) for p in args.conversations],
            questions_path=_default(args.questions, "questions.json"),
            answers_path=_default(args.answers, "answers.jsonl.gz"),
            heads=args.heads,
            engine_spec=args.engine,
            engine_options=engine_options(args),
            limit=args.limit,
            report=Path(args.report),
            batch=getattr(args, "batch", None) or BATCH,
        )
    except (ValueError, KeyError, FileNotFoundError) as e:
        # Typically conversations that are not in the labelled-data format (star/sgd ids, labels).
        print(f"flexor bench --compare: {e} (--conversations takes labelled star/sgd files, "
              f"--questions questions.json, --answers answers.jsonl.gz)", file=sys.stderr)
        return 2
    b, c, r = result["baseline"], result["cascade"], result["ratios"]
    print(
        f"baseline {b['conversations_per_s']} conv/s, {b['llm_prompt_tokens_per_conversation']} prompt tokens/conv, "
        f"F1 {b['macro_f1']} | cascade {c['conversations_per_s']} conv/s, "
        f"{c['llm_prompt_tokens_per_conversation']} prompt tokens/conv, F1 {c['macro_f1']} | "
        f"throughput x{r['throughput']}, prompt tokens /{r['prompt_tokens']} -> {Path(args.report) / 'bench.json'}"
    )
    return 0


# -- LLM stage enabled, routing nothing ------------------------------------------------------------


def no_route_overhead(
    conversations: Sequence[Path],
    questions_path: Path,
    engine_spec: str = "hf-tiny",
    limit: int = 200,
    rounds: int = 3,
    batch: int = BATCH,
) -> dict[str, Any]:
    """Pipeline conversations/s with no LLM stage vs an LLM stage whose band is empty ([0, 0] on
    every question, zero-shot stage 1), interleaved over ``rounds`` so machine noise hits both."""
    from agents.learn.evaluate import build_pipeline
    from agents.questions import QuestionSet
    from models.embedder import load_embedder
    from models.llm.specs import load_engine

    lq = read_questions(questions_path)
    convs = [conversation_for(c, lq) for c in load_inputs(conversations, limit)]
    pipeline, _, _ = build_pipeline(load_embedder("onnx-int8"), None)
    plain = QuestionSet(questions=asked_questions(lq))
    empty = QuestionSet(questions=[q.model_copy(update={"band": (0.0, 0.0)}) for q in plain.questions])
    stage = LLMCascadeStage(load_engine(engine_spec))
    rates: dict[str, list[float]] = {"llm_off": [], "llm_on_band_empty": []}

    async def go() -> None:
        await pipeline.classify(convs[:1], plain)  # warm-up
        for _ in range(rounds):
            for name, llm, qs in (("llm_off", None, plain), ("llm_on_band_empty", stage, empty)):
                pipeline.cascade.llm = llm
                t = time.perf_counter()
                for i in range(0, len(convs), batch):
                    await pipeline.classify(convs[i : i + batch], qs)
                rates[name].append(len(convs) / (time.perf_counter() - t))
        await stage.aclose()

    before = stage.engine.stats.snapshot()
    asyncio.run(go())
    spent = stage.engine.stats.snapshot() - before
    out: dict[str, Any] = {"n": len(convs), "rounds": rounds, "engine_calls_with_empty_band": spent.calls}
    for name, r in rates.items():
        out[name] = {"conversations_per_s_median": round(float(np.median(r)), 2), "runs": [round(x, 2) for x in r]}
    out["ratio_on_vs_off"] = round(
        out["llm_on_band_empty"]["conversations_per_s_median"] / out["llm_off"]["conversations_per_s_median"], 3
    )
    return out
