"""`flexor bench`: benchmarks whose goals are ratios measured side by side in one run.

--e2e      the service on the embedded broker + Postgres vs chunking + embedding alone, on the
           same conversations; latency at a produce rate of half the measured throughput; the
           same replay with embedding reuse off; with --revisions, growing chats reuse on vs off
           (stream.bench.e2e). With --monitoring: the same service with and without audit
           sampling and shadow heads, side by side (stream.bench.monitoring).
--compare  the seed baseline (whole conversation, two LLM calls per question) vs the cascade,
           on the same engine and conversations (stream.bench.compare).
--load     fixed-rate load for a duration: throughput, latency, lag and RSS over time
           (stream.bench.load).
--llm-throughput  one LLM engine's prompts/s and tokens/s per batch size, on the device and
           dtype given (stream.bench.llm_throughput).
--learn    the labelling loop: labels in rounds chosen by uncertainty vs at random, heads trained
           from the store each round, against heads on every label (stream.bench.learn).
--backfill backfill of a question added after streaming vs the streaming path, live latency
           during a backfill, and corpus search recall and latency (stream.bench.backfill).
Results are JSON in --report DIR (bench.json), plus Markdown and PNG where the mode has them.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import uuid
from pathlib import Path
from typing import Any

import yaml

from stream.config import Settings, load_settings

EXAMPLES = Path(str(importlib.resources.files("examples")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--e2e", action="store_true", help="service throughput vs embed-only, and latency")
    mode.add_argument("--compare", action="store_true", help="seed baseline vs cascade on one LLM engine")
    mode.add_argument("--load", action="store_true", help="fixed-rate load test with lag and memory over time")
    mode.add_argument("--llm-throughput", action="store_true",
                      help="an LLM engine's prompts/s and tokens/s per batch size (--engine, --batch-sizes)")
    mode.add_argument("--learn", action="store_true",
                      help="labelling loop: uncertainty vs random label rounds, trained from the store each round")
    mode.add_argument("--backfill", action="store_true",
                      help="backfill vs streaming conv/s, live latency during a backfill, corpus search recall")
    p.add_argument("--conversations", type=Path, nargs="+", default=[EXAMPLES / "conversations.jsonl"],
                   help="JSONL(.gz) conversations (conversation.v1 or the labelled-data format)")
    p.add_argument("--questions", type=Path, default=None, help="questions file (default: examples/questions.yaml)")
    p.add_argument("--answers", type=Path, default=None,
                   help="gold answers (--compare: for macro-F1; --learn: the teacher and the measure; "
                        "--backfill: F1 of the backfilled question)")
    p.add_argument("--heads", type=Path, default=None,
                   help="trained heads directory (its questions.yaml is the default --questions)")
    p.add_argument("--llm", default=None, help="--e2e/--load: LLM stage engine spec (e.g. openai:http://127.0.0.1:8899)")
    p.add_argument("--revisions", action="store_true",
                   help="--e2e: also stream each conversation as a growing chat (open revisions, then closed)")
    p.add_argument("--realtime", default=None,
                   help="--e2e: question ids (comma-separated, or 'all') answered on open revisions too")
    p.add_argument("--engine", default="hf-tiny",
                   help="LLM engine spec for --compare, --llm-throughput and --e2e --monitoring")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N for the torch embedder and hf engines")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the torch embedder and hf engines")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                   help="--llm-throughput: engine batch sizes")
    p.add_argument("--prompts", type=int, default=256, help="--llm-throughput: prompts per batch size")
    p.add_argument("--monitoring", action="store_true",
                   help="--e2e: measure the cost of audit sampling and shadow heads against the same run without")
    p.add_argument("--audit-rate", type=float, default=0.01, help="--monitoring: audit rate of the audited variants")
    p.add_argument("--shadow-heads", type=Path, default=None, help="--monitoring: candidate heads directory")
    p.add_argument("--limit", type=int, default=None,
                   help="conversations to use (default 500; --backfill: per file, streamed and backfilled, "
                        "search uses all; --learn: per file, default all)")
    p.add_argument("--rate", type=float, default=None, help="--load: events per second")
    p.add_argument("--duration", type=float, default=600.0, help="--load: seconds of load")
    p.add_argument("--load-factor", type=float, default=0.8,
                   help="--load without --rate: rate as a fraction of the measured capacity (1.5 = overload)")
    p.add_argument("--drain", type=float, default=60.0,
                   help="--load: seconds after the load with nothing produced, to check nothing is lost")
    p.add_argument("--rounds", default=None,
                   help="--monitoring: rounds of the four variants (default 2); --learn: labels per question "
                        "after each round, comma-separated (default 20,40,70,100,150,200)")
    p.add_argument("--teacher", default=None, help="--learn: gold:FILE or an LLM engine spec (default: gold:ANSWERS)")
    p.add_argument("--strategies", default="uncertainty,random", help="--learn: uncertainty and/or random")
    p.add_argument("--only", nargs="+", default=None, help="--learn: only these question ids")
    p.add_argument("--seed", type=int, default=13, help="--learn: seed of the random picks and k-means")
    p.add_argument("--report", type=Path, required=True, help="directory for bench.json (and .md / .png)")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def write_json(report: Path, data: dict[str, Any]) -> Path:
    report.mkdir(parents=True, exist_ok=True)
    path = report / "bench.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.learn:
        from stream.bench.learn import run_learn

        return run_learn(args)
    if args.limit is None:
        args.limit = 500
    if args.monitoring and not args.e2e:
        raise ValueError("--monitoring goes with --e2e")
    try:
        args.rounds = 2 if args.rounds is None else int(args.rounds)
    except ValueError:
        raise ValueError(f"--rounds takes a number of rounds here, not {args.rounds!r}") from None
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    if args.compare:
        from stream.bench.compare import run_compare

        return run_compare(args)
    if args.load:
        from stream.bench.load import run_load

        return run_load(args)
    if args.backfill:
        from stream.bench.backfill import run_backfill_bench

        return run_backfill_bench(args)
    if args.llm_throughput:
        from stream.bench.llm_throughput import run_llm_throughput

        return run_llm_throughput(args)
    if args.monitoring:
        from stream.bench.monitoring import run_monitoring

        return run_monitoring(args)
    from stream.bench.e2e import run_e2e

    return run_e2e(args)


def questions_path(args: argparse.Namespace) -> Path:
    """--questions, else the heads directory's questions.yaml, else the examples'."""
    if args.questions is not None:
        return Path(args.questions)
    if args.heads is not None and (Path(args.heads) / "questions.yaml").exists():
        return Path(args.heads) / "questions.yaml"
    return EXAMPLES / "questions.yaml"


def model_overrides(args: argparse.Namespace, report: Path) -> tuple[dict[str, Any], Path]:
    """(settings overrides for --heads / --llm, the questions file to run). With --realtime the
    named questions are answered on open revisions too: a copy of the file says so in `report`."""
    from agents.questions import load_questions

    overrides: dict[str, Any] = {}
    if args.heads is not None:
        overrides["models.heads_dir"] = Path(args.heads).resolve()
    if args.llm:
        overrides["models.llm"] = args.llm
    if args.device:
        overrides["models.device"] = args.device
    if args.dtype:
        overrides["models.dtype"] = args.dtype
    path = questions_path(args)
    if args.realtime:
        qs = load_questions(path).questions
        wanted = {q.id for q in qs} if args.realtime == "all" else set(args.realtime.split(","))
        unknown = wanted - {q.id for q in qs}
        if unknown:
            raise ValueError(f"--realtime names {', '.join(sorted(unknown))}, not in {path.name}")
        data = {"questions": [
            q.model_dump(mode="json") | ({"on": ["open", "closed"]} if q.id in wanted else {}) for q in qs
        ]}
        report.mkdir(parents=True, exist_ok=True)
        path = report / "questions.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return overrides, path


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """--device / --dtype as options of a transformers (hf*) engine; other engines take none."""
    if not args.engine.startswith("hf"):
        return {}
    return {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v}


def models_described(args: argparse.Namespace) -> dict[str, Any]:
    """settings.heads / settings.llm of a result: what ran, without machine paths."""
    return {"heads": Path(args.heads).name if args.heads else "none", "llm": args.llm or "none"}


async def fresh_database(url: str, name: str, template: str | None = None) -> str:
    """A new database on the server at `url` (a copy of `template` if given), for one benchmark
    run; its URL."""
    import asyncpg

    db = f"{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE DATABASE "{db}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await conn.close()
    return url.rsplit("/", 1)[0] + "/" + db


def embedded_settings(stack: Any, name: str, questions: Path | None, **extra: Any) -> Settings:
    """Settings for a benchmark on an EmbeddedStack: fresh topics and group, a short session
    timeout (Tansu admits a member after about half of it), metrics on a free loopback port."""
    suffix = uuid.uuid4().hex[:8]
    return load_settings(
        None,
        **{
            "kafka.bootstrap_servers": stack.broker.bootstrap_servers,
            "kafka.session_timeout_ms": 3000,
            "kafka.heartbeat_interval_ms": 300,
            "database_url": stack.postgres.url,
            "topics.input": f"{name}-in-{suffix}",
            "topics.output": f"{name}-out-{suffix}",
            "topics.dlq": f"{name}-dlq-{suffix}",
            "topics.backfill": f"{name}-backfill-{suffix}",
            "topics.feedback": f"{name}-feedback-{suffix}",
            "group_id": f"{name}-{suffix}",
            "questions_file": questions or EXAMPLES / "questions.yaml",
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            **extra,
        },
    )
