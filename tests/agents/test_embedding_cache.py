"""The reuse cache: bounded by bytes (counted and really held), least recently used out first,
keyed by embedder and text, and shared across the conversations of a batch."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np

from agents.chunking import Turn
from agents.embedding_cache import ENTRY_OVERHEAD, EmbeddingCache
from agents.pipeline import embed_batch
from agents.types import Conversation
from models.embedder import DIM, load_embedder


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def test_cache_stays_within_its_bound_in_real_memory() -> None:
    bound = 4 * 2**20
    EmbeddingCache(bound).put_many("m", ["warm"], vectors(1, 0))  # imports happen outside the count
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = EmbeddingCache(bound)
        for batch in range(12):  # about three times what fits
            texts = [f"window {batch}-{i}" for i in range(500)]
            cache.put_many("m", texts, vectors(500, batch))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.bytes <= bound
    assert len(cache) > 0.9 * bound / (DIM * 4 + ENTRY_OVERHEAD)  # full, not emptied
    assert held <= bound * 1.05, f"the cache holds {held} bytes for a bound of {bound}"


def test_least_recently_used_go_first_and_keys_include_the_embedder() -> None:
    entry = DIM * 4 + ENTRY_OVERHEAD
    cache = EmbeddingCache(10 * entry)
    v = vectors(12, 0)
    cache.put_many("m", [f"t{i}" for i in range(10)], v[:10])
    assert cache.get_many("m", ["t0"])[0] is not None  # t0 is now the most recently used
    cache.put_many("m", ["t10", "t11"], v[10:])
    found = cache.get_many("m", ["t0", "t1", "t2", "t3", "t11"])
    assert [f is not None for f in found] == [True, False, False, True, True]
    np.testing.assert_array_equal(found[0], v[0])
    assert cache.get_many("other-embedder", ["t0"]) == [None]
    assert (cache.hits, cache.misses) == (4, 3)


def test_repeated_turns_are_embedded_once_across_conversations() -> None:
    embedder = load_embedder("onnx-int8")
    greeting = (Turn("t1", "agent", "Hello, how can I help?"), Turn("t2", "customer", "Hi"),
                Turn("t3", "agent", "Could I get your name, please?"))
    a = Conversation("t", "a", 1, (*greeting, Turn("t4", "customer", "I was charged twice")))
    b = Conversation("t", "b", 1, (*greeting, Turn("t4", "customer", "Please cancel my plan")))
    cache = EmbeddingCache(2**20)
    (ea, eb), embedded = embed_batch(embedder, [a, b], cache)
    # one chunk per turn: a = [t1, t2, t3, t4], b = [t1, t2, t3, t4']: five distinct texts
    assert embedded == 5 and (cache.hits, cache.misses) == (0, 8)
    np.testing.assert_array_equal(ea.vectors[:3], eb.vectors[:3])
    (again,), embedded = embed_batch(embedder, [a], cache)
    assert embedded == 0 and cache.hits == 4
    (fresh,), _ = embed_batch(embedder, [a])
    np.testing.assert_array_equal(again.vectors, fresh.vectors)
