"""The lexical part: per-side TF-IDF that round-trips through lexicon.json, and a head that uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agents.chunking import Turn
from agents.features import FeatureExtractor
from agents.heads import Head, HeadMismatch, HeadScorer
from agents.learn.metrics import roc_auc
from agents.learn.train import fit_head
from agents.lexical import LEXICON_FILE, Lexicon
from agents.types import Conversation

CUSTOMER = ["I want to check my balance", "book a table for two", "sorry, my payment failed", "what time is it"]
AGENT = ["sorry, that failed", "done, it is booked", "here you go", "anything else?"]


def conv(i: int, customer: str, agent: str) -> Conversation:
    return Conversation("t", f"c{i}", 1, (Turn("1", "customer", customer), Turn("2", "agent", agent)), {})


def corpus(n: int, seed: int) -> tuple[list[Conversation], np.ndarray]:
    rng = np.random.default_rng(seed)
    convs, y = [], []
    for i in range(n):
        c, a = rng.choice(CUSTOMER), rng.choice(AGENT)
        convs.append(conv(i, f"{c} {rng.integers(1000)}", a))
        y.append(a == "sorry, that failed")  # decided by the agent's words only
    return convs, np.array(y)


def test_sides_are_separate_and_round_trip(tmp_path: Path) -> None:
    convs, _ = corpus(60, 0)
    lex = Lexicon.fit(convs)
    x = lex.transform(convs)
    assert x.shape == (60, lex.dim)
    # "sorry" from the customer is a different column from "sorry" from the agent.
    a = lex.transform([conv(0, "sorry that failed", "ok")]).toarray()
    b = lex.transform([conv(0, "ok", "sorry that failed")]).toarray()
    assert a.any() and b.any() and not (a.astype(bool) & b.astype(bool)).any()
    lex.save(tmp_path)
    again = Lexicon.load(tmp_path)
    assert abs(again.transform(convs) - x).max() == 0


def test_head_with_a_lexical_part_learns_words_and_needs_its_lexicon(tmp_path: Path) -> None:
    train, y = corpus(400, 1)
    test, yt = corpus(400, 2)
    lex = Lexicon.fit(train)
    noise = np.random.default_rng(3).normal(size=(400, 8)).astype(np.float32)  # dense part: no signal
    head = fit_head(noise, y, lexical=lex.transform(train), head_id="h", question_id="q", question_text="failed?",
                    embedder_id="e")
    p = head.p_yes(noise, None, lex.transform(test))
    assert roc_auc(yt, p) > 0.99
    head.save(tmp_path)
    again = Head.load(tmp_path / "h")
    np.testing.assert_allclose(again.p_yes(noise, None, lex.transform(test)), p, atol=1e-9)
    with pytest.raises(ValueError, match="lexical"):
        again.p_yes(noise)

    class Emb:
        model_id, dim = "e", 4

    with pytest.raises(HeadMismatch, match=LEXICON_FILE):
        HeadScorer({"h": again}, FeatureExtractor(Emb()))  # type: ignore[arg-type]
