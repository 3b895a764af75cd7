"""A bounded, content-addressed cache of chunk vectors, shared by every conversation of a process.

Keyed by embedder id and a hash of the exact text the embedder saw, so a turn embedded for
revision 3 of a chat is found again for revision 4, and a turn repeated across conversations
(greetings, macros) is embedded once. The embedder is batch-independent (a text always gets the
same vector), so a cached vector is exactly the vector a fresh call would give, and answers do not
depend on the cache.

Least recently used entries go first once the cache holds `max_bytes`. Each entry is counted at
its vector's bytes plus `ENTRY_OVERHEAD`, which `tests/agents/test_embedding_cache.py` checks
against the memory the cache really holds.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np
from cachetools import LRUCache

# Python's share of an entry beyond the vector's bytes: the key tuple and digest, the array
# object, and the LRU's bookkeeping (measured with tracemalloc: 515-550 bytes at 1-64 MiB).
ENTRY_OVERHEAD = 560
# The default bound of `models.embedding_cache_mb` (stream.config), also what `flexor eval` runs with.
DEFAULT_MB = 64


def text_key(embedder_id: str, text: str) -> tuple[str, bytes]:
    return embedder_id, hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class EmbeddingCache:
    """Thread-safe LRU of vectors bounded by bytes; `hits` and `misses` count lookups."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive (use no cache to turn reuse off)")
        self.max_bytes = max_bytes
        self._lru: LRUCache[tuple[str, bytes], np.ndarray] = LRUCache(
            maxsize=max_bytes, getsizeof=lambda v: v.nbytes + ENTRY_OVERHEAD
        )
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return int(self._lru.currsize)

    def __len__(self) -> int:
        return len(self._lru)

    def get_many(self, embedder_id: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        keys = [text_key(embedder_id, t) for t in texts]
        with self._lock:
            found = [self._lru.get(k) for k in keys]
            hits = sum(v is not None for v in found)
            self.hits += hits
            self.misses += len(found) - hits
        return found

    def put_many(self, embedder_id: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        if vectors.shape[1] * 4 + ENTRY_OVERHEAD > self.max_bytes:
            return  # smaller than one entry: the LRU would refuse it
        with self._lock:
            for t, v in zip(texts, vectors, strict=True):
                # A copy, not a view: a view would keep the whole batch's matrix alive.
                self._lru[text_key(embedder_id, t)] = np.array(v, np.float32, copy=True)
