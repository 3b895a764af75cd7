"""Service configuration: a YAML file and/or environment variables (environment wins).

Environment variables use the prefix ``FLEXOR_`` and ``__`` for nesting, for example
``FLEXOR_KAFKA__BOOTSTRAP_SERVERS``; ``DATABASE_URL`` and ``KAFKA_BOOTSTRAP_SERVERS`` are also
read because every platform sets those names. Secrets are `SecretStr`: they never print.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agents.embedding_cache import DEFAULT_MB as EMBEDDING_CACHE_MB

# The example questions ship inside the package, so the default works from any directory.
EXAMPLE_QUESTIONS = Path(str(importlib.resources.files("examples"))) / "questions.yaml"


class ConfigError(ValueError):
    """A bad configuration: the message is one line that says what to fix."""


class KafkaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = "localhost:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "flexor-stream"
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    # Exactly-once needs a broker with transactions (not the embedded one).
    exactly_once: bool = False
    # Stable per replica (e.g. the pod name of a StatefulSet); default: "<group_id>-<hostname>".
    transactional_id: str | None = None

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                "SASL needs sasl_mechanism, sasl_username and sasl_password "
                "(FLEXOR_KAFKA__SASL_MECHANISM, FLEXOR_KAFKA__SASL_USERNAME, FLEXOR_KAFKA__SASL_PASSWORD)"
            )
        return self


class TopicsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = "conversations"
    output: str = "classifications"
    dlq: str = "conversations.dlq"
    # Backfill work items (`flexor backfill`), consumed by every replica in its own group.
    backfill: str = "conversations.backfill"
    # Reviewers' answers (feedback.v1), stored as `human` labels by the service.
    feedback: str = "classifications.feedback"
    # Used only when the service creates missing topics (--create-topics, flexor up).
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)


class BatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_events: int = Field(default=64, ge=1)
    max_wait_ms: int = Field(default=200, ge=1)
    # Records fetched but not yet committed; above it the consumer pauses its partitions.
    max_in_flight: int = Field(default=512, ge=1)
    # Records whose classification raises go to the DLQ (`processing_error`), unless more than
    # this share of the last `poison_window` classified records did: then the service stops, since
    # a bad deploy must not drain the topic into the DLQ (`stream.poison`). 0 stops on the first.
    max_poison_ratio: float = Field(default=0.05, ge=0.0, le=1.0)
    poison_window: int = Field(default=200, ge=1)


class BackfillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Conversations per second that one replica backfills at most, so live traffic keeps its
    # latency (0 = no limit).
    max_rate: float = Field(default=100.0, ge=0.0)
    # Conversations per work item that `flexor backfill` enqueues; a replica answers an item as
    # one batch, and a crash repeats at most the item in hand.
    item_size: int = Field(default=64, ge=1, le=1000)

    @model_validator(mode="after")
    def _items_keep_coming(self) -> BackfillConfig:
        # A replica waits item_size / max_rate between items without polling; waits near
        # kafka.max_poll_interval_ms would cost it its place in the consumer group.
        if self.max_rate and self.item_size / self.max_rate > 60:
            raise ValueError("backfill.item_size / backfill.max_rate must be at most 60 seconds: "
                             "raise max_rate or lower item_size")
        return self


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_event_bytes: int = Field(default=1_000_000, ge=1_000)
    max_turns: int = Field(default=500, ge=1)
    max_chars_per_turn: int = Field(default=20_000, ge=10)


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: Literal["onnx-int8", "onnx", "torch"] = "onnx-int8"
    heads_dir: Path | None = None
    # LLM engine spec for the uncertain band (hf-tiny, hf:PATH, openai:URL, trtllm:PATH); None = off.
    llm: str | None = None
    # Chunk vectors kept for reuse (later revisions, repeated turns); 0 = embed every chunk again.
    embedding_cache_mb: int = Field(default=EMBEDDING_CACHE_MB, ge=0)
    # Where the torch-based models run (the `torch` embedder, `hf` LLM engines), and in which dtype.
    # The ONNX embedders run on the CPU in their own precision.
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Share of events whose confident stage-1 answers the LLM also answers (agents/audit.py);
    # None = 0.01 with an LLM, else 0.
    llm_audit_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    # Candidate heads scored beside the live ones, never published (agents/shadow.py).
    shadow_heads_dir: Path | None = None

    @model_validator(mode="after")
    def _audit_needs_llm(self) -> ModelsConfig:
        if self.llm_audit_rate and not self.llm:
            raise ValueError("llm_audit_rate needs an LLM to audit with: set models.llm, or the rate to 0")
        return self

    @property
    def audit_rate(self) -> float:
        if self.llm_audit_rate is not None:
            return self.llm_audit_rate
        return 0.01 if self.llm else 0.0


class DriftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Answers per question in the sliding window compared with the heads' training data.
    window: int = Field(default=1000, ge=10)
    # PSI is reported once the window holds this many answers (a small window is mostly noise).
    min_answers: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _min_within_window(self) -> DriftConfig:
        if self.min_answers > self.window:
            raise ValueError("min_answers cannot exceed window")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLEXOR_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    kafka: KafkaConfig = KafkaConfig()
    database_url: SecretStr = SecretStr("postgresql://postgres@localhost:5432/postgres")
    topics: TopicsConfig = TopicsConfig()
    group_id: str = "flexor-stream"
    batch: BatchConfig = BatchConfig()
    backfill: BackfillConfig = BackfillConfig()
    limits: LimitsConfig = LimitsConfig()
    models: ModelsConfig = ModelsConfig()
    drift: DriftConfig = DriftConfig()
    questions_file: Path = EXAMPLE_QUESTIONS
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: explicit overrides (CLI flags), FLEXOR_* env, then the file (+ plain env names).
        return (init_settings, env_settings, _FileSource(settings_cls))

    def redacted(self) -> dict[str, Any]:
        """The config as a dict fit for logs: SecretStr fields stay masked, URLs lose passwords."""
        data = self.model_dump(mode="json")
        data["database_url"] = redact_url(self.database_url.get_secret_value())
        return data


_URL_PASSWORD = re.compile(r"(://[^:/@?#]*:)[^@/?#]*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|sslpassword)=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Mask passwords in a connection URL, in the userinfo and in query parameters. Regex, not
    urlsplit: libpq URLs may list several hosts, which urlsplit cannot parse."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", url))


_PLAIN_ENV = {"DATABASE_URL": "database_url", "KAFKA_BOOTSTRAP_SERVERS": "kafka.bootstrap_servers"}
_file_values: ContextVar[dict[str, Any] | None] = ContextVar("flexor_file_values", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """The config file's values (and the plain env names), ranked below FLEXOR_* variables."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_file_values.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_values.get() or {})


def _env_names(model: type[BaseModel], prefix: str) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(f"{prefix}{name.upper()}")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= _env_names(ann, f"{prefix}{name.upper()}__")
    return names


def _check_env_names() -> None:
    """pydantic-settings ignores unknown FLEXOR_* variables; a typo there should not pass silently."""
    known = _env_names(Settings, "FLEXOR_") | {"FLEXOR_CACHE_DIR", "FLEXOR_SHARED_DATA", "FLEXOR_TEST_CONTAINERS"}
    unknown = sorted(k for k in os.environ if k.startswith("FLEXOR_") and k.upper() not in known)
    if unknown:
        raise ConfigError(f"unknown environment variable {unknown[0]}: check its spelling against the README")


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Explicit overrides (CLI flags) > FLEXOR_* env > plain env names (DATABASE_URL, ...) > file > defaults."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} cannot be read: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of settings")
        data = loaded
    for env, dotted in _PLAIN_ENV.items():
        if env in os.environ:
            _set_dotted(data, dotted, os.environ[env])
    _check_env_names()
    init: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is not None:
            _set_dotted(init, dotted.replace("__", "."), value)
    token = _file_values.set(data)
    try:
        return Settings(**init)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        env = "FLEXOR_" + "__".join(str(p) for p in first["loc"][:2]).upper()
        raise ConfigError(f"config error at {where}: {first['msg']} (set it in the config file or {env})") from None
    finally:
        _file_values.reset(token)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings a `flexor serve` subprocess needs, as the FLEXOR_* variables it reads."""
    env = {
        "FLEXOR_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "FLEXOR_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "FLEXOR_KAFKA__HEARTBEAT_INTERVAL_MS": str(settings.kafka.heartbeat_interval_ms),
        "FLEXOR_KAFKA__EXACTLY_ONCE": str(settings.kafka.exactly_once).lower(),
        "FLEXOR_DATABASE_URL": settings.database_url.get_secret_value(),
        "FLEXOR_TOPICS__INPUT": settings.topics.input,
        "FLEXOR_TOPICS__OUTPUT": settings.topics.output,
        "FLEXOR_TOPICS__DLQ": settings.topics.dlq,
        "FLEXOR_TOPICS__BACKFILL": settings.topics.backfill,
        "FLEXOR_BACKFILL__MAX_RATE": str(settings.backfill.max_rate),
        "FLEXOR_TOPICS__FEEDBACK": settings.topics.feedback,
        "FLEXOR_GROUP_ID": settings.group_id,
        "FLEXOR_QUESTIONS_FILE": str(settings.questions_file),
        "FLEXOR_METRICS_HOST": settings.metrics_host,
        "FLEXOR_METRICS_PORT": str(settings.metrics_port),
        "FLEXOR_BATCH__MAX_WAIT_MS": str(settings.batch.max_wait_ms),
        "FLEXOR_BATCH__MAX_EVENTS": str(settings.batch.max_events),
        "FLEXOR_BATCH__MAX_IN_FLIGHT": str(settings.batch.max_in_flight),
        "FLEXOR_BATCH__MAX_POISON_RATIO": str(settings.batch.max_poison_ratio),
        "FLEXOR_BATCH__POISON_WINDOW": str(settings.batch.poison_window),
    }
    if settings.kafka.transactional_id:
        env["FLEXOR_KAFKA__TRANSACTIONAL_ID"] = settings.kafka.transactional_id
    m = settings.models
    env["FLEXOR_MODELS__EMBEDDER"] = m.embedder
    env["FLEXOR_MODELS__EMBEDDING_CACHE_MB"] = str(m.embedding_cache_mb)
    env["FLEXOR_MODELS__DEVICE"] = m.device
    env["FLEXOR_MODELS__DTYPE"] = m.dtype
    if m.heads_dir is not None:
        env["FLEXOR_MODELS__HEADS_DIR"] = str(m.heads_dir)
    if m.llm:
        env["FLEXOR_MODELS__LLM"] = m.llm
    return env


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
