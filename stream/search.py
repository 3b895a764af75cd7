"""`flexor search "text"`: the stored chunks closest to a text across every conversation, for the
person writing a question: example snippets, and a check of what a question will catch."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import asyncpg
import orjson

from agents.store import create_pool
from agents.store.errors import explained
from agents.store.search import DEFAULT_EF_SEARCH, CorpusSearch, Hit
from stream.cli import positive_int
from stream.config import ConfigError, load_settings, redact_url

SNIPPET_CHARS = 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="what to look for, in the words a conversation would use")
    p.add_argument("--config", type=Path, help="YAML config file (environment variables override it)")
    p.add_argument("--tenant", help="only this tenant's conversations")
    p.add_argument("--k", type=positive_int, default=20, help="how many chunks (default 20)")
    p.add_argument("--ef-search", type=positive_int, default=DEFAULT_EF_SEARCH,
                   help="HNSW candidate list: higher finds more of the true nearest, slower "
                   f"(default {DEFAULT_EF_SEARCH})")
    p.add_argument("--json", action="store_true", help="one JSON object per chunk instead of text")


def run(args: argparse.Namespace) -> int:
    from models.embedder import load_embedder

    settings = load_settings(args.config)
    embedder = load_embedder(settings.models.embedder)
    query = embedder.embed([args.text])[0]
    dsn = settings.database_url.get_secret_value()
    where = redact_url(dsn)

    async def go() -> list[Hit]:
        # A search reads and never migrates. Any database failure is the one line that every
        # command which connects gives (bad password, unreachable host, ...).
        async with explained(where):
            conn = await asyncpg.connect(dsn)
            try:
                # Checked first: a pool cannot even open on a database without the vector type.
                migrated = await conn.fetchval("SELECT to_regclass('chunks') IS NOT NULL")
            finally:
                await conn.close()
            if not migrated:
                raise ConfigError(f"database {where} has no chunks table: run `flexor migrate`")
            pool = await create_pool(dsn, max_size=1)
            try:
                return await CorpusSearch(pool).search(
                    query, embedder.model_id, k=args.k, tenant_id=args.tenant, ef_search=args.ef_search
                )
            finally:
                await pool.close()

    hits = asyncio.run(go())
    for rank, h in enumerate(hits, 1):
        if args.json:
            print(orjson.dumps(h.as_dict()).decode())
            continue
        snippet = " ".join(h.text.split())
        if len(snippet) > SNIPPET_CHARS:
            snippet = snippet[: SNIPPET_CHARS - 3] + "..."
        print(f"{rank:>3}. {h.score:.3f}  {h.tenant_id}/{h.conversation_id}@{h.revision}  "
              f"chars {h.char_start}-{h.char_end}  turns {','.join(h.turn_ids)}\n     {snippet}")
    if not hits and not args.json:
        print("no stored chunks" + (f" for tenant {args.tenant}" if args.tenant else "")
              + f" embedded with {embedder.model_id}")
    return 0
