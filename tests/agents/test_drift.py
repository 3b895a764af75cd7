"""PSI, the sliding window and the references `flexor train` writes (agents/drift.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from agents.drift import (
    BINS,
    DriftMonitor,
    Reference,
    Window,
    bin_of,
    load_references,
    psi,
    reference,
    sample_psi,
    shares,
)
from agents.questions import Question


def test_psi_matches_a_hand_computed_value() -> None:
    expected = np.zeros(BINS)
    expected[[0, 9]] = 0.5
    actual = np.zeros(BINS)
    actual[0], actual[9] = 0.9, 0.1
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5); the empty bins add nothing
    assert psi(expected, actual) == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5), abs=1e-9)
    assert psi(expected, expected) == 0.0


def test_an_empty_reference_bin_counts_as_rare_not_impossible() -> None:
    expected = np.zeros(BINS)
    expected[0] = 1.0
    actual = np.zeros(BINS)
    actual[0], actual[5] = 0.99, 0.01
    value = psi(expected, actual)
    assert math.isfinite(value)
    # 0.01 of answers where the reference had none (floored at 1e-4): (0.01 - 1e-4) ln(100) + bin 0's part
    assert value == pytest.approx((0.01 - 1e-4) * math.log(0.01 / 1e-4) + (0.99 - 1.0) * math.log(0.99), abs=1e-9)


def test_sample_psi_smooths_both_sides_alike() -> None:
    one_bin = np.zeros(BINS)
    one_bin[0] = 1.0
    assert sample_psi(one_bin, 300, one_bin, 200) == 0.0  # the same shares, whatever the sizes
    # One stray answer of 200 in a bin where 300 reference rows had none. Unsmoothed it adds
    # (0.005 - 1e-4) ln(0.005 / 1e-4) + bin 0's part ~ 0.019. Smoothed with half an answer of
    # 200 (0.0025) on both sides: (0.0075 - 0.0025) ln 3 + (0.9975 - 1.0025) ln(0.9975 / 1.0025),
    # each share over 1.025.
    stray = np.zeros(BINS)
    stray[0], stray[5] = 199 / 200, 1 / 200
    assert psi(one_bin, stray) == pytest.approx(0.0049 * math.log(50) - 0.005 * math.log(0.995), abs=1e-9)
    expected = (0.005 * math.log(3) - 0.005 * math.log(0.9975 / 1.0025)) / 1.025
    assert sample_psi(one_bin, 300, stray, 200) == pytest.approx(expected, abs=1e-9)


def test_bins_are_equal_width_and_1_falls_in_the_last() -> None:
    assert bin_of(np.array([0.0, 0.0999, 0.1, 0.55, 0.9, 1.0])).tolist() == [0, 0, 1, 5, 9, 9]
    assert shares(np.array([0.05, 0.05, 0.95, 0.5])).tolist() == [0.5, 0, 0, 0, 0, 0.25, 0, 0, 0, 0.25]


def test_reference_round_trips_and_rejects_other_binnings() -> None:
    ref = reference(np.array([0.1, 0.2, 0.7, 0.9]), threshold=0.5)
    assert ref.yes_rate == 0.5 and ref.n == 4
    assert Reference.from_dict(json.loads(json.dumps(ref.as_dict()))).p_yes.tolist() == ref.p_yes.tolist()
    with pytest.raises(ValueError, match="bins"):
        Reference.from_dict({**ref.as_dict(), "bins": 20})


def test_window_keeps_only_the_last_answers() -> None:
    w = Window(4)
    w.add(bin_of(np.array([0.05, 0.05, 0.95])), np.array([False, False, True]))
    assert len(w) == 3 and w.yes_rate == pytest.approx(1 / 3)
    w.add(bin_of(np.array([0.95, 0.95, 0.95])), np.array([True, True, True]))
    # the two oldest (both no, bin 0) slid out
    assert len(w) == 4 and w.yes_rate == 1.0
    assert w.counts.tolist() == [0] * 9 + [4]


def question(head: str | None = "h") -> Question:
    return Question(id="q", version=1, text="Did the customer ask for a refund?", head=head)


def test_monitor_reports_psi_only_with_a_reference_and_enough_answers() -> None:
    mix = np.r_[np.full(90, 0.05), np.full(10, 0.95)]  # 90% no, 10% yes
    ref = reference(np.tile(mix, 10), threshold=0.5)
    mon = DriftMonitor({"h": ref}, window=400, min_answers=200)
    r = mon.observe(question(), mix, 0.5, "head")
    assert r.psi is None and r.answers == 100 and r.reference_yes_rate == pytest.approx(0.1)
    r = mon.observe(question(), mix, 0.5, "head")
    assert r.psi == 0.0  # the reference's own mix
    r = mon.observe(question(), np.full(400, 0.95), 0.5, "head")
    assert r.yes_rate == 1.0 and r.answers == 400 and r.psi > 0.2
    # a question whose head did not score it (zero-shot fallback) or that has no reference: no PSI
    assert mon.observe(question(), mix, 0.5, "similarity").psi is None
    other = DriftMonitor({}, window=400, min_answers=200).observe(question(), np.full(300, 0.95), 0.5, "head")
    assert other.psi is None and other.yes_rate == 1.0


def test_load_references_reads_the_manifest(tmp_path: Path) -> None:
    ref = reference(np.array([0.2, 0.8]), 0.5)
    (tmp_path / "manifest.json").write_text(json.dumps({"questions": {
        "q1": {"head": "q1", "reference": ref.as_dict()},
        "q2": {"head": None, "path": "zero-shot"},
        "q3": {"head": "q3"},  # trained before references existed
    }}))
    refs = load_references(tmp_path)
    assert set(refs) == {"q1"} and refs["q1"].yes_rate == 0.5
