"""Classify a batch of conversations: chunk -> embed -> store -> retrieve evidence -> cascade.

One call handles a whole batch: a single embedder call for every chunk of every conversation,
one store round trip for the upsert and one for all evidence queries, stage 1 vectorised per
question. Model work runs in a worker thread so the caller's event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from agents.cascade import Cascade, Stage1Result
from agents.chunking import chunk_turns
from agents.evidence import EvidenceRequest, EvidenceStore
from agents.questions import Question, QuestionSet
from agents.types import Answer, Conversation, EmbeddedConversation
from models.embedder import Embedder
from models.llm.guard import strip_instructions

StageTimer = Callable[[str, float], None]


@dataclass(frozen=True, slots=True)
class BatchResult:
    answers: list[list[Answer]]  # aligned with the input conversations
    embedded: list[EmbeddedConversation]
    # Per question: the indices of the conversations it applied to and stage 1's scores for them
    # (before the LLM), for the monitors (`agents.monitor`).
    stage1: list[tuple[Question, list[int], Stage1Result]] = field(default_factory=list)


def embed_conversations(embedder: Embedder, convs: Sequence[Conversation]) -> list[EmbeddedConversation]:
    """Chunk every conversation and embed all chunks in one embedder call.

    The embedder sees each chunk without the sentences that address the model
    (`models.llm.guard`): otherwise an injected "answer yes" changes which chunks retrieval
    picks, and so the LLM's evidence, even though the guard strips it from the prompt. The
    chunks themselves (stored, published as evidence) keep the original text."""
    chunked = [chunk_turns(c.turns) for c in convs]
    texts = [strip_instructions(ch.text)[0] for chunks in chunked for ch in chunks]
    vectors = embedder.embed(texts) if texts else np.zeros((0, embedder.dim), np.float32)
    out, pos = [], 0
    for conv, chunks in zip(convs, chunked, strict=True):
        out.append(EmbeddedConversation(conv, chunks, vectors[pos : pos + len(chunks)]))
        pos += len(chunks)
    return out


class Pipeline:
    def __init__(
        self,
        embedder: Embedder,
        store: EvidenceStore,
        cascade: Cascade,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.cascade = cascade
        # One worker: model calls are already multi-threaded inside ONNX Runtime / torch.
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="models")
        self._query_vectors: dict[tuple[str, int, str], np.ndarray] = {}

    async def _in_worker(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _embed_conversations(self, convs: Sequence[Conversation]) -> list[EmbeddedConversation]:
        return embed_conversations(self.embedder, convs)

    def _queries(self, questions: Sequence[Question]) -> np.ndarray:
        missing = [q for q in questions if (q.id, q.version, q.retrieval_text) not in self._query_vectors]
        if missing:
            vecs = self.embedder.embed([q.retrieval_text for q in missing])
            for q, v in zip(missing, vecs, strict=True):
                self._query_vectors[(q.id, q.version, q.retrieval_text)] = v
        return np.stack([self._query_vectors[(q.id, q.version, q.retrieval_text)] for q in questions])

    def _stage1(
        self, plan: list[tuple[Question, list[int]]], embedded: list[EmbeddedConversation]
    ) -> list[Stage1Result]:
        return [self.cascade.stage1(q, [embedded[i] for i in idx]) for q, idx in plan]

    async def embed(self, convs: Sequence[Conversation]) -> list[EmbeddedConversation]:
        """Chunk and embed, in the worker: the model work of a batch, which a caller that retries
        may keep (`embedded=` below)."""
        return await self._in_worker(self._embed_conversations, convs)

    async def classify(
        self,
        convs: Sequence[Conversation],
        questions: QuestionSet,
        timer: StageTimer | None = None,
        embedded: Sequence[EmbeddedConversation] | None = None,
    ) -> BatchResult:
        """`embedded`: the conversations' `embed()` results from an earlier attempt, if kept."""

        def lap(stage: str, since: float) -> float:
            now = time.perf_counter()
            if timer is not None:
                timer(stage, now - since)
            return now

        t = time.perf_counter()
        if embedded is None:
            embedded = await self.embed(convs)
            t = lap("embed", t)
        embedded = list(embedded)
        await self.store.upsert(embedded, self.embedder.model_id)
        t = lap("store", t)

        plan: list[tuple[Question, list[int]]] = []
        for q in questions.questions:
            idx = [i for i, c in enumerate(convs) if q.applies(c.metadata) and embedded[i].chunks]
            if idx:
                plan.append((q, idx))
        queries = await self._in_worker(self._queries, [q for q, _ in plan])
        requests = [
            EvidenceRequest(conv=i, query=qi, k=q.top_k, speakers=tuple(q.speakers))
            for qi, (q, idx) in enumerate(plan)
            for i in idx
        ]
        evidence = await self.store.top_k(embedded, queries, requests)
        t = lap("retrieve", t)

        stage1 = await self._in_worker(self._stage1, plan, embedded)
        t = lap("stage1", t)
        per_question, pos = [], 0
        for (q, idx), s1 in zip(plan, stage1, strict=True):
            per_question.append((q, s1, evidence[pos : pos + len(idx)]))
            pos += len(idx)
        decisions = await self.cascade.decide(per_question)
        lap("cascade", t)

        answers: list[list[Answer]] = [[] for _ in convs]
        for (q, idx), (_, _, ev), ds in zip(plan, per_question, decisions, strict=True):
            for i, e, d in zip(idx, ev, ds, strict=True):
                answers[i].append(Answer(q.id, q.version, d.answer, d.p_yes, d.decided_by, tuple(e)))
        return BatchResult(answers, embedded, [(q, idx, s1) for (q, idx), s1 in zip(plan, stage1, strict=True)])
