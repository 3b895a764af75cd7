"""`flexor reembed` as an operator runs it: `--dry-run` reports and writes nothing, a run (on the
runtime install, without the tool extras) makes a stored conversation of the 3-turn-window chunker
loadable, and a database it cannot use (bad URL, no pgvector) or a bad argument is one line and a
non-zero exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from agents.chunking import Turn, chunk_turns
from agents.store.chunks import PgEvidenceStore
from agents.store.conversations import ConversationsTable, StoreMismatch
from agents.types import Conversation, EmbeddedConversation
from models.embedder import load_embedder
from stream.cli import main
from tests.conftest import REPO
from tests.stream.test_config import _WITHOUT_EXTRAS as WITHOUT_EXTRAS
from tests.stream.test_database_errors import error_line, no_vector_database  # noqa: F401 (a fixture)

EMBEDDER = load_embedder("onnx-int8")  # the configured default


def run_reembed(
    database_url: str, cwd: Path, *args: str, runtime_install: bool = False
) -> subprocess.CompletedProcess[str]:
    """`flexor reembed` in a process of its own, on this checkout's code; `runtime_install`: as
    the image runs it, without the tool extras (rich, torch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXOR_")}
    env.update(DATABASE_URL=database_url, PYTHONPATH=str(REPO))
    cli = ["-c", WITHOUT_EXTRAS] if runtime_install else ["-m", "stream.cli"]
    return subprocess.run([sys.executable, *cli, "reembed", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


async def test_dry_run_then_run(pool: asyncpg.Pool, database: str, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    turns = tuple(Turn(f"t{i}", "customer" if i % 2 else "agent", f"turn {i}: where is my refund") for i in range(5))
    conv = Conversation("acme", "c1", 1, turns, {}, status="closed")
    windows = chunk_turns(turns, window=3, stride=1)
    await PgEvidenceStore(pool).upsert([EmbeddedConversation(conv, windows, EMBEDDER.embed([c.text for c in windows]))],
                                       EMBEDDER.model_id)
    before = await pool.fetch("SELECT ctid::text, xmin::text, * FROM chunks ORDER BY seq")
    monkeypatch.setenv("DATABASE_URL", database)

    assert await asyncio.to_thread(main, ["reembed", "--dry-run"]) == 0  # asyncio.run needs a thread of its own
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("reembed (dry run): scanned 1, would rewrite 1 (embedder 0, chunker 1)"), out
    assert await pool.fetch("SELECT ctid::text, xmin::text, * FROM chunks ORDER BY seq") == before
    with pytest.raises(StoreMismatch):
        await ConversationsTable(pool).load([("acme", "c1")], EMBEDDER.model_id)

    proc = await asyncio.to_thread(run_reembed, database, REPO, "--batch", "10", runtime_install=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    assert out[-1].startswith("reembed: scanned 1, mismatched 1 (embedder 0, chunker 1), rewritten 1, skipped 0 "
                              "(newer revision)"), out
    (got,) = await ConversationsTable(pool).load([("acme", "c1")], EMBEDDER.model_id)
    assert got.chunks == chunk_turns(turns)


def test_bad_database_url_is_one_line(tmp_path: Path) -> None:
    proc = run_reembed("postgresql://postgres@127.0.0.1:1/postgres", tmp_path)
    line = error_line(proc, "reembed")
    assert "cannot reach PostgreSQL" in line and "127.0.0.1:1" in line, line


async def test_server_without_pgvector_is_one_line(no_vector_database: str, tmp_path: Path) -> None:  # noqa: F811
    line = error_line(await asyncio.to_thread(run_reembed, no_vector_database, tmp_path), "reembed")
    assert "no pgvector extension" in line and "install pgvector" in line, line


def test_bad_batch_is_one_line(tmp_path: Path) -> None:
    proc = run_reembed("postgresql://postgres@127.0.0.1:1/postgres", tmp_path, "--batch", "0")
    assert proc.returncode == 2
    assert error_line(proc, "reembed").endswith("'0' is not a positive whole number (see --help)")
