"""Lexical features for the heads: TF-IDF word uni- and bigrams, one vocabulary per side.

Sentence embeddings of 3-turn chunks (feature version f3) blurred the words that decide many questions ("other options",
"unable to", "actually, instead", "balance"): on the evaluation split a linear model on these
features alone beat one on the pooled embedding features on 7 of 13 questions and tied on 3
(behaviour macro-F1 0.75 vs 0.66). The customer's words and the agent's words are vectorised separately, because "I'm
sorry, that failed" means something else from each side.

The vocabulary and IDF weights are fitted once per training run on the training conversations'
text (no labels) and stored beside the heads as ``lexicon.json`` (terms and IDF per side; no
pickles), so the service and ``flexor eval`` vectorise exactly as training did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from agents.types import Conversation

LEXICON_FILE = "lexicon.json"
LEXICON_VERSION = "l1"
MIN_DF = 3
MAX_TERMS = 100_000  # per side


def sides(convs: Sequence[Conversation]) -> tuple[list[str], list[str]]:
    """(customer text, agent text) per conversation."""
    customer, agent = [], []
    for c in convs:
        customer.append(" ".join(t.text for t in c.turns if t.from_customer))
        agent.append(" ".join(t.text for t in c.turns if not t.from_customer))
    return customer, agent


def _vectorizer(vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(
        ngram_range=(1, 2), min_df=MIN_DF if vocabulary is None else 1, sublinear_tf=True,
        max_features=MAX_TERMS if vocabulary is None else None, vocabulary=vocabulary, dtype=np.float32,
    )


class Lexicon:
    """Two fitted TF-IDF vectorizers (customer side, agent side)."""

    version = LEXICON_VERSION

    def __init__(self, customer: TfidfVectorizer, agent: TfidfVectorizer) -> None:
        self._sides = (customer, agent)

    @classmethod
    def fit(cls, convs: Sequence[Conversation]) -> Lexicon:
        customer, agent = sides(convs)
        # A side with no text at all (one-speaker data) still needs a vocabulary to exist.
        return cls(_vectorizer().fit(customer or [""]), _vectorizer().fit(agent or [""]))

    @property
    def dim(self) -> int:
        return sum(len(v.vocabulary_) for v in self._sides)

    def transform(self, convs: Sequence[Conversation]) -> sp.csr_matrix:
        """One L2-normalised row per side, side by side: shape (len(convs), dim)."""
        texts = sides(convs)
        return sp.hstack([v.transform(t) for v, t in zip(self._sides, texts, strict=True)], format="csr")

    def save(self, root: Path) -> Path:
        data: dict[str, Any] = {"version": self.version, "sides": []}
        for v in self._sides:
            terms = sorted(v.vocabulary_, key=v.vocabulary_.__getitem__)
            data["sides"].append({"terms": terms, "idf": [float(x) for x in v.idf_]})
        path = root / LEXICON_FILE
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, root: Path) -> Lexicon:
        data = json.loads((root / LEXICON_FILE).read_text())
        if data.get("version") != LEXICON_VERSION:
            raise ValueError(f"{root / LEXICON_FILE}: lexicon version {data.get('version')} != {LEXICON_VERSION}")
        vecs = []
        for side in data["sides"]:
            v = _vectorizer({t: i for i, t in enumerate(side["terms"])})
            v.fit([""])  # sets up the analyzer; the vocabulary is fixed, so only idf_ is overwritten
            v.idf_ = np.asarray(side["idf"], np.float64)
            vecs.append(v)
        return cls(*vecs)
