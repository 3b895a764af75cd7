"""On-disk embedding cache keyed by embedder id and text hash, behind the `Embedder` protocol.

``CachingEmbedder(inner).embed(texts)`` returns cached rows for texts seen before and embeds
only the rest (one batched call), appending them as a new segment file. Evaluation reruns and
training experiments therefore embed the 20k-conversation corpus once.

Layout: ``<cache>/embeddings/<embedder id>/seg-*.npz`` each holding ``keys`` (n, 16) uint8
(blake2b-128 of the UTF-8 text) and ``vecs`` (n, dim) float32. Segments are written atomically
(tmp file + rename), so concurrent writers at worst embed a text twice.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.embedder import Embedder, cache_dir


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def embeddings_dir(model_id: str, root: Path | None = None) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)
    return (root or cache_dir()) / "embeddings" / safe


class CachingEmbedder:
    """Wraps an embedder; same `model_id` and `dim`, so answers do not depend on the cache."""

    def __init__(self, inner: Embedder, root: Path | None = None, min_segment: int = 1) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        self.dir = embeddings_dir(inner.model_id, root)
        self.min_segment = min_segment
        self._index: dict[bytes, int] = {}
        self._blocks: list[np.ndarray] = []
        self._rows = 0
        self._pending_keys: list[bytes] = []
        self._pending_vecs: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._load()

    def _load(self) -> None:
        if not self.dir.exists():
            return
        for seg in sorted(self.dir.glob("seg-*.npz")):
            try:
                with np.load(seg) as z:
                    keys, vecs = z["keys"], z["vecs"]
            except (OSError, ValueError, KeyError):
                continue  # a torn or foreign file: ignore, its texts get embedded again
            self._add(keys, vecs)

    def _add(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        base = self._rows
        for i, k in enumerate(keys):
            self._index.setdefault(bytes(k), base + i)
        self._blocks.append(np.asarray(vecs, np.float32))
        self._rows += len(vecs)
        if len(self._blocks) > 64:  # keep lookups cheap
            self._blocks = [np.concatenate(self._blocks)]

    def _matrix(self) -> np.ndarray:
        if len(self._blocks) > 1:
            self._blocks = [np.concatenate(self._blocks)]
        return self._blocks[0] if self._blocks else np.zeros((0, self.dim), np.float32)

    def __len__(self) -> int:
        return len(self._index)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        keys = [text_key(t) for t in texts]
        with self._lock:
            rows = [self._index.get(k, -1) for k in keys]
            hit = np.array([r >= 0 for r in rows])
            if hit.any():
                mat = self._matrix()
                out[hit] = mat[np.array([r for r in rows if r >= 0])]
        missing: dict[bytes, list[int]] = {}
        for i, (k, h) in enumerate(zip(keys, hit, strict=True)):
            if not h:
                missing.setdefault(k, []).append(i)
        self.hits += int(hit.sum())
        self.misses += len(texts) - int(hit.sum())
        if missing:
            first = [idx[0] for idx in missing.values()]
            vecs = self.inner.embed([texts[i] for i in first])
            for v, idx in zip(vecs, missing.values(), strict=True):
                out[idx] = v
            new_keys = np.frombuffer(b"".join(missing.keys()), np.uint8).reshape(-1, 16)
            with self._lock:
                self._add(new_keys, vecs)
                self._pending_keys.extend(missing.keys())
                self._pending_vecs.append(vecs)
                if len(self._pending_keys) >= self.min_segment:
                    self._flush_locked()
        return out

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending_keys:
            return
        keys = np.frombuffer(b"".join(self._pending_keys), np.uint8).reshape(-1, 16)
        vecs = np.concatenate(self._pending_vecs)
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"seg-{time.time_ns():020d}-{os.getpid()}"
        tmp = self.dir / f"{name}.tmp.npz"
        np.savez(tmp, keys=keys, vecs=vecs)
        os.replace(tmp, self.dir / f"{name}.npz")
        self._pending_keys, self._pending_vecs = [], []
