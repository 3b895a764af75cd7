"""Settings: defaults, YAML file, environment overrides, one-line errors, secrets that never print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from stream.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
FLEXOR = REPO / ".venv" / "bin" / "flexor"

DB_SECRET = "db-s3cret-pw"
SASL_SECRET = "sasl-s3cret-pw"
SECRET_URL = f"postgresql://flexor:{DB_SECRET}@db.internal:5432/flexor"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own environment must not leak into the settings under test."""
    for name in list(os.environ):
        if name.startswith("FLEXOR_") or name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "flexor.yaml"
    p.write_text(text)
    return p


def config_error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)  # type: ignore[arg-type]
    msg = str(info.value)
    assert msg and "\n" not in msg, f"ConfigError must be one line: {msg!r}"
    return msg


def assert_no_secrets(text: str) -> None:
    assert DB_SECRET not in text
    assert SASL_SECRET not in text


# -- sources ----------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert s.kafka.security_protocol == "PLAINTEXT"
    assert s.kafka.exactly_once is False
    assert (s.topics.input, s.topics.output, s.topics.dlq) == ("conversations", "classifications", "conversations.dlq")
    assert s.group_id == "flexor-stream"
    assert (s.batch.max_events, s.batch.max_wait_ms) == (64, 200)
    assert s.metrics_port == 9464
    assert s.questions_file.name == "questions.yaml"
    assert s.database_url.get_secret_value().startswith("postgresql://")
    assert s.log_level == "INFO"


def test_default_questions_file_loads_outside_the_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`flexor serve` started from another directory finds the packaged example questions."""
    from agents.questions import load_questions

    monkeypatch.chdir(tmp_path)
    assert len(load_questions(load_settings().questions_file).questions) > 0


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == load_settings()


def test_yaml_file_values(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        f"""
kafka:
  bootstrap_servers: "broker-1:9092,broker-2:9092"
  client_id: from-file
database_url: "{SECRET_URL}"
topics:
  input: convs-in
batch:
  max_events: 16
  max_wait_ms: 50
limits:
  max_turns: 40
group_id: g-file
metrics_port: 9100
questions_file: /etc/flexor/questions.yaml
log_level: DEBUG
""",
    )
    s = load_settings(p)
    assert s.kafka.bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert s.kafka.client_id == "from-file"
    assert s.database_url.get_secret_value() == SECRET_URL
    assert s.topics.input == "convs-in"
    assert s.topics.output == "classifications"  # untouched keys keep their defaults
    assert (s.batch.max_events, s.batch.max_wait_ms) == (16, 50)
    assert s.limits.max_turns == 40
    assert s.group_id == "g-file"
    assert s.metrics_port == 9100
    assert s.questions_file == Path("/etc/flexor/questions.yaml")
    assert s.log_level == "DEBUG"


def test_flexor_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "group_id: g-file\nmetrics_port: 9100\nbatch:\n  max_events: 16\n  max_wait_ms: 50\n")
    monkeypatch.setenv("FLEXOR_GROUP_ID", "g-env")
    monkeypatch.setenv("FLEXOR_METRICS_PORT", "9200")
    monkeypatch.setenv("FLEXOR_BATCH__MAX_EVENTS", "8")
    s = load_settings(p)
    assert s.group_id == "g-env"
    assert s.metrics_port == 9200
    assert s.batch.max_events == 8
    assert s.batch.max_wait_ms == 50  # a nested env var does not wipe the file's sibling keys


def test_nested_env_kafka_bootstrap_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "kafka:\n  bootstrap_servers: file:9092\n  client_id: from-file\n")
    monkeypatch.setenv("FLEXOR_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    s = load_settings(p)
    assert s.kafka.bootstrap_servers == "kafka:9092"
    assert s.kafka.client_id == "from-file"


def test_env_nested_topics_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXOR_TOPICS__INPUT", "in")
    monkeypatch.setenv("FLEXOR_TOPICS__OUTPUT", "out")
    monkeypatch.setenv("FLEXOR_TOPICS__DLQ", "in.dlq")
    monkeypatch.setenv("FLEXOR_QUESTIONS_FILE", "/app/examples/questions.yaml")
    monkeypatch.setenv("FLEXOR_KAFKA__EXACTLY_ONCE", "true")
    s = load_settings()
    assert (s.topics.input, s.topics.output, s.topics.dlq) == ("in", "out", "in.dlq")
    assert s.questions_file == Path("/app/examples/questions.yaml")
    assert s.kafka.exactly_once is True


def test_plain_platform_env_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "database_url: postgresql://file@h/db\nkafka:\n  bootstrap_servers: file:9092\n")
    monkeypatch.setenv("DATABASE_URL", SECRET_URL)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "plain:9092")
    s = load_settings(p)
    assert s.database_url.get_secret_value() == SECRET_URL
    assert s.kafka.bootstrap_servers == "plain:9092"


def test_flexor_env_beats_plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://plain@h/db")
    monkeypatch.setenv("FLEXOR_DATABASE_URL", SECRET_URL)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "plain:9092")
    monkeypatch.setenv("FLEXOR_KAFKA__BOOTSTRAP_SERVERS", "flexor:9092")
    s = load_settings()
    assert s.database_url.get_secret_value() == SECRET_URL
    assert s.kafka.bootstrap_servers == "flexor:9092"


def test_explicit_overrides_beat_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "kafka:\n  bootstrap_servers: file:9092\n")
    s = load_settings(p, **{"kafka.bootstrap_servers": "cli:9092", "group_id": None})
    assert s.kafka.bootstrap_servers == "cli:9092"
    assert s.group_id == "flexor-stream"  # None means "not given"


def test_explicit_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXOR_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    assert load_settings(**{"kafka.bootstrap_servers": "cli:9092"}).kafka.bootstrap_servers == "cli:9092"


# -- errors: one line naming the field --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, field",
    [
        ("batch:\n  max_events: 0\n", "batch.max_events"),
        ("batch:\n  max_wait_ms: -5\n", "batch.max_wait_ms"),
        ("metrics_port: 70000\n", "metrics_port"),
        ("metrics_port: lots\n", "metrics_port"),
        ("limits:\n  max_turns: 0\n", "limits.max_turns"),
        ("log_level: LOUD\n", "log_level"),
        ("kafka:\n  security_protocol: TLS\n", "kafka.security_protocol"),
        ("bogus_key: 1\n", "bogus_key"),
        ("kafka:\n  bootstrap: kafka:9092\n", "kafka.bootstrap"),
        ("kafka: not-a-mapping\n", "kafka"),
    ],
)
def test_bad_file_values_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    msg = config_error(write(tmp_path, text))
    assert field in msg


def test_bad_env_value_names_field_and_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXOR_BATCH__MAX_EVENTS", "0")
    msg = config_error()
    assert "batch.max_events" in msg
    assert "FLEXOR_BATCH__MAX_EVENTS" in msg


def test_sasl_ssl_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXOR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    msg = config_error()
    assert "kafka" in msg and "sasl" in msg.lower()


def test_sasl_ssl_with_password_but_no_username_does_not_leak_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXOR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_PASSWORD", SASL_SECRET)
    msg = config_error()
    assert "sasl_username" in msg
    assert_no_secrets(msg)


def test_sasl_complete_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXOR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_PASSWORD", SASL_SECRET)
    s = load_settings()
    assert s.kafka.sasl_password is not None and s.kafka.sasl_password.get_secret_value() == SASL_SECRET


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = config_error(missing)
    assert str(missing) in msg and "does not exist" in msg


@pytest.mark.parametrize("text", ["kafka: [unclosed\n", "a: b: c\n", "key: 'open\n", "\tkafka: x\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    msg = config_error(write(tmp_path, text))
    assert "YAML" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    assert "mapping" in config_error(write(tmp_path, text))


def test_error_message_does_not_leak_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, f"database_url: '{SECRET_URL}'\nbatch:\n  max_events: 0\n")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_PASSWORD", SASL_SECRET)
    assert_no_secrets(config_error(p))


# -- secrets ----------------------------------------------------------------------------------------


def _secret_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DATABASE_URL", SECRET_URL)
    monkeypatch.setenv("FLEXOR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_PASSWORD", SASL_SECRET)
    return load_settings()


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _secret_settings(monkeypatch)
    # they are there for the code that needs them
    assert s.database_url.get_secret_value() == SECRET_URL
    assert s.kafka.sasl_password is not None and s.kafka.sasl_password.get_secret_value() == SASL_SECRET
    for text in (str(s), repr(s), str(s.kafka), repr(s.kafka), f"{s}", str(s.redacted()),
                 orjson.dumps(s.redacted()).decode(), s.model_dump_json()):
        assert_no_secrets(text)


def test_redacted_keeps_what_operators_need(monkeypatch: pytest.MonkeyPatch) -> None:
    r = _secret_settings(monkeypatch).redacted()
    assert r["database_url"] == "postgresql://flexor:***@db.internal:5432/flexor"
    assert r["kafka"]["sasl_username"] == "svc"
    assert r["kafka"]["sasl_password"] != SASL_SECRET
    assert r["kafka"]["bootstrap_servers"] == "localhost:9092"
    orjson.dumps(r)  # fit for structured logs


def test_redacted_url_without_password_is_unchanged() -> None:
    url = "postgresql://flexor@db:5432/flexor"
    assert load_settings(database_url=url).redacted()["database_url"] == url


def test_redacted_hides_password_query_parameter() -> None:
    r = load_settings(database_url=f"postgresql://flexor@db:5432/flexor?password={DB_SECRET}").redacted()
    assert_no_secrets(str(r))


def test_redacted_accepts_multi_host_url() -> None:
    r = load_settings(database_url=f"postgresql://flexor:{DB_SECRET}@db1:5432,db2:5432/flexor").redacted()
    assert_no_secrets(str(r))


# -- CLI ----------------------------------------------------------------------------------------------

# The runtime install (no extras): the tool extras' modules cannot be imported.
_WITHOUT_EXTRAS = """
import sys
from stream.cli import EXTRAS, main

class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Missing())
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [("--help",), ("serve", "--help"), ("train", "--help"), ("bench", "--help")])
def test_cli_help_works_on_the_runtime_install(args: tuple[str, ...]) -> None:
    r = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *args], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "usage: flexor" in r.stdout


def test_cli_names_the_extra_a_command_needs() -> None:
    r = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, "produce", "x.jsonl"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert line == "flexor produce: error: needs the optional module 'rich': pip install 'flexor-stream[dev]'"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("FLEXOR_") and k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    exe = [str(FLEXOR)] if FLEXOR.exists() else [sys.executable, "-m", "stream.cli"]
    return subprocess.run(
        [*exe, *args], capture_output=True, text=True, timeout=60, cwd=REPO, env={**base, **(env or {})}
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


def test_cli_help_lists_the_commands() -> None:
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    listed = {m.group(1) for m in re.finditer(r"^\s{2,}([a-z]+)\s", r.stdout, re.MULTILINE)}
    assert {"up", "serve", "migrate", "produce", "tail", "train", "eval", "bench"} <= listed, r.stdout


def test_cli_serve_with_missing_config_file() -> None:
    r = run_cli("serve", "--config", "/nonexistent.yaml")
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert "/nonexistent.yaml" in line and "does not exist" in line


def test_cli_serve_with_bad_env_value_names_the_field_and_hides_secrets() -> None:
    r = run_cli("serve", env={"FLEXOR_BATCH__MAX_EVENTS": "0", "DATABASE_URL": SECRET_URL,
                              "FLEXOR_KAFKA__SASL_PASSWORD": SASL_SECRET})
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert "batch.max_events" in line
    assert_no_secrets(r.stderr + r.stdout)


@pytest.mark.parametrize(
    "args, names",
    [
        (("produce", "x.jsonl", "--rate", "fast"), ("--rate", "fast")),
        (("produce", "x.jsonl", "--rate", "0"), ("--rate", "above 0")),
        (("produce", "x.jsonl", "--limit", "-1"), ("--limit", "'-1'")),
        (("produce", "x.jsonl", "--bogus"), ("--bogus",)),
        (("produce",), ("file",)),
        (("tail", "--limit", "0"), ("--limit", "'0'")),
        (("tail", "--from", "3"), ("--from 3",)),
    ],
)
def test_cli_bad_arguments_are_one_line_naming_the_command(args: tuple[str, ...], names: tuple[str, ...]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert line.startswith(f"flexor {args[0]}: error:"), line  # names the command, also for unknown options
    for name in names:  # says what to fix
        assert name in line


def test_cli_produce_missing_file_is_one_line(tmp_path: Path) -> None:
    r = run_cli("produce", str(tmp_path / "missing.jsonl"), "--bootstrap-servers", "127.0.0.1:1")
    assert r.returncode != 0
    assert "missing.jsonl" in one_line(r.stderr)


# -- the answer monitors ------------------------------------------------------------------------------


def test_audit_rate_defaults_to_one_percent_with_an_llm_only() -> None:
    assert load_settings().models.audit_rate == 0.0
    assert load_settings(**{"models.llm": "hf-tiny"}).models.audit_rate == 0.01
    assert load_settings(**{"models.llm": "hf-tiny", "models.llm_audit_rate": 0}).models.audit_rate == 0.0
    assert load_settings(**{"models.llm": "hf-tiny", "models.llm_audit_rate": 0.2}).models.audit_rate == 0.2


def test_audit_rate_without_an_llm_or_outside_0_1_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "models.llm" in config_error(**{"models.llm_audit_rate": 0.05})
    monkeypatch.setenv("FLEXOR_MODELS__LLM_AUDIT_RATE", "1.5")
    monkeypatch.setenv("FLEXOR_MODELS__LLM", "hf-tiny")
    assert "models.llm_audit_rate" in config_error()


def test_drift_window_must_hold_min_answers() -> None:
    assert "min_answers" in config_error(**{"drift.window": 100, "drift.min_answers": 500})


def test_cli_heads_diff_with_a_directory_that_is_not_heads(tmp_path: Path) -> None:
    r = run_cli("heads", "diff", str(tmp_path), "none", "--conversations", str(tmp_path / "x.jsonl"))
    assert r.returncode == 2
    assert "manifest.json" in one_line(r.stderr)
