"""The yes/no engine protocol every LLM backend implements, its error type and token accounting.

An engine answers a batch of fully built prompts: ``score`` returns P(yes) from the next-token
log-probabilities of the answer tokens (always one output token), ``generate`` decodes greedily
(only the seed baseline uses it) and ``count_tokens`` counts prompt tokens for the benchmark.
Every engine builds prompts with ``models.llm.prompts`` and parses answers with
``models.llm.answer_tokens``, so the backends differ only in how they run the model.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class EngineError(RuntimeError):
    """An engine failed. ``retriable`` says whether the same call may succeed later."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


@runtime_checkable
class YesNoEngine(Protocol):
    model_id: str
    stats: EngineStats

    def score(self, prompts: list[str]) -> np.ndarray:
        """P(yes) per prompt, float64 in [0, 1], renormalised over the yes + no probability mass."""
        ...

    def generate(self, prompts: list[str], max_tokens: int = 64) -> list[str]:
        """Greedy continuations (new text only), at most ``max_tokens`` tokens each."""
        ...

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Prompt tokens per prompt, as the engine's tokenizer counts them."""
        ...


@dataclass
class StatsSnapshot:
    calls: int = 0
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def __sub__(self, other: StatsSnapshot) -> StatsSnapshot:
        return StatsSnapshot(*(a - b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))


class EngineStats:
    """Thread-safe running totals of what an engine was asked to do (token accounting)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = StatsSnapshot()

    def add(self, *, prompts: int, prompt_tokens: int, generated_tokens: int) -> None:
        with self._lock:
            t = self._totals
            t.calls += 1
            t.prompts += prompts
            t.prompt_tokens += prompt_tokens
            t.generated_tokens += generated_tokens

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(**asdict(self._totals))


def check_probabilities(p: np.ndarray, n: int) -> np.ndarray:
    """Every engine's last step: shape (n,), float64, finite, clipped into [0, 1]."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if p.shape != (n,):
        raise EngineError(f"engine returned {p.shape[0]} scores for {n} prompts")
    if not np.all(np.isfinite(p)):
        raise EngineError("engine returned a non-finite P(yes)")
    return np.clip(p, 0.0, 1.0)
