"""`flexor up`: the whole service on one machine from `pip install` alone.

The broker (unless `--bootstrap-servers` names one to use instead) and Postgres start on loopback,
on free ports or the ones given. Once the service runs, one parseable line names the endpoints
(`flexor up: ready bootstrap_servers=... database_url=... metrics_url=...`); with `--print-env`,
stdout carries only `export` lines that another shell can `source`.

With --demo it replays the example conversations (plus two malformed events, to show the DLQ),
shows progress, and once every conversation revision is classified prints a summary table (with
precision and recall against the gold labels), runs the learning loop on them (lifecycle.py:
import half the labels, train from the store, restart with the heads, backfill, score the other
half before and after) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import logging
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agents.store import create_pool
from stream.app import Running, run_service
from stream.config import Settings, load_settings
from stream.dev.infra import EmbeddedStack
from stream.dev.lifecycle import Key, Lifecycle, gold_labels, latest_answers, macro_f1, run_lifecycle, score
from stream.dev.produce import load_conversations, produce_events
from stream.kafka import make_producer

log = logging.getLogger(__name__)
EXAMPLES = Path(str(importlib.resources.files("examples")))
BAD_EVENTS = [b"this is not json", b'{"schema": "conversation.v1", "event_id": "bad-1", "turns": []}']


def _stack(args: argparse.Namespace) -> EmbeddedStack:
    """Postgres, and the broker unless --bootstrap-servers names one."""
    return EmbeddedStack(
        broker_port=getattr(args, "broker_port", None), postgres_port=getattr(args, "postgres_port", None),
        with_broker=not getattr(args, "bootstrap_servers", None),
    )


def _embedded_settings(args: argparse.Namespace, stack: EmbeddedStack) -> Settings:
    return load_settings(
        getattr(args, "config", None),
        **{
            "kafka.bootstrap_servers": stack.broker.bootstrap_servers if stack.broker else args.bootstrap_servers,
            "database_url": stack.postgres.url,
            "questions_file": getattr(args, "questions", None) or EXAMPLES / "questions.yaml",
            "metrics_port": getattr(args, "metrics_port", None),
        },
    )


def endpoints(settings: Settings, metrics_port: int) -> dict[str, str]:
    return {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "database_url": settings.database_url.get_secret_value(),
        "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
        "input_topic": settings.topics.input,
        "output_topic": settings.topics.output,
        "dlq_topic": settings.topics.dlq,
    }


def ready_line(found: dict[str, str]) -> str:
    """One line, `key=value` pairs (values shell-quoted where needed): grep and parse it from a log."""
    return "flexor up: ready " + " ".join(f"{k}={shlex.quote(v)}" for k, v in found.items())


def env_lines(found: dict[str, str]) -> str:
    """What another shell needs for `flexor produce`, `flexor tail` or its own client."""
    return (f"export KAFKA_BOOTSTRAP_SERVERS={shlex.quote(found['bootstrap_servers'])}\n"
            f"export DATABASE_URL={shlex.quote(found['database_url'])}\n")


def run_embedded(args: argparse.Namespace) -> int:
    # The banner and logs go to stderr: stdout is for the ready line, or only the env with --print-env.
    console = Console(stderr=True)
    with _stack(args) as stack:
        settings = _embedded_settings(args, stack)
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

        def announce(r: Running) -> None:
            found = endpoints(settings, r.http_port)
            console.print(
                f"[bold]Flexor Stream is running[/bold]\n"
                f"  Kafka:    {found['bootstrap_servers']}  (topics {settings.topics.input} -> "
                f"{settings.topics.output}, DLQ {settings.topics.dlq})\n"
                f"  Postgres: {found['database_url']}\n"
                f"  Metrics:  {found['metrics_url']}\n"
                "In another shell, set these and run `flexor produce examples/conversations.jsonl`:",
                soft_wrap=True,
            )
            console.print(env_lines(found) + "Stop with Ctrl-C.", soft_wrap=True, markup=False, highlight=False)
            out = env_lines(found) if args.print_env else ready_line(found) + "\n"
            if args.print_env:
                console.print(ready_line(found), soft_wrap=True, markup=False, highlight=False)
            sys.stdout.write(out)
            sys.stdout.flush()

        asyncio.run(run_service(settings, on_running=announce, create_topics=True))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    events = load_conversations(args.conversations)
    expected = {(e["tenant_id"], e["conversation_id"], e["revision"]) for e in events}
    labels = getattr(args, "labels", None)
    if labels is None and Path(args.conversations).resolve() == (EXAMPLES / "conversations.jsonl").resolve():
        labels = EXAMPLES / "labels.jsonl"
    with console.status("starting Kafka broker and PostgreSQL..."):
        stack = _stack(args).start()
    try:
        settings = _embedded_settings(args, stack)
        logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return asyncio.run(_demo(settings, events, expected, labels, console, args.timeout))
    finally:
        stack.stop()


async def _start(settings: Settings) -> tuple[Running, asyncio.Task[None]]:
    """The service in this event loop, once it runs (a start-up error is raised)."""
    running: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    service_task = asyncio.create_task(
        run_service(settings, on_running=running.set_result, create_topics=True, install_signals=False)
    )
    done, _ = await asyncio.wait({running, service_task}, return_when=asyncio.FIRST_COMPLETED)
    if service_task in done:
        service_task.result()
    return running.result(), service_task


async def _stop(r: Running, service_task: asyncio.Task[None]) -> None:
    r.service.stop()
    await asyncio.gather(service_task, return_exceptions=True)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Running]:
    """The service while the block runs."""
    r, service_task = await _start(settings)
    try:
        yield r
    finally:
        await _stop(r, service_task)


async def _demo(
    settings: Settings, events: list[dict[str, Any]], expected: set[tuple[str, str, int]], labels: Path | None,
    console: Console, timeout_s: float,
) -> int:
    with console.status("loading models and joining the consumer group..."):
        r, service_task = await _start(settings)
    # After the start: the service has applied the migrations, vector type included.
    pool = await create_pool(settings.database_url.get_secret_value(), max_size=2)
    try:
        try:
            elapsed = await _classify(settings, r, service_task, pool, events, expected, console, timeout_s)
            dlq = _dlq_count(r)
        finally:
            await _stop(r, service_task)
        if elapsed is None:
            return 1
        rows = await pool.fetch("SELECT conversation_id, revision, answers FROM classifications")
        rows = [{**x, "answers": orjson.loads(x["answers"])} for x in rows]
        _print_summary(console, rows, gold_labels(labels) if labels else None)
        console.print(
            f"{len(expected)} conversation revisions classified in {elapsed:.1f} s; "
            f"{dlq} malformed events sent to the DLQ topic {settings.topics.dlq!r}.\n"
            f"Metrics were served on http://127.0.0.1:{r.http_port}/metrics"
        )
        if labels is not None:
            return await _lifecycle(settings, pool, labels, console, timeout_s)
        return 0
    finally:
        await pool.close()


async def _classify(
    settings: Settings, r: Running, service_task: asyncio.Task[None], pool: asyncpg.Pool, events: list[dict[str, Any]],
    expected: set[tuple[str, str, int]], console: Console, timeout_s: float,
) -> float | None:
    """Produce the events and wait until every revision is classified: seconds taken, None on timeout."""
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        await produce_events(producer, settings.topics.input, [*events, *BAD_EVENTS])
    finally:
        await producer.stop()
    started = time.monotonic()
    with Progress(
        TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("classify", total=len(expected))
        while True:
            rows = await pool.fetch("SELECT tenant_id, conversation_id, revision FROM classifications")
            got = {(x["tenant_id"], x["conversation_id"], x["revision"]) for x in rows} & expected
            progress.update(task, completed=len(got))
            if len(got) == len(expected) and _dlq_count(r) == len(BAD_EVENTS):
                return time.monotonic() - started
            if service_task.done():
                service_task.result()
                raise RuntimeError("the service stopped before classifying every conversation")
            if time.monotonic() - started > timeout_s:
                console.print(f"[red]timed out: {len(got)} of {len(expected)} classified[/red]")
                return None
            await asyncio.sleep(0.25)


async def _lifecycle(settings: Settings, pool: asyncpg.Pool, labels: Path, console: Console, timeout_s: float) -> int:
    console.print("\n[bold]The learning loop[/bold]: labels for half of the conversations, heads trained from "
                  "the store, a backfill, and the other half scored before and after")
    with tempfile.TemporaryDirectory(prefix="flexor-demo-") as workdir:
        try:
            result = await asyncio.wait_for(
                run_lifecycle(settings, pool, labels, Path(workdir), serving,
                              say=lambda line: console.print(line, markup=False, highlight=False)),
                timeout_s,
            )
        except TimeoutError:
            console.print(f"[red]the learning loop timed out after {timeout_s:.0f} s[/red]")
            return 1
    _print_before_after(console, result)
    console.print(f"learning loop: {result.seconds:.1f} s")
    return 0


def _dlq_count(r: Running) -> int:
    reg = r.metrics.registry
    return int(sum(reg.get_sample_value("flexor_dlq_events_total", {"reason": x}) or 0
                   for x in ("not_json", "empty_turns")))


def _print_summary(
    console: Console, rows: list[dict[str, Any]], gold: dict[Key, bool] | None
) -> None:
    """Yes/no counts over every revision, an evidence snippet, and (with gold labels) precision and
    recall of the latest revisions' answers on the labelled pairs."""
    counts: dict[str, Counter[str]] = {}
    best: dict[str, tuple[float, str]] = {}
    for row in rows:
        for a in row["answers"]:
            counts.setdefault(a["question_id"], Counter())[a["answer"]] += 1
            if a["answer"] == "yes" and a["evidence"] and a["p_yes"] > best.get(a["question_id"], (-1.0, ""))[0]:
                best[a["question_id"]] = (a["p_yes"], a["evidence"][0]["text"])
    scores = score(latest_answers(rows), gold, sorted(counts)) if gold is not None else {}
    table = Table(title="Answers", show_lines=True)
    table.add_column("question")
    table.add_column("yes", justify="right")
    table.add_column("no", justify="right")
    if scores:
        table.add_column("precision", justify="right")
        table.add_column("recall", justify="right")
    table.add_column("evidence (most confident yes)", overflow="fold")
    for qid, c in sorted(counts.items()):
        snippet = best.get(qid, (0.0, "-"))[1].replace("\n", " / ")
        pr = [f"{scores[qid].precision:.2f}", f"{scores[qid].recall:.2f}"] if scores else []
        table.add_row(qid, str(c["yes"]), str(c["no"]), *pr, snippet[:160])
    console.print(table)
    if scores:
        n = max(s.pairs for s in scores.values())
        console.print(f"precision and recall of yes against the labels file, on the latest revision of each of "
                      f"{n} labelled conversations")


def _print_before_after(console: Console, result: Lifecycle) -> None:
    # Short headers and a light box keep the question ids whole in 80 columns.
    table = Table(title="Held-out half: P, R, F1 before (zero-shot), then after (trained heads, backfilled)",
                  box=box.SIMPLE_HEAD)
    table.add_column("question", no_wrap=True)
    table.add_column("path")
    table.add_column("pairs", justify="right")
    for _ in ("before", "after"):
        for m in ("P", "R", "F1"):
            table.add_column(m, justify="right")
    for qid, b in result.before.items():
        a = result.after[qid]
        path = "head" if qid in result.heads else "zero-shot"
        table.add_row(qid, path, str(b.pairs), *(f"{x:.2f}" for x in (b.precision, b.recall, b.f1, a.precision,
                                                                      a.recall, a.f1)))
    table.add_row("macro", "", "", "", "", f"{macro_f1(result.before):.2f}", "", "", f"{macro_f1(result.after):.2f}",
                  style="bold")
    console.print(table)
