"""Plain data passed between pipeline stages. No Kafka here: `stream` converts events to these."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from agents.chunking import Chunk, Turn


@dataclass(frozen=True, slots=True)
class Conversation:
    tenant_id: str
    conversation_id: str
    revision: int
    turns: tuple[Turn, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "closed"  # a chat is published "open" as it grows, then "closed"
    occurred_at: datetime | None = None


@dataclass(slots=True)
class EmbeddedConversation:
    """A conversation with its chunks and their embeddings (rows L2-normalised, aligned with chunks)."""

    conversation: Conversation
    chunks: list[Chunk]
    vectors: np.ndarray


@dataclass(frozen=True, slots=True)
class Evidence:
    chunk_id: str
    turn_ids: tuple[str, ...]
    char_start: int
    char_end: int
    text: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id,
            "turn_ids": list(self.turn_ids),
            "char_start": self.char_start,
            "char_end": self.char_end,
            "text": self.text,
            "score": round(self.score, 4),
        }


@dataclass(frozen=True, slots=True)
class Answer:
    question_id: str
    question_version: int
    answer: str  # "yes" | "no"
    p_yes: float
    decided_by: str  # head | few-shot | similarity | llm | cache | *-fallback
    evidence: tuple[Evidence, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "question_id": self.question_id,
            "question_version": self.question_version,
            "answer": self.answer,
            "p_yes": round(self.p_yes, 4),
            "decided_by": self.decided_by,
            "evidence": [e.as_dict() for e in self.evidence],
        }
