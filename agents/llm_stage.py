"""The cascade's LLM stage: P(yes) from an LLM that reads only the question and its evidence.

For a batch of uncertain (question, evidence) items the stage

1. builds one prompt per item with the shared prompt library (``yes_no`` template: fixed
   instructions, the evidence texts quoted and delimited, the question last), never the whole
   conversation;
2. looks every item up in the result cache (memory LRU, then the shared Postgres table);
   duplicates within the batch are scored once;
3. sends the misses through a ``BatchScheduler``, which merges them with whatever other
   conversations and questions are waiting into engine batches run on a worker thread;
4. retries failed or timed-out prompts a bounded number of times with exponential backoff, and
   after that reports them as ``llm-fallback``: the cascade then keeps the stage-1 answer,
   marked ``<stage1>-fallback``. ``timeout_s`` is per engine batch: an attempt for n prompts
   waits at most ``timeout_s x ceil(n / max_batch)``, so a stuck engine delays a batch by a
   bounded time but never loses it.

Metrics are callbacks (``on_cache(result, n)``, ``on_fallback(n)``): `agents` knows nothing of
Prometheus; `stream.app` wires them to its counters.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import numpy as np

from agents.questions import Question
from agents.result_cache import CacheKey, ResultCache, cache_key
from agents.types import Evidence
from models.llm.engine import EngineError, YesNoEngine
from models.llm.prompts import PromptLibrary, default_library
from models.llm.scheduler import BatchScheduler

log = logging.getLogger(__name__)

LLM = "llm"
CACHE = "cache"
FALLBACK = "llm-fallback"

CacheCallback = Callable[[str, int], None]  # ("hit" | "miss", count)
FallbackCallback = Callable[[int], None]


class LLMCascadeStage:
    """Implements ``agents.cascade.LLMStage``."""

    def __init__(
        self,
        engine: YesNoEngine,
        *,
        prompts: PromptLibrary | None = None,
        cache: ResultCache | None = None,
        scheduler: BatchScheduler | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        timeout_s: float = 30.0,
        attempts: int = 3,
        backoff_s: float = 0.2,
        on_cache: CacheCallback | None = None,
        on_fallback: FallbackCallback | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.engine = engine
        self.model_id = engine.model_id
        self.prompts = prompts or default_library()
        self.cache = cache if cache is not None else ResultCache()
        self.scheduler = scheduler or BatchScheduler(engine, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.on_cache = on_cache
        self.on_fallback = on_fallback

    # -- keys and prompts -------------------------------------------------------------------------

    def keys(self, items: Sequence[tuple[Question, Sequence[Evidence]]]) -> list[CacheKey]:
        template = self.prompts.get("yes_no")
        return [
            cache_key(
                question_id=q.id,
                question_version=q.version,
                question_text=q.text,
                evidence=[e.text for e in ev],
                model_id=self.model_id,
                template_id=template.template_id,
                template_text=template.text,
            )
            for q, ev in items
        ]

    def prompt(self, question: Question, evidence: Sequence[Evidence]) -> str:
        """Only the question and its evidence texts: no conversation, no metadata."""
        return self.prompts.yes_no(question.text, [e.text for e in evidence])

    # -- the stage --------------------------------------------------------------------------------

    async def p_yes(
        self, items: Sequence[tuple[Question, Sequence[Evidence]]]
    ) -> tuple[np.ndarray, list[str]]:
        n = len(items)
        p = np.full(n, np.nan)
        who = [FALLBACK] * n
        if not n:
            return p, who
        keys = self.keys(items)
        known = await self.cache.get_many(keys)
        # First item of each missing key: the one whose prompt is scored.
        todo: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k.key in known:
                p[i], who[i] = known[k.key], CACHE
            elif k.key not in todo:
                todo[k.key] = i
        hits = n - sum(1 for k in keys if k.key not in known)
        self._count_cache(hits, n - hits)

        if todo:
            firsts = list(todo.values())
            scored = await self._score_with_retries([self.prompt(*items[i]) for i in firsts])
            fresh: dict[CacheKey, float] = {}
            by_key: dict[str, float] = {}
            for i, s in zip(firsts, scored, strict=True):
                if s is not None:
                    fresh[keys[i]] = s
                    by_key[keys[i].key] = s
            for i, k in enumerate(keys):
                if who[i] != CACHE and k.key in by_key:
                    p[i], who[i] = by_key[k.key], LLM
            await self.cache.put_many(fresh)
        failed = who.count(FALLBACK)
        if failed:
            log.warning("LLM stage: %d of %d answers fall back to stage 1", failed, n)
            if self.on_fallback is not None:
                self.on_fallback(failed)
        return p, who

    def _count_cache(self, hits: int, misses: int) -> None:
        if self.on_cache is None:
            return
        if hits:
            self.on_cache("hit", hits)
        if misses:
            self.on_cache("miss", misses)

    async def _score_with_retries(self, prompts: list[str]) -> list[float | None]:
        """P(yes) per prompt, or None for prompts that still failed after every attempt.

        Prompts are separate scheduler requests, so one failed engine batch costs a retry only
        for its own prompts; each attempt waits at most ``timeout_s`` for all pending prompts.
        """
        out: list[float | None] = [None] * len(prompts)
        pending = list(range(len(prompts)))
        for attempt in range(1, self.attempts + 1):
            # ``timeout_s`` bounds one engine batch; an attempt that needs k batches gets k times
            # that, or a large request would time out while merely waiting in the queue.
            budget = self.timeout_s * math.ceil(len(pending) / self.scheduler.max_batch)
            tasks = {asyncio.ensure_future(self.scheduler.score(prompts[i])): i for i in pending}
            done, not_done = await asyncio.wait(tasks, timeout=budget)
            for t in not_done:
                t.cancel()
            if not_done:
                await asyncio.gather(*not_done, return_exceptions=True)
            errors: list[BaseException] = []
            retry: list[int] = []
            for t in tasks:
                i = tasks[t]
                if t in done and not t.cancelled() and t.exception() is None:
                    out[i] = float(t.result())
                    continue
                if t in not_done:
                    errors.append(TimeoutError(f"no answer within {budget:.1f} s"))
                    retry.append(i)
                else:
                    exc = t.exception()
                    assert exc is not None
                    errors.append(exc)
                    # An engine error marked not retriable (bad input, out of memory) will not
                    # succeed again: skip the remaining attempts for that prompt.
                    if not (isinstance(exc, EngineError) and not exc.retriable):
                        retry.append(i)
            if errors:
                log.warning(
                    "LLM stage attempt %d/%d: %d of %d prompts failed (%s)",
                    attempt, self.attempts, len(errors), len(pending), _describe(errors[0]),
                )
            pending = retry
            if not pending:
                break
            if attempt < self.attempts:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        return out

    async def aclose(self) -> None:
        await self.scheduler.close()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def build_llm_stage(
    spec: str,
    *,
    pool: asyncpg.Pool | None = None,
    on_cache: CacheCallback | None = None,
    on_fallback: FallbackCallback | None = None,
    cache_capacity: int = 100_000,
    engine_options: dict[str, Any] | None = None,
    **stage_options: Any,
) -> LLMCascadeStage:
    """Load the engine a spec names and put the stage in front of it.

    Loading a model takes seconds and blocks: call this from a worker thread
    (``await asyncio.to_thread(build_llm_stage, ...)``), as ``stream.app`` does.
    """
    from models.llm.specs import load_engine

    engine = load_engine(spec, **(engine_options or {}))
    cache = ResultCache(cache_capacity, pool)
    return LLMCascadeStage(engine, cache=cache, on_cache=on_cache, on_fallback=on_fallback, **stage_options)
