"""Stage 1 for a whole batch (features once, every question by stacked matrix products) gives what
scoring each question and each conversation on its own gives, and keeps nothing between batches."""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import orjson
import pytest

from agents.cascade import Cascade
from agents.chunking import Turn
from agents.features import PHRASE_BANK, TAIL_CHUNKS, FeatureExtractor
from agents.heads import HeadScorer, load_heads
from agents.learn.train import FewShotPool, fit_few_shot, fit_head
from agents.lexical import Lexicon
from agents.pipeline import embed_conversations
from agents.questions import load_questions
from agents.similarity import SimilarityScorer
from agents.types import Conversation, EmbeddedConversation
from models.embedder import load_embedder
from stream.config import LimitsConfig
from stream.dev.produce import load_conversations
from stream.schemas import decode_conversation
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def batch():  # type: ignore[no-untyped-def]
    embedder = load_embedder("onnx-int8")
    questions = load_questions(EXAMPLES / "questions.yaml").questions
    events = load_conversations(EXAMPLES / "conversations.jsonl")
    convs = [decode_conversation(orjson.dumps(e), LimitsConfig()).to_conversation() for e in events]
    gold = {}
    for line in (EXAMPLES / "labels.jsonl").read_text().splitlines():
        d = json.loads(line)
        gold[(d["conversation_id"], d["question_id"])] = d["answer"] == "yes"
    embedded = embed_conversations(embedder, convs)
    return embedder, questions, convs, embedded, gold


def reference_features(bank: np.ndarray, ec: EmbeddedConversation) -> np.ndarray:
    """The f5 recipe (agents/features.py), one conversation at a time."""
    v = ec.vectors
    d, p = v.shape[1], len(PHRASE_BANK)
    s = v @ bank.T
    turns = ec.conversation.turns
    first = turns[0].speaker
    shape = [
        np.log1p(len(turns)),
        np.log1p(len(v)),
        sum(t.speaker == first for t in turns) / len(turns),
        np.log1p(sum(len(t.text) for t in turns) / len(turns)),
    ]
    customer = np.array([any(sp in ("customer", "user") for sp in ch.speakers) for ch in ec.chunks], bool)
    assert customer.any() and not customer.all()
    sides = []
    for side in (s[customer], s[~customer]):
        sides += [side.max(0), side.mean(0)] if len(side) else [np.zeros(p), np.zeros(p)]
    row = [v.mean(0), v.max(0), s.max(0), s.mean(0), s[-TAIL_CHUNKS:].max(0), s.max(0) - s.mean(0), *sides, shape]
    out = np.concatenate([np.asarray(r, np.float32) for r in row])
    assert out.shape == (2 * d + 8 * p + 4,)
    return out


def test_batch_features_equal_one_conversation_at_a_time(batch) -> None:  # type: ignore[no-untyped-def]
    embedder, _, _, embedded, _ = batch
    features = FeatureExtractor(embedder)
    got = features.transform(embedded)
    want = np.stack([reference_features(features.bank, ec) for ec in embedded])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Alone or among others, a conversation gets exactly the same row.
    for i, ec in enumerate(embedded):
        np.testing.assert_array_equal(features.transform([ec])[0], got[i])


def test_batch_heads_equal_each_head_alone(batch) -> None:  # type: ignore[no-untyped-def]
    """Heads of every shape (conversation part only; with chunk part; with lexical part; few-shot)
    scored in one call, on overlapping subsets, against `Head.p_yes` per head."""
    embedder, questions, convs, embedded, gold = batch
    features = FeatureExtractor(embedder)
    x = np.stack([reference_features(features.bank, ec) for ec in embedded])
    lexicon = Lexicon.fit(convs)
    lex = lexicon.transform(convs)
    chunks = [ec.vectors for ec in embedded]
    zero_shot = SimilarityScorer(embedder)
    heads = {}
    for n, q in enumerate(questions):
        y = np.array([gold[(c.conversation_id, q.id)] for c in convs])
        parts = {
            0: {},
            1: {"chunk_vectors": chunks},
            2: {"lexical": lex},
            3: {"chunk_vectors": chunks, "lexical": lex},
        }[n % 4]
        common = {"head_id": q.id, "question_id": q.id, "question_text": q.text, "embedder_id": embedder.model_id}
        if n == len(questions) - 1:
            shots = np.r_[np.flatnonzero(y)[:5], np.flatnonzero(~y)[:5]]
            heads[q.id] = fit_few_shot(
                x[shots], y[shots], FewShotPool(x, lex, chunks), lexical=lex[shots],
                chunk_vectors=[chunks[i] for i in shots], prototype=zero_shot.prototype(q).astype(np.float64), **common,
            )
        else:
            heads[q.id] = fit_head(x, y, repeats=1, **parts, **common)
    assert {h.kind for h in heads.values()} == {"head", "few-shot"}
    scorer = HeadScorer(heads, features, lexicon)

    rng = np.random.default_rng(0)
    plan = [(q.model_copy(update={"head": q.id}), sorted(rng.choice(len(convs), 40, replace=False).tolist()))
            for q in questions]
    got = scorer.stage1(plan, embedded)
    for (q, idx), r in zip(plan, got, strict=True):
        head = heads[q.id]
        want = head.p_yes(x[idx], [chunks[i] for i in idx], lex[idx])
        np.testing.assert_allclose(r.p_yes, want, atol=1e-6)
        assert (r.threshold, r.band, r.decided_by) == (head.threshold, head.band, head.kind)
    assert max(float(np.ptp(r.p_yes)) for r in got) > 0.1  # the comparison is not between constants
    # A conversation's answers do not depend on its batch-mates, to the last bit.
    for i in plan[0][1][:10]:
        alone = scorer.stage1([(q, [0]) for q, _ in plan], [embedded[i]])
        for (_, idx), r, a in zip(plan, got, alone, strict=True):
            if i in idx:
                assert a.p_yes[0] == r.p_yes[idx.index(i)]


def test_batch_zero_shot_equals_each_question_alone(batch) -> None:  # type: ignore[no-untyped-def]
    embedder, questions, convs, embedded, _ = batch
    scorer = SimilarityScorer(embedder)
    plan = [(q, list(range(n % 3, len(convs), 1 + n % 4))) for n, q in enumerate(questions)]
    got = Cascade(scorer).stage1(plan, embedded)
    for (q, idx), r in zip(plan, got, strict=True):
        proto = scorer.prototype(q)
        top2 = np.array([np.sort(embedded[i].vectors @ proto)[-2:].mean() for i in idx], np.float64)
        want = 1.0 / (1.0 + np.exp(-12.0 * (top2 - scorer.midpoint(q))))
        np.testing.assert_allclose(r.p_yes, want, atol=1e-6)
        assert (r.threshold, r.band, r.decided_by) == (q.threshold, q.band, "similarity")
    for i in range(0, len(convs), 9):
        alone = Cascade(scorer).stage1([(q, [0]) for q, _ in plan], [embedded[i]])
        for (_, idx), r, a in zip(plan, got, alone, strict=True):
            if i in idx:
                assert a.p_yes[0] == r.p_yes[idx.index(i)]


def test_stage1_keeps_nothing_of_a_batch(batch) -> None:  # type: ignore[no-untyped-def]
    """Issue 11, defect 3: the head scorer memoised up to 50,000 conversations with their vectors."""
    embedder, questions, _, _, _ = batch
    features = FeatureExtractor(embedder)
    turns = (Turn("t1", "customer", "my card was charged twice"), Turn("t2", "agent", "sorry, refunding it"))
    ec = embed_conversations(embedder, [Conversation("t", "c-gone", 1, turns)])[0]
    x = features.transform([ec])
    y = np.array([True, False] * 10)
    head = fit_head(np.repeat(x, 20, 0) + np.random.default_rng(1).normal(0, 0.1, (20, x.shape[1])), y,
                    repeats=1, head_id="h", question_id="h", question_text="charged twice?",
                    embedder_id=embedder.model_id)
    scorer = HeadScorer({"h": head}, features)
    q = questions[0].model_copy(update={"head": "h"})
    assert len(scorer.stage1([(q, [0])], [ec])[0].p_yes) == 1
    vectors = weakref.ref(ec.vectors)
    del ec
    gc.collect()
    assert vectors() is None, "stage 1 still holds the batch's conversations"


def test_a_heads_dir_whose_questions_all_kept_zero_shot_loads_as_no_heads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # `flexor train --from-store` with too few labels of every question writes no head directory.
    (tmp_path / "manifest.json").write_text("{}")
    assert load_heads(tmp_path, load_embedder("onnx-int8")) == ({}, "none")
