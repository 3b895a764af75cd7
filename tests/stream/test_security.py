"""Security (issue 5): Kafka SSL / SASL_SSL and Postgres TLS are configurable; credentials never
appear in logs, errors, /metrics or config dumps; input limits are configurable and enforced before
any model work."""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from pydantic import SecretStr

from stream.app import run_service
from stream.config import ConfigError, KafkaConfig, Settings, load_settings
from stream.dev.infra import free_port
from stream.dev.produce import load_conversations
from stream.kafka import connection_kwargs, make_consumer, make_producer
from tests.conftest import EXAMPLES, REPO
from tests.harness import count_rows, create_topics, metric, produce, running_service, wait_until

DB_PASSWORD = "Db-pa55-S3cret-0xC0FFEE"
SASL_PASSWORD = "Sasl-pa55-S3cret-0xBEEF"


def _with_password(url: str, password: str = DB_PASSWORD) -> str:
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{host}"


# -- config dumps ------------------------------------------------------------------------------------


def test_redacted_settings_and_repr_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://flexor:{DB_PASSWORD}@db:5432/flexor?sslmode=verify-full")
    monkeypatch.setenv("FLEXOR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_USERNAME", "flexor")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_PASSWORD", SASL_PASSWORD)
    s = load_settings(None)
    assert s.database_url.get_secret_value().count(DB_PASSWORD) == 1  # it is really there
    assert s.kafka.sasl_password is not None and s.kafka.sasl_password.get_secret_value() == SASL_PASSWORD
    dumps = [orjson.dumps(s.redacted()).decode(), repr(s), str(s), s.model_dump_json(), repr(s.kafka)]
    for text in dumps:
        assert DB_PASSWORD not in text and SASL_PASSWORD not in text
    red = s.redacted()
    assert red["database_url"] == "postgresql://flexor:***@db:5432/flexor?sslmode=verify-full"
    assert red["kafka"]["sasl_username"] == "flexor"


def test_sasl_without_password_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXOR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLEXOR_KAFKA__SASL_MECHANISM", "PLAIN")
    with pytest.raises(ConfigError, match="sasl"):
        load_settings(None)


# -- Kafka TLS and SASL client settings ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a client certificate signed by it (openssl CLI)."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    try:
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=flexor-test-ca")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
            "-subj", "/CN=flexor-client")
        run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "client.pem", "-days", "2")
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        pytest.skip(f"openssl is needed to generate test certificates: {e}")
    return {"ca": d / "ca.pem", "cert": d / "client.pem", "key": d / "client.key"}


def test_ssl_kwargs_verify_the_broker_with_the_given_ca(pki: dict[str, Path]) -> None:
    cfg = KafkaConfig(bootstrap_servers="b:9093", security_protocol="SSL", ssl_cafile=str(pki["ca"]),
                      ssl_certfile=str(pki["cert"]), ssl_keyfile=str(pki["key"]))
    kw = connection_kwargs(cfg)
    ctx = kw["ssl_context"]
    assert kw["security_protocol"] == "SSL" and isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == 1  # exactly our CA, not the system store
    assert "sasl_mechanism" not in kw


def test_ssl_with_a_key_that_does_not_match_fails_loudly(pki: dict[str, Path]) -> None:
    cfg = KafkaConfig(security_protocol="SSL", ssl_cafile=str(pki["ca"]), ssl_certfile=str(pki["cert"]),
                      ssl_keyfile=str(pki["ca"].with_name("ca.key")))
    with pytest.raises(ssl.SSLError):
        connection_kwargs(cfg)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_ssl_kwargs_build_real_clients(pki: dict[str, Path], mechanism: str) -> None:
    cfg = KafkaConfig(bootstrap_servers="b:9093", security_protocol="SASL_SSL", ssl_cafile=str(pki["ca"]),
                      sasl_mechanism=mechanism, sasl_username="flexor", sasl_password=SecretStr(SASL_PASSWORD))
    kw = connection_kwargs(cfg)
    assert kw["security_protocol"] == "SASL_SSL" and isinstance(kw["ssl_context"], ssl.SSLContext)
    assert (kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == (
        mechanism, "flexor", SASL_PASSWORD)
    # aiokafka accepts the combination (it validates protocol, mechanism and context on construction).
    producer = make_producer(cfg)
    consumer = make_consumer(cfg, "t", "g", 10)
    for client in (producer.client, consumer._client):
        assert client._security_protocol == "SASL_SSL" and client._sasl_mechanism == mechanism
    plain = connection_kwargs(KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism,
                                          sasl_username="u", sasl_password=SecretStr("p")))
    assert "ssl_context" not in plain and plain["sasl_mechanism"] == mechanism


# -- Postgres TLS -----------------------------------------------------------------------------------------


async def test_postgres_sslmode_reaches_the_driver(database: str) -> None:
    """The embedded server has no TLS: sslmode=require must refuse it (the setting is honoured),
    sslmode=disable connects; the error never carries the password."""
    conn = await asyncpg.connect(_with_password(database) + "?sslmode=disable")
    await conn.close()
    with pytest.raises(Exception) as info:
        await asyncpg.connect(_with_password(database) + "?sslmode=require")
    assert "ssl" in str(info.value).lower() or "SSL" in type(info.value).__name__
    assert DB_PASSWORD not in str(info.value) and DB_PASSWORD not in repr(info.value)


# -- credentials in logs, errors and /metrics -------------------------------------------------------


async def test_no_credentials_in_logs_or_metrics(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """The embedded Postgres trusts every login, so the password is accepted and must stay hidden."""
    settings = settings.model_copy(update={"database_url": SecretStr(_with_password(
        settings.database_url.get_secret_value()))})
    events = load_conversations(EXAMPLES / "conversations.jsonl", 3)
    caplog.set_level(logging.DEBUG)
    await create_topics(settings)
    async with running_service(settings) as running:
        await produce(settings, events)
        await wait_until(lambda: _rows(settings, 3), 120, "classified with a password-bearing URL")
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{running.http_port}"
            texts = [await (await http.get(f"{base}/{p}")).text() for p in ("metrics", "readyz", "healthz")]
    assert "flexor_conversations_classified_total 3.0" in texts[0]
    logged = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert len(caplog.records) > 20  # the capture saw the service's (and aiokafka's) debug logs
    for text in [logged, *texts]:
        assert DB_PASSWORD not in text


async def _rows(settings: Settings, n: int) -> bool:
    return await count_rows(settings) >= n


async def test_unreachable_database_error_hides_password(settings: Settings) -> None:
    url = f"postgresql://flexor:{DB_PASSWORD}@127.0.0.1:{free_port()}/flexor"
    bad = settings.model_copy(update={"database_url": SecretStr(url)})
    from agents.store.errors import DatabaseSetupError

    with pytest.raises(DatabaseSetupError, match="cannot reach PostgreSQL") as info:
        await run_service(bad, install_signals=False)
    import traceback

    text = "".join(traceback.format_exception(info.value))
    assert DB_PASSWORD not in text


def test_cli_error_output_hides_password(tmp_path: Path) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path),
           "DATABASE_URL": f"postgresql://flexor:{DB_PASSWORD}@127.0.0.1:{free_port()}/flexor",
           "FLEXOR_KAFKA__SASL_PASSWORD": SASL_PASSWORD}
    flexor = Path(sys.executable).parent / "flexor"
    r = subprocess.run([str(flexor), "migrate"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert DB_PASSWORD not in r.stdout + r.stderr and SASL_PASSWORD not in r.stdout + r.stderr
    assert r.stderr.strip(), "the failure is reported"


# -- input limits --------------------------------------------------------------------------------------


def test_limits_configurable_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXOR_LIMITS__MAX_EVENT_BYTES", "5000")
    monkeypatch.setenv("FLEXOR_LIMITS__MAX_TURNS", "3")
    monkeypatch.setenv("FLEXOR_LIMITS__MAX_CHARS_PER_TURN", "100")
    lim = load_settings(None).limits
    assert (lim.max_event_bytes, lim.max_turns, lim.max_chars_per_turn) == (5000, 3, 100)


async def test_limits_enforced_before_any_model_work(settings: Settings) -> None:
    settings = settings.model_copy(update={"limits": settings.limits.model_copy(
        update={"max_turns": 3, "max_chars_per_turn": 50, "max_event_bytes": 4000})})
    base: dict[str, Any] = load_conversations(EXAMPLES / "conversations.jsonl", 1)[0]
    too_many = dict(base, turns=[{"turn_id": f"t{i}", "speaker": "customer", "text": "hi"} for i in range(4)])
    too_long = dict(base, turns=[{"turn_id": "t1", "speaker": "customer", "text": "x" * 51}])
    too_big = dict(base, turns=[{"turn_id": "t1", "speaker": "customer", "text": "y"}], pad="z" * 5000)
    await create_topics(settings)
    async with running_service(settings) as running:
        reg = running.metrics.registry
        await produce(settings, [too_many, too_long, too_big])

        async def dead_lettered() -> bool:
            return all(metric(reg, "flexor_dlq_events_total", {"reason": r}) == 1
                       for r in ("too_many_turns", "text_too_long", "too_large"))

        await wait_until(dead_lettered, 60, "each over-limit event in the DLQ")
        assert metric(reg, "flexor_stage_seconds_count", {"stage": "embed"}) == 0, "model work ran"
        assert metric(reg, "flexor_stage_seconds_count", {"stage": "classify"}) == 0
