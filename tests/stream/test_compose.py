"""docker-compose.yml, deploy/prometheus/prometheus.yml and the Dockerfile agree with each other and with the code.

There is no Docker engine in the test environment, so this is a static check: the service's
environment is fed through the real `load_settings`, ports and paths are compared across files.
A renamed config field, CLI flag, metrics port or copied directory fails here, not in production.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from stream.config import _PLAIN_ENV, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

SERVICE = "flexor"

# -- helpers ----------------------------------------------------------------------------------------

_INTERP = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err} substitution."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"] or ""
        v = env.get(name)
        if op == ":-":
            return v if v else arg
        if op == "-":
            return v if v is not None else arg
        if op in (":?", "?"):
            if not v:
                raise AssertionError(f"{name} is required: {arg}")
            return v
        return v or ""

    return _INTERP.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def env_of(service: dict[str, Any], host_env: dict[str, str] | None = None) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v), host_env or {}) for k, v in raw.items()}


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Per build stage, (INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    starts = [i for i, (instr, _) in enumerate(out) if instr == "FROM"]
    return [out[a:b] for a, b in zip(starts, [*starts[1:], len(out)], strict=True)]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The image's own instructions: its final stage."""
    return dockerfile_stages()[-1]


def dockerfile(instr: str) -> list[str]:
    return [a for i, a in dockerfile_instructions() if i == instr]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in dockerfile("ENV"):
        for part in shlex.split(args):
            k, _, v = part.partition("=")
            env[k] = v
    return env


def field_path(env_name: str) -> tuple[str, ...]:
    if env_name in _PLAIN_ENV:
        return tuple(_PLAIN_ENV[env_name].split("."))
    assert env_name.startswith("FLEXOR_"), f"{env_name} is not a name stream/config.py reads"
    return tuple(p.lower() for p in env_name.removeprefix("FLEXOR_").split("__"))


def model_has_field(path: tuple[str, ...]) -> bool:
    model: type[BaseModel] = Settings
    for i, name in enumerate(path):
        info = model.model_fields.get(name)
        if info is None:
            return False
        if i < len(path) - 1:
            ann = info.annotation
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
    return True


def value_at(settings: Settings, path: tuple[str, ...]) -> Any:
    obj: Any = settings
    for name in path:
        obj = getattr(obj, name)
    return obj


def as_env_string(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def service(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"][SERVICE]


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS.read_text())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("FLEXOR_") or name in _PLAIN_ENV:
            monkeypatch.delenv(name)
    return monkeypatch


def scrape_ports(prometheus: dict[str, Any], host: str) -> set[int]:
    ports: set[int] = set()
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            if host in sd["names"]:
                ports.add(int(sd["port"]))
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                h, _, p = target.rpartition(":")
                if h == host:
                    ports.add(int(p))
    return ports


# -- the service's configuration --------------------------------------------------------------------


def test_every_service_env_var_is_a_settings_field(service: dict[str, Any]) -> None:
    env = env_of(service)
    assert env, "the service is configured through environment variables"
    unknown = [name for name in env if not model_has_field(field_path(name))]
    assert not unknown, f"compose sets variables no Settings field reads: {unknown}"


def test_service_env_validates_and_lands_in_the_right_fields(
    service: dict[str, Any], clean_env: pytest.MonkeyPatch
) -> None:
    env = env_of(service)
    for k, v in env.items():
        clean_env.setenv(k, v)
    s = load_settings()
    for name, value in env.items():
        assert as_env_string(value_at(s, field_path(name))) == value, name
    assert s.kafka.bootstrap_servers == "kafka:9092"
    assert s.topics.input == "conversations"
    url = urlsplit(s.database_url.get_secret_value())
    assert (url.hostname, url.port, url.path) == ("postgres", 5432, "/flexor")


def test_service_env_with_the_dockerfile_env_validates(
    service: dict[str, Any], clean_env: pytest.MonkeyPatch
) -> None:
    # the image's own ENV (FLEXOR_CACHE_DIR is read by models/embedder.py, not by Settings)
    for k, v in {**dockerfile_env(), **env_of(service)}.items():
        if k.startswith("FLEXOR_") or k in _PLAIN_ENV:
            clean_env.setenv(k, v)
    s = load_settings()
    assert s.metrics_port == 9464


def test_the_rename_guard_works() -> None:
    """The check above really fails for a name no field has."""
    assert model_has_field(field_path("FLEXOR_KAFKA__BOOTSTRAP_SERVERS"))
    assert model_has_field(field_path("DATABASE_URL"))
    assert not model_has_field(field_path("FLEXOR_KAFKA__BOOTSTRAP"))
    assert not model_has_field(field_path("FLEXOR_TOPIC__INPUT"))
    assert not model_has_field(field_path("FLEXOR_METRICS_PORT__X"))


def test_database_password_comes_from_the_environment(compose: dict[str, Any], service: dict[str, Any]) -> None:
    pg_raw = compose["services"]["postgres"]["environment"]
    assert "${POSTGRES_PASSWORD" in str(pg_raw["POSTGRES_PASSWORD"])
    assert "${POSTGRES_PASSWORD" in str(service["environment"]["DATABASE_URL"])
    # with the variable set, both sides use it; without it, both fall back to the same dev default
    for host_env in ({"POSTGRES_PASSWORD": "from-the-host"}, {}):
        pg = env_of(compose["services"]["postgres"], host_env)
        url = urlsplit(env_of(service, host_env)["DATABASE_URL"])
        assert url.password == pg["POSTGRES_PASSWORD"]
        assert url.username == pg["POSTGRES_USER"]
        assert url.path.lstrip("/") == pg["POSTGRES_DB"]
    assert urlsplit(env_of(service, {"POSTGRES_PASSWORD": "from-the-host"})["DATABASE_URL"]).password == "from-the-host"


def test_no_other_literal_secrets_in_compose() -> None:
    for line in COMPOSE.read_text().splitlines():
        if re.search(r"(PASSWORD|SECRET|TOKEN)\w*\s*:", line) and not line.lstrip().startswith("#"):
            assert "${" in line, line


def test_service_command_is_a_real_cli_invocation(service: dict[str, Any]) -> None:
    from stream.cli import build_parser

    command = service.get("command") or json.loads(dockerfile("CMD")[-1])
    args = build_parser().parse_args(command)
    assert args.command == "serve"
    assert args.create_topics is True


def test_service_waits_for_healthy_dependencies(compose: dict[str, Any], service: dict[str, Any]) -> None:
    deps = service["depends_on"]
    for name in ("kafka", "postgres"):
        assert deps[name]["condition"] == "service_healthy"
        assert compose["services"][name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert service.get("build"), "the service is built from the Dockerfile"


# -- infrastructure ---------------------------------------------------------------------------------


def test_postgres_is_pgvector(compose: dict[str, Any]) -> None:
    assert compose["services"]["postgres"]["image"].startswith("pgvector/pgvector:")
    assert (REPO / "migrations" / "001_init.sql").read_text().count("CREATE EXTENSION IF NOT EXISTS vector") == 1


def test_kafka_runs_kraft_and_advertises_the_service_bootstrap(
    compose: dict[str, Any], service: dict[str, Any]
) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = env_of(kafka)
    roles = {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    if "CLUSTER_ID" in env:  # kafka-storage format wants a base64url-encoded 16-byte UUID
        assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    assert not any("zookeeper" in name.lower() for name in compose["services"])
    bootstrap = env_of(service)["FLEXOR_KAFKA__BOOTSTRAP_SERVERS"]
    advertised = [listener.split("://", 1)[1] for listener in env["KAFKA_ADVERTISED_LISTENERS"].split(",")]
    assert bootstrap in advertised
    host = bootstrap.split(":")[0]
    assert host == "kafka" or kafka.get("hostname") == host


# -- metrics port -----------------------------------------------------------------------------------


def test_metrics_port_matches_everywhere(service: dict[str, Any], prometheus: dict[str, Any]) -> None:
    port = int(env_of(service)["FLEXOR_METRICS_PORT"])
    assert scrape_ports(prometheus, SERVICE) == {port}
    exposed = {int(p.split("/")[0]) for args in dockerfile("EXPOSE") for p in args.split()}
    assert port in exposed
    assert str(port) in {str(p).split(":")[-1] for p in service.get("expose", []) + service.get("ports", [])}
    assert int(dockerfile_env().get("FLEXOR_METRICS_PORT", Settings.model_fields["metrics_port"].default)) == port


def test_prometheus_scrapes_the_metrics_path(prometheus: dict[str, Any], compose: dict[str, Any]) -> None:
    from prometheus_client import CollectorRegistry

    from stream.http import make_app

    routes = {r.resource.canonical for r in make_app(CollectorRegistry(), dict).router.routes()}
    jobs = [j for j in prometheus["scrape_configs"] if scrape_ports(prometheus | {"scrape_configs": [j]}, SERVICE)]
    assert jobs
    for job in jobs:
        assert job.get("metrics_path", "/metrics") in routes
    mounts = {target: src for src, target, *_ in (v.split(":") for v in compose["services"]["prometheus"]["volumes"])}
    config = next(c for c in compose["services"]["prometheus"]["command"] if c.startswith("--config.file="))
    in_container = PurePosixPath(config.split("=", 1)[1])
    assert REPO / mounts[str(in_container.parent)] / in_container.name == PROMETHEUS


def test_prometheus_loads_the_alert_rules_beside_its_config(prometheus: dict[str, Any]) -> None:
    # rule_files resolve against the config file's folder, which compose mounts whole
    assert [PROMETHEUS.parent / f for f in prometheus["rule_files"]] == [PROMETHEUS.parent / "alerts.yml"]
    assert (PROMETHEUS.parent / "alerts.yml").is_file()


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {target: src for src, target, *_ in (v.split(":") for v in grafana["volumes"])}
    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    # the datasource is the compose stack's Prometheus, on the port it serves
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and "prometheus" in compose["services"]
    assert f"{url.port}:{url.port}" in compose["services"]["prometheus"]["ports"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "flexor.yml").read_text())["providers"]
    folder = PurePosixPath(provider["options"]["path"])
    dashboards = {PurePosixPath(t): REPO / src for t, src in mounts.items() if PurePosixPath(t).parent == folder}
    assert dashboards == {folder / "flexor.json": REPO / "deploy" / "grafana" / "flexor.json"}
    # every panel asks the provisioned datasource
    dashboard = json.loads((REPO / "deploy" / "grafana" / "flexor.json").read_text())
    refs = {json.dumps(p["datasource"], sort_keys=True) for p in dashboard["panels"] if "datasource" in p}
    assert refs == {json.dumps({"type": "prometheus", "uid": source["uid"]}, sort_keys=True)}


def test_dockerfile_healthcheck_hits_healthz() -> None:
    from prometheus_client import CollectorRegistry

    from stream.http import make_app

    (check,) = dockerfile("HEALTHCHECK")
    assert "urllib" in check and "/healthz" in check
    routes = {r.resource.canonical for r in make_app(CollectorRegistry(), dict).router.routes()}
    assert "/healthz" in routes


# -- the image --------------------------------------------------------------------------------------


def image_copies() -> dict[PurePosixPath, Path]:
    """Image path -> local source for each COPY (relative destinations resolve against WORKDIR)."""
    workdir = PurePosixPath("/")
    out: dict[PurePosixPath, Path] = {}
    for instr, args in dockerfile_instructions():
        if instr == "WORKDIR":
            workdir = workdir / args
        elif instr == "COPY" and "--from=" not in args:
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            *srcs, dest = parts
            dest_path = workdir / dest
            for src in srcs:
                out[dest_path / src if dest.endswith("/") and len(srcs) > 1 else dest_path] = REPO / src
    return out


def in_image(path: PurePosixPath) -> Path | None:
    """The local file that ends up at `path` in the image, if a COPY puts it there."""
    for dest, src in image_copies().items():
        if path == dest:
            return src
        if dest in path.parents and src.is_dir():
            return src / path.relative_to(dest)
    return None


def test_dockerfile_copies_the_runtime_directories() -> None:
    copied = {src.name for src in image_copies().values()}
    assert {"stream", "agents", "models", "migrations", "examples", "pyproject.toml"} <= copied
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not ({"stream", "agents", "models", "migrations", "examples", "pyproject.toml"} & ignored)


def test_questions_file_is_in_the_image(service: dict[str, Any]) -> None:
    from agents.questions import load_questions

    path = PurePosixPath(env_of(service)["FLEXOR_QUESTIONS_FILE"])
    assert path.is_absolute()
    local = in_image(path)
    assert local is not None and local.is_file(), f"{path} is not copied into the image"
    assert len(load_questions(local).questions) >= 1
    # the image default agrees
    assert in_image(PurePosixPath(dockerfile_env()["FLEXOR_QUESTIONS_FILE"])) == local


def test_migrations_and_examples_ship_as_package_data() -> None:
    """The image's `pip install .` must carry the SQL migrations and the example questions: they are
    packages with package data, found through importlib.resources, not next to the source tree."""
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"migrations", "examples"} <= set(cfg["packages"]["find"]["include"])
    assert {"*.sql", "*.yaml", "*.jsonl"} <= set(cfg["package-data"]["*"])
    copied = " ".join(a for i, a in dockerfile_instructions() if i == "COPY")
    assert "migrations" in copied and "examples" in copied
    from agents.store.migrate import MIGRATIONS_DIR, migration_files

    assert MIGRATIONS_DIR.name == "migrations" and migration_files()


def test_dockerfile_shape() -> None:
    *builders, image = dockerfile_stages()
    (base,) = dockerfile("FROM")
    assert base.startswith("python:3.11-slim")
    runs = [a for i, a in image if i == "RUN"]
    assert any(re.search(r"pip install (--\S+ )*\.(\s|$)", a) for a in runs), "the image installs the runtime"
    assert not any("torch" in a or "[models]" in a for a in runs), "the image carries the runtime install only"
    # A build stage exports the ONNX embedder with the models extra, torch (CPU) first...
    (export,) = builders
    stage = export[0][1].split()[-1]
    runs = [a for i, a in export if i == "RUN"]
    torch_at = next(i for i, a in enumerate(runs) if "torch==2.13.0" in a)
    assert "https://download.pytorch.org/whl/cpu" in runs[torch_at]
    install_at = next(i for i, a in enumerate(runs) if "pip install '.[models]'" in a)
    assert torch_at < install_at, "torch (CPU) must be installed before the project"
    assert "load_embedder('onnx-int8')" in runs[install_at]
    # ...and the image takes the exported files into its model cache.
    env = dockerfile_env()
    copies = [a.split() for i, a in image if i == "COPY" and f"--from={stage}" in a]
    assert any(c[-1] == f"{env['FLEXOR_CACHE_DIR']}/onnx" for c in copies)
    users = dockerfile("USER")
    assert users and users[-1] not in ("root", "0")
    assert json.loads(dockerfile("ENTRYPOINT")[-1]) == ["flexor"]
    assert json.loads(dockerfile("CMD")[-1]) == ["serve"]
    env = dockerfile_env()
    assert env.get("HF_HUB_OFFLINE") == "1"
