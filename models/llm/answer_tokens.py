"""Which tokens mean "yes" and "no", and P(yes) from next-token log-probabilities.

The answer is always read from one next token. A tokenizer may spell an answer several ways
("yes", " yes", "Yes", " YES", SentencePiece's "▁yes"...); every spelling that encodes to a
*single* token counts, and the probability mass of all yes-tokens is compared with that of all
no-tokens: P(yes) = m_yes / (m_yes + m_no), so mass on other tokens does not matter.

Two sources of log-probabilities are parsed:
- full next-token logits (hf; TensorRT-LLM generation logits): exact over the whole vocabulary;
- top-K log-probability dicts (OpenAI-compatible servers; TensorRT-LLM ``logprobs=K``), keyed by
  token id or by token text.

Floor for a side missing from top-K: every token outside the top K is no more likely than the
least likely listed one, so a missing side gets the smallest listed log-probability. That is an
upper bound on its true mass, which keeps P(yes) away from 0 and 1 (a missing side makes the
answer less confident, never more). With neither side listed P(yes) is 0.5: no information.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

YES_WORDS = ("yes", "Yes", "YES")
NO_WORDS = ("no", "No", "NO")
# Markers that byte-level BPE and SentencePiece vocabularies use for a leading space.
_SPACE_MARKERS = "\u0120\u2581"  # "Ġ", "▁"


@dataclass(frozen=True)
class AnswerTokens:
    """Single-token spellings of the answers for one tokenizer."""

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.yes_ids or not self.no_ids:
            raise ValueError("the tokenizer has no single-token spelling of 'yes' or of 'no'")
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError("a token id counts as both 'yes' and 'no'")

    def side_of_id(self, token_id: int) -> str | None:
        if token_id in self.yes_ids:
            return "yes"
        if token_id in self.no_ids:
            return "no"
        return None


def answer_tokens(encode: Callable[[str], Sequence[int]]) -> AnswerTokens:
    """Find the single-token spellings with ``encode`` (text -> ids, no special tokens)."""

    def ids(words: Iterable[str]) -> tuple[int, ...]:
        found: list[int] = []
        for word in words:
            for variant in (word, " " + word):
                encoded = list(encode(variant))
                if len(encoded) == 1 and encoded[0] not in found:
                    found.append(encoded[0])
        return tuple(found)

    return AnswerTokens(yes_ids=ids(YES_WORDS), no_ids=ids(NO_WORDS))


def hf_answer_tokens(tokenizer) -> AnswerTokens:
    """``answer_tokens`` for a transformers tokenizer."""
    return answer_tokens(lambda text: tokenizer.encode(text, add_special_tokens=False))


def side_of_text(token: str) -> str | None:
    """'yes' / 'no' / None for a token given as text (case and leading space ignored)."""
    word = token.lstrip(" " + _SPACE_MARKERS).rstrip()
    if word in YES_WORDS:
        return "yes"
    if word in NO_WORDS:
        return "no"
    return None


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def p_yes_from_logits(logits: np.ndarray, tokens: AnswerTokens) -> np.ndarray:
    """P(yes) per row of next-token logits, shape (batch, vocab) -> (batch,), float64."""
    logits = np.asarray(logits, dtype=np.float64)
    yes = logits[:, list(tokens.yes_ids)]
    no = logits[:, list(tokens.no_ids)]
    lse_yes = np.logaddexp.reduce(yes, axis=1)
    lse_no = np.logaddexp.reduce(no, axis=1)
    # sigmoid(lse_yes - lse_no) without overflow
    return np.exp(-np.logaddexp(0.0, lse_no - lse_yes))


def p_yes_from_top_logprobs(
    top: Mapping[Hashable, float], side_of: Callable[[Hashable], str | None] | None = None
) -> float:
    """P(yes) from one top-K dict {token (text or id): logprob}; see the module doc for the floor.

    ``side_of`` classifies a key; the default reads keys as token text (``side_of_text``).
    """
    classify = side_of or side_of_text
    if not top:
        return 0.5
    sides: dict[str, list[float]] = {"yes": [], "no": []}
    for key, logprob in top.items():
        side = classify(key)
        if side is not None and logprob is not None and math.isfinite(logprob):
            sides[side].append(float(logprob))
    if not sides["yes"] and not sides["no"]:
        return 0.5
    floor = min(float(v) for v in top.values() if v is not None and math.isfinite(v))
    lse_yes = _logsumexp(sides["yes"]) if sides["yes"] else floor
    lse_no = _logsumexp(sides["no"]) if sides["no"] else floor
    return float(np.exp(-np.logaddexp(0.0, lse_no - lse_yes)))
