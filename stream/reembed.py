"""`flexor reembed`: rewrite the stored chunks that no longer serve the configured embedder and
today's chunker, from the turns Postgres holds (`agents/reembed.py`), beside the live service.

It embeds with the embedder the service is configured with, through an embedding cache of the
service's size, and prints progress on stderr and one summary line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from agents.embedding_cache import EmbeddingCache
from agents.reembed import BATCH, ReembedReport, StoreBusy, reembed
from agents.store import open_database
from agents.store.errors import explained
from stream.cli import positive_int
from stream.config import load_settings, redact_url

# Without a terminal (a log file, a CI job), a progress line at most this often.
PROGRESS_EVERY_S = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config file (environment variables override it)")
    p.add_argument("--tenant", help="only this tenant's conversations")
    p.add_argument("--batch", type=positive_int, default=BATCH,
                   help=f"conversations per scan page, embedder call and transaction (default {BATCH})")
    p.add_argument("--dry-run", action="store_true",
                   help="count the conversations that would be rewritten, by reason; write nothing")


class _Progress:
    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, r: ReembedReport) -> None:
        now = time.monotonic()
        if not self.tty and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        done = "would rewrite" if r.dry_run else "rewritten"
        count = r.mismatched.total() if r.dry_run else r.rewritten
        line = (f"reembed: {r.scanned}/{r.total} conversations scanned, {count} {done}, "
                f"{r.scanned / max(r.seconds, 1e-9):.0f} conv/s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.last:
            print(file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from models.embedder import load_embedder

    settings = load_settings(args.config)
    dsn = settings.database_url.get_secret_value()
    where = redact_url(dsn)
    m = settings.models

    async def go() -> ReembedReport:
        pool = await open_database(dsn, where=where, max_size=2)
        progress = _Progress()
        try:
            embedder = await asyncio.to_thread(load_embedder, m.embedder, m.device, m.dtype)
            cache = EmbeddingCache(m.embedding_cache_mb * 2**20) if m.embedding_cache_mb else None
            async with explained(where):  # the database failing mid-run: one line too
                return await reembed(pool, embedder, cache=cache, tenant_id=args.tenant, batch=args.batch,
                                     dry_run=args.dry_run, on_batch=progress)
        finally:
            progress.close()
            await pool.close()

    try:
        report = asyncio.run(go())
    except StoreBusy as e:
        print(f"flexor reembed: error: {e}", file=sys.stderr)
        return 1
    print(report.line())
    return 0
