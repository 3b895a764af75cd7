import math

import numpy as np
import pytest
import torch

from models.llm.answer_tokens import (
    AnswerTokens,
    answer_tokens,
    p_yes_from_logits,
    p_yes_from_top_logprobs,
    side_of_text,
)
from models.llm.prompts import build_yes_no

PROMPTS = [
    build_yes_no("Was the customer annoyed?", ["customer: this is the third time I call"]),
    build_yes_no("Did the agent offer a refund?", ["agent: let me check the refund", "customer: thanks"]),
    build_yes_no("Did the customer ask to cancel?", []),
]


def test_variants_are_the_single_token_spellings(tiny_engine):
    tok, tokens = tiny_engine.tokenizer, tiny_engine.answer_tokens
    for ids, words in ((tokens.yes_ids, ("yes", "Yes", "YES")), (tokens.no_ids, ("no", "No", "NO"))):
        spellings = [tok.decode([i]) for i in ids]
        assert all(s.strip() in words for s in spellings)
        for word in words:
            for variant in (word, " " + word):
                single = len(tok.encode(variant, add_special_tokens=False)) == 1
                assert (variant in spellings) == single, variant
    # The tiny vocabulary has both spacings of "yes" and a multi-token "Yes" that must not count.
    assert {"yes", " yes"} <= {tok.decode([i]) for i in tokens.yes_ids}
    assert len(tok.encode("Yes", add_special_tokens=False)) > 1


def test_score_equals_a_softmax_by_hand(tiny_engine):
    model, tok = tiny_engine.model, tiny_engine.tokenizer
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0, -1].double(), dim=-1)
        yes = probs[list(tiny_engine.answer_tokens.yes_ids)].sum()
        no = probs[list(tiny_engine.answer_tokens.no_ids)].sum()
        expected.append(float(yes / (yes + no)))
    got = tiny_engine.score(PROMPTS)
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(got) > 1e-3  # the prompts really give different answers


def test_top_k_parsing_of_the_whole_vocabulary_equals_the_logit_parsing(tiny_engine):
    logits = tiny_engine.next_token_logits(PROMPTS)
    full = p_yes_from_logits(logits, tiny_engine.answer_tokens)
    for row, expected in zip(logits, full, strict=True):
        logprobs = torch.log_softmax(torch.tensor(row, dtype=torch.float64), -1).tolist()
        by_id = dict(enumerate(logprobs))
        assert p_yes_from_top_logprobs(by_id, side_of=tiny_engine.answer_tokens.side_of_id) == pytest.approx(expected)
        # Keyed by token text, as OpenAI-compatible servers send it (decoded strings).
        by_text: dict[str, float] = {}
        for token_id, lp in by_id.items():
            text = tiny_engine.tokenizer.decode([token_id])
            by_text[text] = float(np.logaddexp(by_text.get(text, -np.inf), lp))
        assert p_yes_from_top_logprobs(by_text) == pytest.approx(expected, abs=1e-9)


def test_top_k_sums_every_variant():
    top = {" Yes": math.log(0.2), "yes": math.log(0.1), " no": math.log(0.3), " maybe": math.log(0.4)}
    assert p_yes_from_top_logprobs(top) == pytest.approx(0.3 / 0.6)
    assert p_yes_from_top_logprobs({"\u2581YES": -1.0, "\u0120No": -1.0}) == pytest.approx(0.5)


def test_missing_side_gets_the_smallest_listed_logprob():
    top = {" yes": -0.5, " the": -2.0, " a": -3.0}
    assert p_yes_from_top_logprobs(top) == pytest.approx(1 / (1 + math.exp(-3.0 + 0.5)))
    only_no = {" no": -0.1, "\n": -4.0}
    assert p_yes_from_top_logprobs(only_no) == pytest.approx(1 / (1 + math.exp(-0.1 + 4.0)))


def test_no_answer_token_means_no_information():
    assert p_yes_from_top_logprobs({" the": -1.0, " a": -2.0}) == 0.5
    assert p_yes_from_top_logprobs({}) == 0.5


def test_words_that_only_start_like_answers_do_not_count():
    for token in ("yesterday", " nob", "Not", "know", " y", ""):
        assert side_of_text(token) is None
    for token in (" yes", "Yes", "YES ", "\u2581no", "\u0120No"):
        assert side_of_text(token) is not None


def test_extreme_logits_do_not_overflow():
    tokens = AnswerTokens(yes_ids=(0,), no_ids=(1,))
    p = p_yes_from_logits(np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]]), tokens)
    np.testing.assert_array_equal(p, [1.0, 0.0])
    assert p_yes_from_top_logprobs({"yes": -2000.0, "no": -0.0}) == 0.0


def test_answer_tokens_needs_both_sides():
    with pytest.raises(ValueError, match="single-token"):
        answer_tokens(lambda text: [1, 2])
    with pytest.raises(ValueError, match="both"):
        AnswerTokens(yes_ids=(3,), no_ids=(3,))
