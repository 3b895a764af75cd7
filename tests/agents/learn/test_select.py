"""Selection strategies: uncertainty takes conversations near the threshold but not a batch of
near-duplicates; random is reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from agents.learn.select import pick_random, pick_uncertain, uncertainty


def test_uncertainty_spreads_over_near_duplicates() -> None:
    rng = np.random.default_rng(0)
    template = rng.normal(size=16)
    # 30 near-copies of one conversation, right at the threshold ...
    dupes = template + rng.normal(scale=0.01, size=(30, 16))
    # ... and 30 different conversations a little farther from it, and 40 far away.
    others = rng.normal(size=(70, 16))
    vectors = np.vstack([dupes, others]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    p = np.r_[np.full(30, 0.50), np.full(30, 0.42), np.full(40, 0.02)]
    picked = pick_uncertain(p, 0.5, vectors, n=6, seed=1)
    assert len(picked) == len(set(picked.tolist())) == 6
    assert sum(i < 30 for i in picked) <= 2, picked  # not six copies of one template
    assert all(i < 60 for i in picked)  # none of the far ones (outside the 10 x n shortlist)

    # 1 at the threshold, 0 at the farther end of [0, 1]
    assert uncertainty(np.array([0.9, 0.5, 0.0, 1.0]), 0.9) == pytest.approx([1.0, 1 - 0.4 / 0.9, 0.0, 1 - 0.1 / 0.9])


def test_small_pools_and_random_picks() -> None:
    vectors = np.eye(4, dtype=np.float32)
    assert pick_uncertain(np.array([0.1, 0.5, 0.9, 0.4]), 0.5, vectors, n=10, seed=0).tolist() == [0, 1, 2, 3]
    a, b = pick_random(100, 10, seed=5), pick_random(100, 10, seed=5)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10
    assert pick_random(100, 10, seed=6).tolist() != a.tolist()


def test_a_share_of_the_picks_can_be_random() -> None:
    """The cold start's share: `explore` of the picks come from anywhere, the rest from near the threshold."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(1000, 8)).astype(np.float32)
    p = np.r_[np.full(20, 0.5), np.full(980, 0.01)]  # 20 at the threshold, 980 far from it
    picked = pick_uncertain(p, 0.5, vectors, n=8, seed=2, explore=0.5)
    assert len(set(picked.tolist())) == 8
    assert sum(i < 20 for i in picked) == 4  # the uncertain half
    assert pick_uncertain(p, 0.5, vectors, n=8, seed=2).tolist() == sorted(pick_uncertain(
        p, 0.5, vectors, n=8, seed=2, explore=0.0).tolist())


def test_a_cold_start_seeks_the_missing_answer_where_the_scorer_ranks_it() -> None:
    """Half the cold start's share goes to the likeliest holders of the answer the labels lack."""
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(1000, 8)).astype(np.float32)
    # 20 at the threshold, 10 ranked likely yes, 10 ranked likely no, 960 in between.
    p = np.r_[np.full(20, 0.5), np.full(10, 0.97), np.full(10, 0.001), np.full(960, 0.2)]
    likely_yes, likely_no = set(range(20, 30)), set(range(30, 40))
    for seek, want_yes, want_no in (((True,), 4, 0), ((False,), 0, 4), ((True, False), 2, 2)):
        picked = pick_uncertain(p, 0.5, vectors, n=16, seed=2, explore=0.5, seek=seek).tolist()
        assert len(set(picked)) == 16
        assert sum(i < 20 for i in picked) == 8  # the uncertain half
        # the sought quarter (4 picks); the random quarter lands in them by chance at most rarely
        assert len(likely_yes & set(picked)) >= want_yes and len(likely_no & set(picked)) >= want_no, picked
    # without seek the share is random: from 1000 candidates it hardly finds the 10 likely yes
    picked = pick_uncertain(p, 0.5, vectors, n=16, seed=2, explore=0.5).tolist()
    assert len(likely_yes & set(picked)) < 4
