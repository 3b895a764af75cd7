"""Binary classification metrics for the evaluation report (numpy only, hand-checkable)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn)."""
    y, pred = np.asarray(y, bool), np.asarray(pred, bool)
    return (
        int((y & pred).sum()),
        int((~y & pred).sum()),
        int((y & ~pred).sum()),
        int((~y & ~pred).sum()),
    )


def precision_recall_f1(y: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Zero when undefined (no predicted yes / no actual yes), as scikit-learn's zero_division=0."""
    tp, fp, fn, _ = confusion(y, pred)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def roc_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Probability a random yes outscores a random no (ties count half); None if a class is absent."""
    y, score = np.asarray(y, bool), np.asarray(score, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), np.float64)
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall at every distinct score threshold (descending), and the thresholds."""
    y, score = np.asarray(y, bool), np.asarray(score, np.float64)
    order = np.argsort(-score, kind="mergesort")
    s, yy = score[order], y[order]
    tp = np.cumsum(yy)
    fp = np.cumsum(~yy)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp, fp = tp[last], fp[last]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(int(y.sum()), 1)
    return precision, recall, s[last]


def pr_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Average precision: sum over thresholds of (recall step) x precision; None without a yes."""
    y = np.asarray(y, bool)
    if not y.any():
        return None
    precision, recall, _ = pr_curve(y, score)
    steps = np.diff(np.r_[0.0, recall])
    return float((steps * precision).sum())


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [0, 1]; the last bin includes 1.0. `p` is already clipped."""
    return np.minimum((p * bins).astype(int), bins - 1)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins over [0, 1] (the last bin includes 1.0): count, mean p, observed yes rate."""
    y, p = np.asarray(y, np.float64), np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    idx = _bin_index(p, bins)
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": n,
                "p_mean": float(p[m].mean()) if n else math.nan,
                "y_rate": float(y[m].mean()) if n else math.nan,
            }
        )
    return out


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (bin share) x |mean p - yes rate|."""
    total = len(np.asarray(y))
    if total == 0:
        return 0.0
    return float(
        sum(b["n"] / total * abs(b["p_mean"] - b["y_rate"]) for b in reliability(y, p, bins) if b["n"])
    )


def ece_floor(p: np.ndarray, bins: int = 10, draws: int = 400, seed: int = 0) -> float:
    """Median ECE of a perfectly calibrated model with these p_yes: answers drawn as Bernoulli(p).

    ECE is itself a noisy estimate: with few rows per bin a calibrated model still scores well
    above 0 (0.025 on 1,149 rows of the evaluation split's q12). An ECE near this floor is
    sampling noise; only the excess says the probabilities are off."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    if len(p) == 0:
        return 0.0
    onehot = np.eye(bins)[_bin_index(p, bins)]  # (n, bins): the same bins as `ece`
    counts = onehot.sum(0)
    used = counts > 0
    p_mean = (p @ onehot)[used] / counts[used]
    draws_y = np.random.default_rng(seed).random((draws, len(p))) < p
    rates = (draws_y @ onehot)[:, used] / counts[used]
    eces = (np.abs(rates - p_mean) * counts[used] / len(p)).sum(1)
    return float(np.median(eces))


def summarize(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    y, p, pred = np.asarray(y, bool), np.asarray(p, np.float64), np.asarray(pred, bool)
    precision, recall, f1 = precision_recall_f1(y, pred)
    return {
        "n": len(y),
        "n_yes": int(y.sum()),
        "n_pred_yes": int(pred.sum()),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc(y, p),
        "pr_auc": pr_auc(y, p),
        "ece": ece(y, p),
        "ece_floor": ece_floor(p),
    }


def best_f1_threshold(y: np.ndarray, p: np.ndarray, lo: float = 0.02, hi: float = 0.98) -> float:
    """Threshold on p maximising F1 (midpoint between neighbouring scores), clipped to [lo, hi]."""
    precision, recall, thr = pr_curve(y, p)
    if len(thr) == 0:
        return 0.5
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    i = int(np.argmax(f1))
    t = thr[i] if i + 1 >= len(thr) else (thr[i] + thr[i + 1]) / 2
    return float(np.clip(t, lo, hi))
