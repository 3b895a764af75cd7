"""Labelled data from the store: the labels table joined with the stored conversations and their
stored chunk vectors, so `train --from-store`, `eval --from-store` and `flexor label` embed
nothing again.

Only labels of the questions' current versions, and of the conversation revision that is
stored, count; the rest are left out and counted in the set's notes. `split` takes a
deterministic share of the labelled conversations by a hash of their id (`datasets.holdout`):
`eval --from-store` scores the held-out share that `train --from-store` leaves out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import asyncpg
import numpy as np

from agents.learn.datasets import HOLDOUT, SERVICE, LabelledSet, in_holdout_split
from agents.questions import QuestionSet
from agents.store.conversations import ConversationsTable
from agents.store.labels import LabelsTable
from agents.types import Conversation, EmbeddedConversation
from models.embedder import Embedder
from models.llm.guard import strip_instructions

PAGE = 1000
# Fit the lexicon on at most this many stored conversations (deterministic: those of lowest hash).
LEXICON_MAX = 50_000


async def open_pool(dsn: str, max_size: int = 4, *, where: str = "the database") -> asyncpg.Pool:
    """A pool on a database with every migration applied (the tools may be the first to touch it);
    a failure is one line naming `where` (the URL without its password)."""
    from agents.store import open_database

    return await open_database(dsn, where=where, max_size=max_size)


def open_settings_pool(settings: Any, max_size: int = 4) -> Any:
    """`open_pool` on the configured database (`settings` is the flexor Settings)."""
    return open_pool(settings.database_url.get_secret_value(), max_size,
                     where=settings.redacted()["database_url"])


async def load_labelled(
    pool: asyncpg.Pool,
    questions: QuestionSet,
    embedder_id: str,
    split: str = "all",
    *,
    holdout: float = HOLDOUT,
    tenant_id: str | None = None,
) -> LabelledSet:
    """Labels of `questions` in the store and their conversations with the stored vectors
    (StoreMismatch when those come from another embedder)."""
    qs = questions.by_id()
    labels = await LabelsTable(pool).fetch(list(qs), tenant_id=tenant_id)
    skipped: Counter[str] = Counter()
    kept = []
    for lab in labels:
        if lab.question_version != qs[lab.question_id].version:
            skipped["another question version"] += 1
        elif not in_holdout_split(lab.conversation_id, split, holdout):
            skipped[f"not in split {split}"] += 1
        else:
            kept.append(lab)
    keys = sorted({(lab.tenant_id, lab.conversation_id) for lab in kept})
    embedded: list[EmbeddedConversation] = []
    for start in range(0, len(keys), PAGE):
        embedded += await ConversationsTable(pool).load(keys[start : start + PAGE], embedder_id)
    index = {(e.conversation.tenant_id, e.conversation.conversation_id): i for i, e in enumerate(embedded)}
    gold: dict[tuple[str, int], bool] = {}
    sources: dict[str, Counter[str]] = {q: Counter() for q in qs}
    for lab in kept:
        i = index.get((lab.tenant_id, lab.conversation_id))
        if i is None:
            skipped["conversation not stored"] += 1
        elif embedded[i].conversation.revision != lab.revision:
            skipped["another revision"] += 1
        elif not qs[lab.question_id].applies(embedded[i].conversation.metadata):
            skipped["question does not apply"] += 1
        else:
            gold[(lab.question_id, i)] = lab.answer == "yes"
            sources[lab.question_id][lab.source] += 1
    notes = [f"{n} labels left out: {why}" for why, n in sorted(skipped.items())]
    return LabelledSet(
        conversations=[e.conversation for e in embedded], questions=questions, gold=gold, format=SERVICE,
        groups={q: None for q in qs}, embedded=embedded,
        label_sources={q: dict(sorted(c.items())) for q, c in sources.items() if c}, notes=notes,
    )


async def stored_conversations(
    pool: asyncpg.Pool, split: str = "all", *, holdout: float = HOLDOUT, tenant_id: str | None = None,
    limit: int | None = None,
) -> list[Conversation]:
    """Stored conversations of `split` (turns and metadata, no vectors), in (tenant, id) order;
    `limit` keeps those of lowest hash share, so the sample does not depend on insertion order."""
    table = ConversationsTable(pool)
    out: list[Conversation] = []
    after = None
    while True:
        page = await table.scan(tenant_id=tenant_id, after=after, limit=PAGE)
        if not page:
            break
        out += [c for c in page if in_holdout_split(c.conversation_id, split, holdout)]
        after = (page[-1].tenant_id, page[-1].conversation_id)
    if limit is not None and len(out) > limit:
        from agents.learn.datasets import holdout_share

        keep = set(sorted(range(len(out)), key=lambda i: holdout_share(out[i].conversation_id))[:limit])
        out = [c for i, c in enumerate(out) if i in keep]
    return out


class StoredVectors:
    """An embedder that answers chunk texts from conversations already embedded (the stored
    vectors) and passes anything else (question queries, prototypes) to `inner`. The pipeline
    embeds the guard-stripped chunk text (`agents.pipeline.embed_conversations`), so that is the key."""

    def __init__(self, inner: Embedder, embedded: Sequence[EmbeddedConversation]) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        self._vectors: dict[str, np.ndarray] = {}
        for e in embedded:
            for ch, v in zip(e.chunks, e.vectors, strict=True):
                self._vectors[strip_instructions(ch.text)[0]] = v
        self.passed_on = 0  # texts the inner embedder had to embed

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        todo = [i for i, t in enumerate(texts) if t not in self._vectors]
        for i, t in enumerate(texts):
            v = self._vectors.get(t)
            if v is not None:
                out[i] = v
        if todo:
            out[todo] = self.inner.embed([texts[i] for i in todo])
            self.passed_on += len(todo)
        return out


def describe(data: Any) -> str:
    """One line on what a LabelledSet holds."""
    pairs = len(data.gold)
    yes = sum(data.gold.values())
    return f"{len(data.conversations)} conversations, {pairs} labelled pairs ({yes} yes, {pairs - yes} no)"
