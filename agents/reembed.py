"""Re-chunk and re-embed stored conversations whose chunks no longer serve this process, from the
turns Postgres holds: after a chunker change or an embedder change, without a Kafka replay.

The stored conversations are scanned in key order, a batch at a time. Those whose chunks came
from another embedder, or whose chunk texts are not today's chunker's (`conversations.mismatch`,
the test `ConversationsTable.load` makes) are chunked and embedded as the service does
(`pipeline.embed_batch`: one embedder call per batch, off the event loop) and written back in one
transaction per batch. A conversation whose row was written after it was read (the live service
stored a newer revision, with today's chunks) is left alone and counted as skipped.

Nothing is remembered between runs: a rerun (after a crash, or on a clean store) finds only what
still mismatches, so it resumes where the last run stopped and rewrites nothing twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from agents.embedding_cache import EmbeddingCache
from agents.pipeline import embed_batch
from agents.store.chunks import PgEvidenceStore
from agents.store.conversations import ConversationsTable, Key, Mismatch, StoredChunks
from agents.types import EmbeddedConversation
from models.embedder import Embedder

BATCH = 256
# A batch's transaction gives way when the live service holds one of its rows (`PgEvidenceStore.rewrite`);
# a retry then usually finds the service's newer revision and skips that conversation.
ATTEMPTS = 5
RETRY_S = 0.5


class StoreBusy(RuntimeError):
    """A batch could not get its rows after every attempt."""


@dataclass(slots=True)
class ReembedReport:
    total: int = 0  # stored conversations in scope when the run started (for progress)
    scanned: int = 0
    mismatched: Counter[Mismatch] = field(default_factory=Counter)
    rewritten: int = 0
    skipped: int = 0  # written meanwhile by the service: its chunks are today's already
    seconds: float = 0.0
    dry_run: bool = False

    def line(self) -> str:
        reasons = ", ".join(f"{why.value} {self.mismatched[why]}" for why in Mismatch)
        if self.dry_run:
            return (f"reembed (dry run): scanned {self.scanned}, would rewrite {self.mismatched.total()} "
                    f"({reasons}), {self.seconds:.1f} s")
        return (f"reembed: scanned {self.scanned}, mismatched {self.mismatched.total()} ({reasons}), rewritten "
                f"{self.rewritten}, skipped {self.skipped} (newer revision), {self.seconds:.1f} s")


async def reembed(
    pool: asyncpg.Pool,
    embedder: Embedder,
    *,
    cache: EmbeddingCache | None = None,
    tenant_id: str | None = None,
    batch: int = BATCH,
    dry_run: bool = False,
    on_batch: Callable[[ReembedReport], None] | None = None,
) -> ReembedReport:
    """One `flexor reembed` run (see the module docstring); `on_batch` sees the report after each batch."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    started = time.perf_counter()
    table, store = ConversationsTable(pool), PgEvidenceStore(pool)
    report = ReembedReport(total=await table.count(tenant_id=tenant_id), dry_run=dry_run)
    after: Key | None = None
    while page := await table.scan_chunks(tenant_id=tenant_id, after=after, limit=batch):
        after = page[-1].key
        report.scanned += len(page)
        # Re-chunking a page to compare is CPU work: off the event loop, like the embedding.
        reasons = await asyncio.to_thread(_mismatches, page, embedder.model_id)
        stale = [s for s, why in zip(page, reasons, strict=True) if why is not None]
        report.mismatched.update(why for why in reasons if why is not None)
        if stale and not dry_run:
            embedded, _ = await asyncio.to_thread(embed_batch, embedder, [s.conversation for s in stale], cache)
            rewritten = await _rewrite(store, embedded, {s.key: s.stored_at for s in stale}, embedder.model_id)
            report.rewritten += rewritten
            report.skipped += len(stale) - rewritten
        report.seconds = time.perf_counter() - started
        if on_batch is not None:
            on_batch(report)
    report.seconds = time.perf_counter() - started
    return report


def _mismatches(page: list[StoredChunks], embedder_id: str) -> list[Mismatch | None]:
    return [stored.mismatch(embedder_id) for stored in page]


async def _rewrite(
    store: PgEvidenceStore, embedded: list[EmbeddedConversation], read: dict[Key, datetime], embedder_id: str
) -> int:
    # A few linear back-offs, written out as `agents/llm_stage.py` does its retries: the project
    # has no retry library, and this one loop does not justify adding one.
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return len(await store.rewrite(embedded, read, embedder_id))
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            await asyncio.sleep(RETRY_S * attempt)
    first = embedded[0].conversation
    raise StoreBusy(f"the rows of the batch from {first.tenant_id}/{first.conversation_id} stayed locked by another "
                    f"writer through {ATTEMPTS} attempts: rerun `flexor reembed` to continue from there")
