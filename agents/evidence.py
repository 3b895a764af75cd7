"""Evidence: the store contract (chunks with embeddings, exact top-k within one conversation).

The service's store is `agents.store.chunks.PgEvidenceStore` (Postgres + pgvector).
`MemoryEvidenceStore` gives the same ranking (cosine distance, then chunk order) without a
database, for `flexor eval`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agents.chunking import Chunk
from agents.types import EmbeddedConversation, Evidence


@dataclass(frozen=True, slots=True)
class EvidenceRequest:
    conv: int  # index into the batch's conversations
    query: int  # index into the batch's query vectors
    k: int
    speakers: tuple[str, ...] = ()  # a chunk qualifies when any of its turns is by one of these


def chunk_id(conversation_id: str, revision: int, seq: int) -> str:
    return f"{conversation_id}:{revision}:{seq}"


class EvidenceStore(Protocol):
    async def upsert(self, convs: Sequence[EmbeddedConversation], embedder_id: str) -> None: ...

    async def prune(self, newest: Sequence[tuple[str, str, int]]) -> None:
        """Drop stored chunks of revisions older than (tenant, conversation, revision): a batch
        that held several revisions of one conversation needed them all until its retrieval."""
        ...

    async def top_k(
        self,
        convs: Sequence[EmbeddedConversation],
        queries: np.ndarray,
        requests: Sequence[EvidenceRequest],
    ) -> list[list[Evidence]]: ...


def to_evidence(conv: EmbeddedConversation, chunk: Chunk, score: float) -> Evidence:
    c = conv.conversation
    return Evidence(
        chunk_id=chunk_id(c.conversation_id, c.revision, chunk.seq),
        turn_ids=chunk.turn_ids,
        char_start=chunk.char_start,
        char_end=chunk.char_end,
        text=chunk.text,
        score=score,
    )


def rank_in_memory(
    convs: Sequence[EmbeddedConversation], queries: np.ndarray, requests: Sequence[EvidenceRequest]
) -> list[list[Evidence]]:
    """Exact top-k from the conversations' own vectors, ranked as pgvector ranks them (cosine
    distance, then chunk order)."""
    out = []
    for r in requests:
        conv = convs[r.conv]
        sims = conv.vectors @ queries[r.query]
        allowed = [
            i
            for i, ch in enumerate(conv.chunks)
            if not r.speakers or any(s in r.speakers for s in ch.speakers)
        ]
        allowed.sort(key=lambda i: (1.0 - float(sims[i]), i))
        out.append([to_evidence(conv, conv.chunks[i], float(sims[i])) for i in allowed[: r.k]])
    return out


class MemoryEvidenceStore:
    async def upsert(self, convs: Sequence[EmbeddedConversation], embedder_id: str) -> None:
        return None  # the batch's own vectors are the store

    async def prune(self, newest: Sequence[tuple[str, str, int]]) -> None:
        return None

    async def top_k(
        self,
        convs: Sequence[EmbeddedConversation],
        queries: np.ndarray,
        requests: Sequence[EvidenceRequest],
    ) -> list[list[Evidence]]:
        return rank_in_memory(convs, queries, requests)
