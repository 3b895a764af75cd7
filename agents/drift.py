"""Drift: how far recent stage-1 answers have moved from the head's training data.

`flexor train` stores per question a reference: the histogram of p_yes over 10 equal-width bins
and the yes-rate, from the head's out-of-fold scores on its training rows (a few-shot head: its
scores on the dataset's unlabelled conversations), i.e. what the head outputs on data it has not
seen. The service keeps the same over a sliding window of the last `window` answers per question
and reports the population stability index against the reference:

    PSI = sum over bins of (actual - expected) * ln(actual / expected)

Rules of thumb: below 0.1 no shift, 0.1-0.2 a moderate one, above 0.2 a shift worth a look.

Both sides are finite samples, and PSI's log ratio makes a bin that happens to be empty in one of
them count heavily: with shares floored at 1e-4, one answer of 200 in a bin where 311 training
rows had none adds 0.02. So both sides get the same pseudo-share added to every bin, half an
answer of the smaller sample (the Jeffreys prior's half count), and are renormalised: identical
shares still give 0, and on the project's data the PSI of an unshifted 200-answer window fell
from 0.20 to 0.07 (fraud question; 0.012 on the whole evaluation split) while a real shift
still reads above 8. What noise is left is about (bins - 1) x (1 / window + 1 / reference rows),
so PSI is reported only once the window holds `min_answers`.

Equal-width bins, not reference deciles: calibrated heads put most answers on a few isotonic
steps near 0, where quantile edges would collapse into one another.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.questions import Question

BINS = 10
FLOOR = 1e-4
PSEUDO_COUNT = 0.5


def bin_of(p: np.ndarray) -> np.ndarray:
    """Bin index per p_yes: [0, 0.1) -> 0, ..., [0.9, 1.0] -> 9."""
    return np.clip((np.asarray(p, np.float64) * BINS).astype(np.int64), 0, BINS - 1)


def shares(p: np.ndarray) -> np.ndarray:
    counts = np.bincount(bin_of(p), minlength=BINS).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.maximum(np.asarray(expected, np.float64), FLOOR)
    a = np.maximum(np.asarray(actual, np.float64), FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def sample_psi(expected: np.ndarray, n_expected: int, actual: np.ndarray, n_actual: int) -> float:
    """PSI between the shares of two samples of n_expected and n_actual answers, both smoothed
    with the same pseudo-share (see the module's docstring)."""
    eps = PSEUDO_COUNT / max(min(n_expected, n_actual), 1)
    return psi((np.asarray(expected) + eps) / (1 + eps * BINS), (np.asarray(actual) + eps) / (1 + eps * BINS))


@dataclass(frozen=True)
class Reference:
    p_yes: np.ndarray  # share of answers per bin
    yes_rate: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"bins": BINS, "p_yes": [round(float(v), 6) for v in self.p_yes], "yes_rate": round(self.yes_rate, 6),
                "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reference:
        if d.get("bins") != BINS or len(d.get("p_yes", ())) != BINS:
            raise ValueError(f"drift reference has {d.get('bins')} bins, this build uses {BINS}")
        return cls(np.asarray(d["p_yes"], np.float64), float(d["yes_rate"]), int(d["n"]))


def reference(p_yes: np.ndarray, threshold: float) -> Reference:
    """The reference for scores `p_yes` of a head whose decision threshold is `threshold`."""
    p = np.asarray(p_yes, np.float64)
    return Reference(shares(p), float(np.mean(p >= threshold)) if len(p) else 0.0, len(p))


def load_references(heads_dir: str | Path) -> dict[str, Reference]:
    """Head id -> reference, from the manifest `flexor train` wrote (heads trained before it
    stored references have none: their questions get a yes-rate but no PSI)."""
    manifest = json.loads((Path(heads_dir) / "manifest.json").read_text())
    out = {}
    for entry in manifest.get("questions", {}).values():
        if entry.get("head") and entry.get("reference"):
            out[entry["head"]] = Reference.from_dict(entry["reference"])
    return out


class Window:
    """The last `size` answers of one question: bin counts and yes count, updated per answer."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._bins: deque[int] = deque()
        self._yes: deque[bool] = deque()
        self.counts = np.zeros(BINS, np.int64)
        self.yes = 0

    def __len__(self) -> int:
        return len(self._bins)

    def add(self, bins: np.ndarray, yes: np.ndarray) -> None:
        for b, y in zip(bins.tolist(), yes.tolist(), strict=True):
            if len(self._bins) == self.size:
                self.counts[self._bins.popleft()] -= 1
                self.yes -= self._yes.popleft()
            self._bins.append(b)
            self._yes.append(y)
            self.counts[b] += 1
            self.yes += y

    @property
    def shares(self) -> np.ndarray:
        return self.counts / max(len(self), 1)

    @property
    def yes_rate(self) -> float:
        return self.yes / max(len(self), 1)


@dataclass(frozen=True)
class Reading:
    question_id: str
    yes_rate: float
    answers: int  # in the window
    psi: float | None = None  # None: no reference for this question's scorer, or too few answers
    reference_yes_rate: float | None = None


class DriftMonitor:
    """Sliding windows per question, compared with the references of the live heads."""

    def __init__(self, references: Mapping[str, Reference], window: int = 1000, min_answers: int = 200) -> None:
        if not 1 <= min_answers <= window:
            raise ValueError("drift: need 1 <= min_answers <= window")
        self.references = dict(references)
        self.window = window
        self.min_answers = min_answers
        self._windows: dict[str, Window] = {}

    def observe(self, question: Question, p_yes: np.ndarray, threshold: float, decided_by: str) -> Reading:
        """Add a batch of one question's stage-1 scores. The head's reference applies only when
        the head scored them (a question whose head is not loaded falls back to zero-shot)."""
        w = self._windows.setdefault(question.id, Window(self.window))
        p = np.asarray(p_yes, np.float64)
        w.add(bin_of(p), p >= threshold)
        ref = self.references.get(question.head or "") if decided_by in ("head", "few-shot") else None
        if ref is None:
            return Reading(question.id, w.yes_rate, len(w))
        value = sample_psi(ref.p_yes, ref.n, w.shares, len(w)) if len(w) >= self.min_answers else None
        return Reading(question.id, w.yes_rate, len(w), value, ref.yes_rate)
