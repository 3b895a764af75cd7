"""The README's testcontainers path (issue 15): its libraries are in the test extras, it runs the
images docker-compose.yml runs (Apache Kafka, pgvector), and where it cannot run, the skip says why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

from tests.conftest import REPO
from tests.containers import compose_images, unavailable_reason

ONE_INFRA_TEST = "tests/agents/store/test_labels.py::test_labels_round_trip_and_count_by_source"


def test_test_extras_carry_testcontainers_and_docker() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert {"testcontainers", "docker"} <= {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in extras}


def test_images_are_apache_kafka_and_pgvector() -> None:
    images = compose_images()
    assert images["kafka"].startswith("apache/kafka:"), images
    assert images["postgres"].startswith("pgvector/pgvector:"), images


def run_containers_path(block: str | None) -> subprocess.CompletedProcess[str]:
    """One test that needs the broker and Postgres, with FLEXOR_TEST_CONTAINERS=1; `block` makes
    that module unimportable, as on a machine without it."""
    code = (f"import sys; sys.modules[{block!r}] = None; " if block else "import sys; ") + (
        f"import pytest; sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', {ONE_INFRA_TEST!r}]))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "FLEXOR_TEST_CONTAINERS": "1"},
                          capture_output=True, text=True, timeout=600, check=False)


def test_missing_testcontainers_is_named_as_such() -> None:
    proc = run_containers_path("testcontainers")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FLEXOR_TEST_CONTAINERS=1 but testcontainers is not installed" in proc.stdout, proc.stdout[-2000:]


def test_containers_path_runs_or_names_the_missing_engine() -> None:
    proc = run_containers_path(None)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    reason = unavailable_reason()
    if reason is None:  # a Docker engine: the test ran on Apache Kafka and pgvector containers
        assert "1 passed" in proc.stdout, proc.stdout[-2000:]
    else:
        assert reason.startswith("no Docker engine is reachable ("), reason
        assert f"FLEXOR_TEST_CONTAINERS=1 but {reason}" in proc.stdout, proc.stdout[-2000:]
