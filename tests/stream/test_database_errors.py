"""Operator findings (issue 15): a bad DATABASE_URL, a server without pgvector, or a role that may
not create it makes `flexor migrate` and `flexor serve` (and the other commands that connect:
search, reembed, backfill) exit non-zero with ONE line that says what to fix (no traceback, no
password), and a failed migrate leaves no `schema_migrations` behind.

The commands run as subprocesses, from a directory outside the repository (which `flexor serve`
must also survive: its default questions file is the packaged one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from stream.dev.infra import EmbeddedPostgres
from tests.conftest import Endpoints

PASSWORD = "s3cret-" + uuid.uuid4().hex[:6]
WRONG = "wrong-" + uuid.uuid4().hex[:6]


def run_flexor(command: str, database_url: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXOR_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["DATABASE_URL"] = database_url
    env["KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:1"  # never reached: the database fails first
    return subprocess.run(
        [str(Path(sys.executable).parent / "flexor"), command, *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=120, check=False,
    )


def error_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    """The one error line; fails on a traceback or on more than one error line."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"flexor {command}: error:")]
    assert len(lines) == 1, proc.stderr
    # Nothing after it (serve logs its config before it connects).
    assert proc.stderr.rstrip().endswith(lines[0]), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def password_postgres() -> Iterator[EmbeddedPostgres]:
    """A private server whose superuser needs a password (the session one trusts everyone)."""
    workdir = Path(tempfile.mkdtemp(prefix="flexor-pw-"))
    pg = EmbeddedPostgres(workdir, password=PASSWORD)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def has_table(url: str, table: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table))
    finally:
        await conn.close()


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_wrong_password_is_one_line(command: str, password_postgres: EmbeddedPostgres, tmp_path: Path) -> None:
    url = password_postgres.url.replace(PASSWORD, WRONG)
    proc = run_flexor(command, url, tmp_path)
    line = error_line(proc, command)
    assert "password authentication failed" in line and "fix the password in DATABASE_URL" in line, line
    assert WRONG not in proc.stdout + proc.stderr and PASSWORD not in proc.stdout + proc.stderr


def test_right_password_migrates(password_postgres: EmbeddedPostgres, tmp_path: Path) -> None:
    proc = run_flexor("migrate", password_postgres.url, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "001_init.sql" in proc.stdout


@pytest.fixture
async def no_vector_database(infra: Endpoints, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database on a server where pgvector's files are out of reach: PostgreSQL 18's
    `extension_control_path` points it at an empty directory."""
    name = f"novec_{uuid.uuid4().hex[:10]}"
    empty = tmp_path / "no-extensions"
    empty.mkdir()
    os.chmod(tmp_path, 0o755)
    admin = await asyncpg.connect(infra.postgres_url)
    try:
        if admin.get_server_version().major < 18:
            pytest.skip("hiding an installed extension needs PostgreSQL 18's extension_control_path")
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.execute(f"ALTER DATABASE \"{name}\" SET extension_control_path = '{empty}'")
    finally:
        await admin.close()
    yield infra.postgres_url.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(infra.postgres_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.mark.parametrize("command", ["migrate", "serve"])
async def test_server_without_pgvector_is_one_line_and_leaves_nothing(
    command: str, no_vector_database: str, tmp_path: Path
) -> None:
    line = error_line(run_flexor(command, no_vector_database, tmp_path), command)
    assert "no pgvector extension" in line and "install pgvector" in line, line
    assert not await has_table(no_vector_database, "schema_migrations"), "a failed migrate left schema_migrations"


@pytest.fixture
async def app_role_database(infra: Endpoints) -> AsyncIterator[tuple[str, str]]:
    """A database owned by a role that is not a superuser: (its URL as that role, the admin's URL)."""
    suffix = uuid.uuid4().hex[:10]
    role, name = f"app_{suffix}", f"appdb_{suffix}"
    admin = await asyncpg.connect(infra.postgres_url)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD \'{PASSWORD}\'')
        await admin.execute(f'CREATE DATABASE "{name}" OWNER "{role}"')
    finally:
        await admin.close()
    base = infra.postgres_url.rsplit("/", 1)[0]
    host = base.split("@", 1)[1]
    yield f"postgresql://{role}:{PASSWORD}@{host}/{name}", f"{base}/{name}"
    admin = await asyncpg.connect(infra.postgres_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await admin.close()


async def test_role_that_may_not_create_pgvector_is_told_what_to_run(
    app_role_database: tuple[str, str], tmp_path: Path
) -> None:
    app_url, admin_url = app_role_database
    line = error_line(run_flexor("migrate", app_url, tmp_path), "migrate")
    assert "not a trusted extension" in line and "CREATE EXTENSION vector;" in line, line
    assert PASSWORD not in line
    assert not await has_table(admin_url, "schema_migrations")

    # The advice works: once a superuser has created the extension, the same role migrates.
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute("CREATE EXTENSION vector")
    finally:
        await admin.close()
    proc = run_flexor("migrate", app_url, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert await has_table(admin_url, "schema_migrations")


@pytest.mark.parametrize("argv", [["migrate"], ["search", "refund"], ["reembed"], ["backfill"]], ids=lambda a: a[0])
def test_unreachable_server_is_one_line(argv: list[str], tmp_path: Path) -> None:
    line = error_line(run_flexor(*argv[:1], "postgresql://postgres@127.0.0.1:1/postgres", tmp_path, *argv[1:]),
                      argv[0])
    assert "cannot reach PostgreSQL" in line and "127.0.0.1:1" in line and "check the host and port" in line, line


def test_search_wrong_password_is_one_line(password_postgres: EmbeddedPostgres, tmp_path: Path) -> None:
    proc = run_flexor("search", password_postgres.url.replace(PASSWORD, WRONG), tmp_path, "refund")
    line = error_line(proc, "search")
    assert "password authentication failed" in line and "fix the password in DATABASE_URL" in line, line
    assert WRONG not in proc.stdout + proc.stderr and PASSWORD not in proc.stdout + proc.stderr


async def test_search_on_a_database_never_migrated_says_to_migrate(database: str, tmp_path: Path) -> None:
    """A search never migrates; a pool cannot open where the vector type does not exist yet, which
    asyncpg reported as `unknown type: public.vector`."""
    line = error_line(run_flexor("search", database, tmp_path, "refund"), "search")
    assert line.endswith("has no chunks table: run `flexor migrate`"), line
    assert not await has_table(database, "schema_migrations"), "a search migrated the database"
