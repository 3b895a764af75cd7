"""Classify a batch of conversations: chunk -> embed -> store -> retrieve evidence -> cascade.

One call handles a whole batch: a single embedder call for every chunk text of the batch that the
reuse cache does not hold, one store round trip for the upsert and one for all evidence queries,
stage 1 for every question at once. Model work runs in a worker thread so the caller's event
loop keeps serving.
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
from agents.embedding_cache import EmbeddingCache
from agents.evidence import EvidenceRequest, EvidenceStore, rank_in_memory
from agents.questions import OPEN, Question, QuestionSet
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


def embed_conversations(
    embedder: Embedder, convs: Sequence[Conversation], cache: EmbeddingCache | None = None
) -> list[EmbeddedConversation]:
    """Chunk every conversation and embed all chunks in one embedder call."""
    return embed_batch(embedder, convs, cache)[0]


def embed_batch(
    embedder: Embedder, convs: Sequence[Conversation], cache: EmbeddingCache | None = None
) -> tuple[list[EmbeddedConversation], int]:
    """(embedded conversations, texts run through the embedder).

    The embedder sees each chunk without the sentences that address the model
    (`models.llm.guard`): otherwise an injected "answer yes" changes which chunks retrieval
    picks, and so the LLM's evidence, even though the guard strips it from the prompt. The
    chunks themselves (stored, published as evidence) keep the original text.

    With a cache, only texts it does not hold are embedded, each distinct text once; the
    embedder is batch-independent, so the vectors are the ones a from-scratch call gives."""
    chunked = [chunk_turns(c.turns) for c in convs]
    texts = [strip_instructions(ch.text)[0] for chunks in chunked for ch in chunks]
    vectors = np.zeros((len(texts), embedder.dim), np.float32)
    if cache is None:
        todo = texts
        if texts:
            vectors[:] = embedder.embed(texts)
    else:
        found = cache.get_many(embedder.model_id, texts)
        missing: dict[str, list[int]] = {}
        for i, (text, v) in enumerate(zip(texts, found, strict=True)):
            if v is None:
                missing.setdefault(text, []).append(i)
            else:
                vectors[i] = v
        todo = list(missing)
        if todo:
            fresh = embedder.embed(todo)
            for rows, v in zip(missing.values(), fresh, strict=True):
                vectors[rows] = v
            cache.put_many(embedder.model_id, todo, fresh)
    out, pos = [], 0
    for conv, chunks in zip(convs, chunked, strict=True):
        out.append(EmbeddedConversation(conv, chunks, vectors[pos : pos + len(chunks)]))
        pos += len(chunks)
    return out, len(todo)


EmbedCounter = Callable[[int, int], None]  # (chunk texts of a call, of those run through the embedder)


def asked_questions(convs: Sequence[Conversation], questions: QuestionSet) -> list[set[str]]:
    """The ids of the questions each conversation answers: those that apply to it, and for an
    open revision only the real-time ones."""
    return [{q.id for q in questions.questions if q.applies(c.metadata) and q.asked_at(c.status)} for c in convs]


def needs_work(conv: Conversation, asked: set[str]) -> bool:
    """An open revision with nothing to answer costs no model work: it is neither embedded nor
    stored (its closing revision will be). Every other revision is."""
    return bool(asked) or conv.status != OPEN


class Pipeline:
    def __init__(
        self,
        embedder: Embedder,
        store: EvidenceStore,
        cascade: Cascade,
        executor: ThreadPoolExecutor | None = None,
        cache: EmbeddingCache | None = None,
        on_embed: EmbedCounter | None = None,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.cascade = cascade
        self.cache = cache  # None: every chunk text is embedded again (reuse off)
        self.on_embed = on_embed
        # One worker: model calls are already multi-threaded inside ONNX Runtime / torch.
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="models")
        self._query_vectors: dict[tuple[str, int, str], np.ndarray] = {}

    async def _in_worker(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _embed(self, convs: Sequence[Conversation]) -> list[EmbeddedConversation]:
        embedded, texts_embedded = embed_batch(self.embedder, convs, self.cache)
        if self.on_embed is not None:
            self.on_embed(sum(len(e.chunks) for e in embedded), texts_embedded)
        return embedded

    def _queries(self, questions: Sequence[Question]) -> np.ndarray:
        if not questions:
            return np.zeros((0, self.embedder.dim), np.float32)
        missing = [q for q in questions if (q.id, q.version, q.retrieval_text) not in self._query_vectors]
        if missing:
            vecs = self.embedder.embed([q.retrieval_text for q in missing])
            for q, v in zip(missing, vecs, strict=True):
                self._query_vectors[(q.id, q.version, q.retrieval_text)] = v
        return np.stack([self._query_vectors[(q.id, q.version, q.retrieval_text)] for q in questions])

    def _stage1(
        self, plan: list[tuple[Question, list[int]]], embedded: list[EmbeddedConversation]
    ) -> list[Stage1Result]:
        return self.cascade.stage1(plan, embedded)

    async def embed(
        self, convs: Sequence[Conversation], questions: QuestionSet | None = None
    ) -> list[EmbeddedConversation]:
        """Chunk and embed, in the worker: the model work of a batch, which a caller that retries
        may keep (`embedded=` below). With `questions`, a revision that needs no model work
        (`needs_work`) stands as a conversation without chunks."""
        work = list(range(len(convs)))
        if questions is not None:
            work = [i for i, (c, a) in enumerate(zip(convs, asked_questions(convs, questions), strict=True))
                    if needs_work(c, a)]
        out = [EmbeddedConversation(c, [], np.zeros((0, self.embedder.dim), np.float32)) for c in convs]
        if work:
            for i, ec in zip(work, await self._in_worker(self._embed, [convs[i] for i in work]), strict=True):
                out[i] = ec
        return out

    async def classify(
        self,
        convs: Sequence[Conversation],
        questions: QuestionSet,
        timer: StageTimer | None = None,
        embedded: Sequence[EmbeddedConversation] | None = None,
    ) -> BatchResult:
        """`embedded`: the conversations' `embed()` results from an earlier attempt, if kept."""
        t = time.perf_counter()
        if embedded is None:
            embedded = await self.embed(convs, questions)
            t = _lap(timer, "embed", t)
        embedded = list(embedded)
        asked = asked_questions(convs, questions)
        done = [embedded[i] for i, c in enumerate(convs) if needs_work(c, asked[i])]
        await self.store.upsert(done, self.embedder.model_id)
        _lap(timer, "store", t)
        result = await self.answer(embedded, questions, timer)
        newest: dict[tuple[str, str], int] = {}
        for ec in done:
            c = ec.conversation
            newest[(c.tenant_id, c.conversation_id)] = max(newest.get((c.tenant_id, c.conversation_id), 0), c.revision)
        if len(newest) < len(done):  # a growing chat's revisions in one batch: keep only the newest stored
            await self.store.prune([(*k, r) for k, r in newest.items()])
        return result

    async def answer(
        self,
        embedded: Sequence[EmbeddedConversation],
        questions: QuestionSet,
        timer: StageTimer | None = None,
        evidence_in_memory: bool = False,
    ) -> BatchResult:
        """Retrieve evidence and run the cascade for conversations whose chunks are stored already
        (just upserted by `classify`, or read back from the store by a backfill): the answers of
        each conversation, in question order, for the questions that apply to it.

        `evidence_in_memory` ranks the conversations' own vectors in the worker thread instead of
        asking the store: the same ranking, without a database round trip per question (for
        conversations loaded with their stored vectors)."""
        t = time.perf_counter()
        embedded = list(embedded)
        asked = asked_questions([e.conversation for e in embedded], questions)
        plan: list[tuple[Question, list[int]]] = []
        for q in questions.questions:
            idx = [i for i, e in enumerate(embedded) if q.id in asked[i] and e.chunks]
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

        stage1 = await self._in_worker(self._stage1, plan, embedded)
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
        return BatchResult(answers, embedded, [(q, idx, s1) for (q, idx), s1 in zip(plan, stage1, strict=True)])


def _lap(timer: StageTimer | None, stage: str, since: float) -> float:
    now = time.perf_counter()
    if timer is not None:
        timer(stage, now - since)
    return now
