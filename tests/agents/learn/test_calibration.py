"""A calibrated head on a synthetic separable-ish set reads as a probability."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from agents.heads import Head
from agents.learn.metrics import ece, roc_auc
from agents.learn.train import FewShotPool, fit_calibration, fit_few_shot, fit_head


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.2
    x = rng.normal(size=(n, 20)).astype(np.float32)
    x[:, 0] += np.where(y, 2.5, 0.0)  # one informative direction, 19 of noise
    x[:, 1] += np.where(y, -1.0, 0.0)
    return x, y


def test_head_is_calibrated_on_held_out_data(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, y = _data(4000, 0)
    head = fit_head(x, y, head_id="h", question_id="q", question_text="synthetic?", embedder_id="e")
    xt, yt = _data(4000, 1)
    p = head.p_yes(xt)
    assert ((p >= 0) & (p <= 1)).all()
    assert ece(yt, p) < 0.03
    assert roc_auc(yt, p) > 0.95
    assert 0.0 < head.band[0] < head.threshold < head.band[1] < 1.0
    # the balanced LR alone is not calibrated: class weights inflate p_yes for the rare class
    raw = 1 / (1 + np.exp(-head.score(xt)))
    assert ece(yt, raw) > ece(yt, p) + 0.02
    # artifacts round-trip exactly
    head.save(tmp_path)
    again = Head.load(tmp_path / "h")
    np.testing.assert_allclose(again.p_yes(xt), p, atol=1e-6)
    assert again.threshold == head.threshold and again.kind == "head"


def test_repeated_cross_validation_steadies_the_calibration() -> None:
    """The fold assignment is luck; pooling several assignments' scores averages it out."""
    x, y = _data(800, 5)
    xt, _ = _data(2000, 6)

    def spread(repeats: int) -> float:
        heads = [fit_head(x, y, head_id="h", question_id="q", question_text="synthetic?", embedder_id="e",
                          seed=seed, repeats=repeats) for seed in (0, 10, 20, 30)]
        assert all(h.cv_metrics["n"] == len(y) and h.cv_metrics["repeats"] == repeats for h in heads)
        return float(np.std([h.p_yes(xt) for h in heads], axis=0).mean())

    assert spread(4) < 0.8 * spread(1)


def test_sigmoid_calibration_for_few_positives() -> None:
    rng = np.random.default_rng(3)
    s = rng.normal(size=2000)
    y = rng.random(2000) < 1 / (1 + np.exp(-(2 * s - 3)))
    cal = fit_calibration(s, y, method="sigmoid")
    assert abs(cal.a - 2) < 0.4 and abs(cal.b + 3) < 0.4
    assert ece(y, cal(s)) < 0.03


def test_few_shot_head_ranks_from_ten_examples() -> None:
    x, y = _data(4000, 2)
    pick = np.r_[np.flatnonzero(y)[:5], np.flatnonzero(~y)[:5]]
    head = fit_few_shot(x[pick], y[pick], FewShotPool(x), head_id="f", question_id="q",
                        question_text="synthetic?", embedder_id="e")
    xt, yt = _data(2000, 4)
    assert head.kind == "few-shot" and head.rows == 10
    assert roc_auc(yt, head.p_yes(xt)) > 0.85


def _chunks(y: np.ndarray, seed: int, signal: float) -> list[np.ndarray]:
    """4 unit chunk vectors per conversation; a yes conversation has one chunk near axis 0."""
    rng = np.random.default_rng(seed)
    out = []
    for yes in y:
        v = rng.normal(size=(4, 16))
        if yes:
            v[0, 0] += signal
        out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return out


def test_few_shot_head_adds_the_zero_shot_and_lexical_parts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Features without signal: the question's prototype (chunk part) and the words (lexical
    part) carry it, and the saved head scores exactly like the fitted one."""
    rng = np.random.default_rng(5)
    n = 3000
    y = rng.random(n) < 0.2
    x = rng.normal(size=(n, 8))
    dense = (rng.random((n, 50)) < 0.05).astype(np.float64)
    dense[:, 7] = y & (rng.random(n) < 0.6)  # a word most yes rows use
    words = sp.csr_matrix(dense)
    chunks = _chunks(y, 6, signal=4.0)
    axis = np.eye(16)[0]
    pick = np.r_[np.flatnonzero(y)[:5], np.flatnonzero(~y)[:5]]
    pool = FewShotPool(x, words, chunks)
    common = {"head_id": "f", "question_id": "q", "question_text": "synthetic?", "embedder_id": "e"}
    plain = fit_few_shot(x[pick], y[pick], FewShotPool(x), **common)
    full = fit_few_shot(x[pick], y[pick], pool, lexical=words[pick], chunk_vectors=[chunks[i] for i in pick],
                        prototype=axis, **common)
    assert full.chunk_coef is not None and full.lex_coef is not None
    assert roc_auc(y, plain.p_yes(x)) < 0.65
    p = full.p_yes(x, chunks, words)
    assert roc_auc(y, p) > 0.8
    # without the prototype, the chunk part is not used
    lex_only = fit_few_shot(x[pick], y[pick], pool, lexical=words[pick], **common)
    assert lex_only.chunk_coef is None and roc_auc(y, lex_only.p_yes(x, chunks, words)) < roc_auc(y, p)
    full.save(tmp_path)
    np.testing.assert_allclose(Head.load(tmp_path / "f").p_yes(x, chunks, words), p, atol=1e-9)
