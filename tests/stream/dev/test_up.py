"""`flexor up` as an operator scripts it (issue 15): ports that can be set, one parseable line with
the endpoints, `--print-env` for another shell, and `--bootstrap-servers` honoured."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

from stream.config import load_settings
from stream.dev.infra import free_port
from tests.conftest import EXAMPLES, Endpoints
from tests.harness import produce, read_topic, wait_until

FLEXOR = str(Path(sys.executable).parent / "flexor")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLEXOR_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")}
    return {**env, "FLEXOR_KAFKA__SESSION_TIMEOUT_MS": "3000", "FLEXOR_KAFKA__HEARTBEAT_INTERVAL_MS": "300", **extra}


@contextmanager
def flexor_up(args: list[str], env: dict[str, str], cwd: Path, wait_for: int) -> Iterator[tuple[list[str], Path]]:
    """Runs `flexor up ARGS`; yields the first `wait_for` stdout lines and the stderr log's path."""
    log = cwd / "up.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen([FLEXOR, "up", *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 180
        while len(lines) < wait_for and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
        assert len(lines) == wait_for, f"flexor up printed {lines}; stderr: {log.read_text()[-3000:]}"
        yield lines, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_ready(line: str) -> dict[str, str]:
    prefix = "flexor up: ready "
    assert line.startswith(prefix), line
    return dict(pair.split("=", 1) for pair in shlex.split(line[len(prefix):]))


def test_ports_ready_line_and_print_env(tmp_path: Path) -> None:
    broker_port, pg_port = free_port(), free_port()
    args = ["--broker-port", str(broker_port), "--postgres-port", str(pg_port), "--metrics-port", "0", "--print-env"]
    with flexor_up(args, clean_env(), tmp_path, wait_for=2) as (lines, log):
        env_file = tmp_path / "flexor.env"
        env_file.write_text("\n".join(lines) + "\n")
        assert lines[0] == f"export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{broker_port}"
        assert lines[1].startswith("export DATABASE_URL=") and f"@127.0.0.1:{pg_port}/" in lines[1]
        (ready,) = [x for x in log.read_text().splitlines() if x.startswith("flexor up: ready ")]
        found = parse_ready(ready)
        assert found["bootstrap_servers"] == f"127.0.0.1:{broker_port}"
        assert f":{pg_port}/" in found["database_url"]
        assert found["metrics_url"].startswith("http://127.0.0.1:")

        # Another shell sources the file and uses the stack: produce two conversations, read two answers.
        script = (f"set -e; source {shlex.quote(str(env_file))}; "
                  f"{FLEXOR} produce {EXAMPLES / 'conversations.jsonl'} --limit 2; "
                  f"{FLEXOR} tail --from-beginning --limit 2 --summary")
        other = subprocess.run(["bash", "-c", script], env=clean_env(), cwd=tmp_path, capture_output=True,
                               text=True, timeout=180, check=False)
        assert other.returncode == 0, other.stderr[-3000:]
        assert "produced 2 conversation events" in other.stdout
        assert len([x for x in other.stdout.splitlines() if "@" in x and "=" in x]) == 2, other.stdout


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([FLEXOR, "up", "--postgres-port", str(port)], env=clean_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"flexor up: error: 127.0.0.1:{port} is already in use")


async def test_bootstrap_servers_is_honoured(infra: Endpoints, tmp_path: Path) -> None:
    """With --bootstrap-servers, the service consumes from and publishes to that broker (before,
    it started its own and ignored the flag)."""
    suffix = uuid.uuid4().hex[:8]
    topics = {"FLEXOR_TOPICS__INPUT": f"up-in-{suffix}", "FLEXOR_TOPICS__OUTPUT": f"up-out-{suffix}",
              "FLEXOR_TOPICS__DLQ": f"up-dlq-{suffix}", "FLEXOR_GROUP_ID": f"up-{suffix}"}
    env = clean_env(**topics)
    with flexor_up(["--bootstrap-servers", infra.bootstrap_servers, "--metrics-port", "0"], env, tmp_path,
                   wait_for=1) as (lines, _):
        assert parse_ready(lines[0])["bootstrap_servers"] == infra.bootstrap_servers
        settings = load_settings(None, **{"kafka.bootstrap_servers": infra.bootstrap_servers,
                                          "topics.input": topics["FLEXOR_TOPICS__INPUT"],
                                          "topics.output": topics["FLEXOR_TOPICS__OUTPUT"]})
        event = orjson.loads((EXAMPLES / "conversations.jsonl").read_text().splitlines()[0])
        await produce(settings, [event])

        async def classified() -> bool:
            out = await read_topic(settings, settings.topics.output)
            return any(orjson.loads(r.value)["conversation_id"] == event["conversation_id"] for r in out)

        await wait_until(classified, 120, "the classification on the given broker")
