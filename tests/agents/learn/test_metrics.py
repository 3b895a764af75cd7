"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from agents.learn.metrics import (
    best_f1_threshold,
    ece,
    ece_floor,
    pr_auc,
    precision_recall_f1,
    reliability,
    roc_auc,
    summarize,
)

Y = np.array([1, 1, 0, 1, 0, 0], bool)
P = np.array([0.9, 0.8, 0.7, 0.4, 0.2, 0.1])


def test_precision_recall_f1_by_hand() -> None:
    # predict yes at p >= 0.5: rows 0, 1, 2 -> tp 2, fp 1, fn 1
    p, r, f = precision_recall_f1(Y, P >= 0.5)
    assert p == pytest.approx(2 / 3) and r == pytest.approx(2 / 3) and f == pytest.approx(2 / 3)
    assert precision_recall_f1(Y, np.zeros(6, bool)) == (0.0, 0.0, 0.0)


def test_roc_auc_by_hand() -> None:
    # positives 0.9, 0.8, 0.4 vs negatives 0.7, 0.2, 0.1: pairs won 3 + 3 + 2 = 8 of 9
    assert roc_auc(Y, P) == pytest.approx(8 / 9)
    # ties count half: one pos and one neg at the same score
    assert roc_auc(np.array([1, 0], bool), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([1, 1], bool), np.array([0.1, 0.2])) is None


def test_pr_auc_by_hand() -> None:
    # ranked: + + - + - -; AP = (1/3)(1 + 1 + 3/4)
    assert pr_auc(Y, P) == pytest.approx((1 + 1 + 0.75) / 3)
    assert pr_auc(np.zeros(3, bool), np.array([0.1, 0.2, 0.3])) is None


def test_ece_by_hand() -> None:
    y = np.array([1, 0, 1, 1], bool)
    p = np.array([0.05, 0.05, 0.95, 1.0])
    # bin 0: mean p 0.05, rate 0.5 -> 2/4 * 0.45; bin 9 (includes 1.0): mean 0.975, rate 1 -> 2/4 * 0.025
    assert ece(y, p) == pytest.approx(0.5 * 0.45 + 0.5 * 0.025)
    bins = reliability(y, p)
    assert [b["n"] for b in bins] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert ece(np.array([1, 0], bool), np.array([1.0, 0.0])) == 0.0


def test_summarize_fields() -> None:
    s = summarize(Y, P, P >= 0.5)
    assert s["n"] == 6 and s["n_yes"] == 3 and s["n_pred_yes"] == 3
    assert set(s) == {"n", "n_yes", "n_pred_yes", "precision", "recall", "f1", "roc_auc", "pr_auc", "ece", "ece_floor"}


def test_ece_floor_is_the_noise_of_a_calibrated_model() -> None:
    # certain answers leave no room for noise; in one bin of n rows at p the median |rate - p| is
    # about 0.674 standard deviations of the rate (half-normal median)
    assert ece_floor(np.array([0.0, 1.0, 1.0])) == 0.0
    for n in (100, 400):
        assert ece_floor(np.full(n, 0.55)) == pytest.approx(0.674 * np.sqrt(0.55 * 0.45 / n), rel=0.2)
    rng = np.random.default_rng(0)
    p = rng.random(3000)
    y = rng.random(3000) < p  # calibrated by construction
    floor = ece_floor(p)
    assert 0.005 < floor < 0.03 and ece(y, p) < 3 * floor
    assert ece(y, np.clip(p + 0.1, 0, 1)) > 3 * floor  # a real offset stands out


def test_best_f1_threshold() -> None:
    y = np.array([0, 0, 1, 1], bool)
    p = np.array([0.1, 0.3, 0.6, 0.8])
    t = best_f1_threshold(y, p)
    assert 0.3 < t <= 0.6
    assert precision_recall_f1(y, p >= t)[2] == 1.0
