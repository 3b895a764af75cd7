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
from dataclasses import dataclass

import numpy as np

from agents.cascade import Cascade, Stage1Result
from agents.chunking import chunk_turns
from agents.evidence import EvidenceRequest, EvidenceStore, rank_in_memory
from agents.questions import Question, QuestionSet
from agents.types import Answer, Conversation, EmbeddedConversation
from models.embedder import Embedder
from models.llm.guard import strip_instructions

StageTimer = Callable[[str, float], None]


@dataclass(frozen=True, slots=True)
class BatchResult:
    answers: list[list[Answer]]  # aligned with the input conversations
    embedded: list[EmbeddedConversation]


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

    async def classify(
        self,
        convs: Sequence[Conversation],
        questions: QuestionSet,
        timer: StageTimer | None = None,
    ) -> BatchResult:
        t = time.perf_counter()
        embedded = await self._in_worker(self._embed_conversations, convs)
        t = _lap(timer, "embed", t)
        await self.store.upsert(embedded, self.embedder.model_id)
        _lap(timer, "store", t)
        return BatchResult(await self.answer(embedded, questions, timer), embedded)

    async def answer(
        self,
        embedded: Sequence[EmbeddedConversation],
        questions: QuestionSet,
        timer: StageTimer | None = None,
        evidence_in_memory: bool = False,
    ) -> list[list[Answer]]:
        """Retrieve evidence and run the cascade for conversations whose chunks are stored already
        (just upserted by `classify`, or read back from the store by a backfill): the answers of
        each conversation, in question order, for the questions that apply to it.

        `evidence_in_memory` ranks the conversations' own vectors in the worker thread instead of
        asking the store: the same ranking, without a database round trip per question (for
        conversations loaded with their stored vectors)."""
        t = time.perf_counter()
        plan: list[tuple[Question, list[int]]] = []
        for q in questions.questions:
            idx = [i for i, e in enumerate(embedded) if q.applies(e.conversation.metadata) and e.chunks]
            if idx:
                plan.append((q, idx))
        queries = await self._in_worker(self._queries, [q for q, _ in plan])
        requests = [
            EvidenceRequest(conv=i, query=qi, k=q.top_k, speakers=tuple(q.speakers))
            for qi, (q, idx) in enumerate(plan)
            for i in idx
        ]
        if evidence_in_memory:
            evidence = await self._in_worker(rank_in_memory, embedded, queries, requests)
        else:
            evidence = await self.store.top_k(embedded, queries, requests)
        t = _lap(timer, "retrieve", t)

        stage1 = await self._in_worker(self._stage1, plan, list(embedded))
        t = _lap(timer, "stage1", t)
        per_question, pos = [], 0
        for (q, idx), s1 in zip(plan, stage1, strict=True):
            per_question.append((q, s1, evidence[pos : pos + len(idx)]))
            pos += len(idx)
        decisions = await self.cascade.decide(per_question)
        _lap(timer, "cascade", t)

        answers: list[list[Answer]] = [[] for _ in embedded]
        for (q, idx), (_, _, ev), ds in zip(plan, per_question, decisions, strict=True):
            for i, e, d in zip(idx, ev, ds, strict=True):
                answers[i].append(Answer(q.id, q.version, d.answer, d.p_yes, d.decided_by, tuple(e)))
        return answers


def _lap(timer: StageTimer | None, stage: str, since: float) -> float:
    now = time.perf_counter()
    if timer is not None:
        timer(stage, now - since)
    return now
