"""`flexor bench`: benchmarks whose goals are ratios measured side by side in one run.

--e2e      the service on the embedded broker + Postgres vs chunking + embedding alone, on the
           same conversations; then latency at a produce rate of half the measured throughput.
--compare  the seed baseline (whole conversation, two LLM calls per question) vs the cascade,
           on the same engine and conversations (stream.bench.compare).
--load     fixed-rate load for a duration: throughput, latency, lag and RSS over time
           (stream.bench.load).
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

from stream.config import Settings, load_settings

EXAMPLES = Path(str(importlib.resources.files("examples")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--e2e", action="store_true", help="service throughput vs embed-only, and latency")
    mode.add_argument("--compare", action="store_true", help="seed baseline vs cascade on one LLM engine")
    mode.add_argument("--load", action="store_true", help="fixed-rate load test with lag and memory over time")
    mode.add_argument("--backfill", action="store_true",
                      help="backfill vs streaming conv/s, live latency during a backfill, corpus search recall")
    p.add_argument("--conversations", type=Path, nargs="+", default=[EXAMPLES / "conversations.jsonl"],
                   help="JSONL(.gz) conversations (conversation.v1 or the labelled-data format)")
    p.add_argument("--questions", type=Path, default=None, help="questions file (default: examples/questions.yaml)")
    p.add_argument("--answers", type=Path, default=None,
                   help="gold answers (--compare: for macro-F1; --backfill: F1 of the backfilled question)")
    p.add_argument("--heads", type=Path, default=None, help="trained heads directory")
    p.add_argument("--engine", default="hf-tiny", help="LLM engine spec for --compare")
    p.add_argument("--limit", type=int, default=500,
                   help="conversations to use (--backfill: per file, streamed and backfilled; search uses all)")
    p.add_argument("--rate", type=float, default=None, help="--load: events per second")
    p.add_argument("--duration", type=float, default=600.0, help="--load: seconds of load")
    p.add_argument("--load-factor", type=float, default=0.8,
                   help="--load without --rate: rate as a fraction of the measured capacity (1.5 = overload)")
    p.add_argument("--drain", type=float, default=60.0,
                   help="--load: seconds after the load with nothing produced, to check nothing is lost")
    p.add_argument("--report", type=Path, required=True, help="directory for bench.json (and .md / .png)")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def write_json(report: Path, data: dict[str, Any]) -> Path:
    report.mkdir(parents=True, exist_ok=True)
    path = report / "bench.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.compare:
        from stream.bench.compare import run_compare

        return run_compare(args)
    if args.load:
        from stream.bench.load import run_load

        return run_load(args)
    if args.backfill:
        from stream.bench.backfill import run_backfill_bench

        return run_backfill_bench(args)
    from stream.bench.e2e import run_e2e

    return run_e2e(args)


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
            "group_id": f"{name}-{suffix}",
            "questions_file": questions or EXAMPLES / "questions.yaml",
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            **extra,
        },
    )
