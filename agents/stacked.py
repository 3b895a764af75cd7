"""A batch's chunk vectors stacked in one matrix, with per-conversation reductions over its rows.

Stage 1 scores every chunk of a batch against every question (or phrase, or head) in one matrix
product, then reduces each conversation's rows: mean, max, the mean of its best rows, the max of
its last rows. The reductions are exact per conversation, so a conversation's result does not
depend on its batch-mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agents.types import EmbeddedConversation

# Conversations padded into one (conversations, longest, columns) block at a time: bounds the
# memory of `top_mean` when training stacks tens of thousands of conversations.
_BLOCK = 256


def rowwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b``, each output row computed from its own row of `a` alone, in a fixed order.

    BLAS picks its kernel by the matrices' shapes, so ``a @ b`` can round a row differently when
    other rows stand beside it; a conversation's answers must not depend on its batch-mates.
    einsum's loops do not block by shape (and are as fast at stage 1's sizes)."""
    return np.einsum("ij,jk->ik", a, b)


def _starts(counts: np.ndarray) -> np.ndarray:
    """First row of each conversation, given its row count."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts


@dataclass(frozen=True, slots=True)
class StackedChunks:
    vectors: np.ndarray  # (chunks, dim): every conversation's rows, in conversation order
    starts: np.ndarray  # (conversations,) first row of each conversation
    counts: np.ndarray  # (conversations,) rows of each conversation (0 for none)

    @classmethod
    def of(cls, convs: Sequence[EmbeddedConversation], dim: int | None = None) -> StackedChunks:
        counts = np.fromiter((len(c.vectors) for c in convs), np.int64, count=len(convs))
        starts = _starts(counts)
        mats = [c.vectors for c in convs if len(c.vectors)]
        if mats:
            vectors = np.concatenate(mats).astype(np.float32, copy=False)
        else:
            vectors = np.zeros((0, dim or 0), np.float32)
        return cls(vectors, starts, counts)

    def select(self, keep: np.ndarray) -> StackedChunks:
        """The rows where `keep` (a boolean per row) holds, still grouped by conversation: one
        side of every conversation at once. A conversation with no kept row reduces to 0."""
        owner = np.repeat(np.arange(len(self.counts)), self.counts)
        counts = np.bincount(owner[keep], minlength=len(self.counts)).astype(np.int64)
        return StackedChunks(self.vectors[keep], _starts(counts), counts)

    def __len__(self) -> int:
        return len(self.counts)

    def _nonempty(self) -> np.ndarray:
        return np.flatnonzero(self.counts)

    def mean(self, rows: np.ndarray) -> np.ndarray:
        """(conversations, columns): mean of each conversation's rows of `rows` (0 for none)."""
        out = np.zeros((len(self), rows.shape[1]), rows.dtype)
        idx = self._nonempty()
        if len(idx):
            sums = np.add.reduceat(rows, self.starts[idx], axis=0)
            out[idx] = sums / self.counts[idx, None].astype(rows.dtype)
        return out

    def max(self, rows: np.ndarray) -> np.ndarray:
        """(conversations, columns): max of each conversation's rows (0 for none)."""
        out = np.zeros((len(self), rows.shape[1]), rows.dtype)
        idx = self._nonempty()
        if len(idx):
            out[idx] = np.maximum.reduceat(rows, self.starts[idx], axis=0)
        return out

    def tail_max(self, rows: np.ndarray, last: int) -> np.ndarray:
        """(conversations, columns): max over each conversation's `last` final rows (0 for none)."""
        out = np.zeros((len(self), rows.shape[1]), rows.dtype)
        idx = self._nonempty()
        if len(idx):
            end = self.starts[idx] + self.counts[idx]
            out[idx] = rows[end - 1]
            for back in range(2, last + 1):
                r = np.maximum(end - back, self.starts[idx])
                out[idx] = np.maximum(out[idx], rows[r])
        return out

    def top_mean(self, rows: np.ndarray, k: int) -> np.ndarray:
        """(conversations, columns): per column, the mean of each conversation's k largest rows
        (all of them when it has fewer; 0 for none)."""
        n, cols = len(self), rows.shape[1]
        out = np.zeros((n, cols), rows.dtype)
        for lo in range(0, n, _BLOCK):
            counts = self.counts[lo : lo + _BLOCK]
            if not counts.any():
                continue
            width = max(int(counts.max()), k)
            block = np.full((len(counts), width, cols), -np.inf, rows.dtype)
            first = self.starts[lo]
            owner = np.repeat(np.arange(len(counts)), counts)
            pos = np.arange(int(counts.sum())) - np.repeat(self.starts[lo : lo + _BLOCK] - first, counts)
            block[owner, pos] = rows[first : first + int(counts.sum())]
            top = np.sort(block, axis=1)[:, width - k :, :]
            taken = np.minimum(counts, k)
            valid = np.arange(k)[None, :] >= (k - taken)[:, None]
            sums = np.where(valid[:, :, None], top, 0).sum(axis=1)
            out[lo : lo + _BLOCK] = sums / np.maximum(taken, 1)[:, None].astype(rows.dtype)
        return out
