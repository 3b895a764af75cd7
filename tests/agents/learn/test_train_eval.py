"""Integration on a small slice of ../shared/data: train heads, evaluate, and check the service's
wiring (its head loader, questions.yaml, Cascade + Pipeline) gives flexor eval's answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from agents.heads import Head
from agents.learn.labelled import question_set, read_conversations, read_questions, shared_data_dir, to_conversation

DATA = shared_data_dir()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DATA / "questions.json").exists(),
        reason=f"labelled data not found at {DATA} (set FLEXOR_SHARED_DATA to the shared/data folder)",
    ),
]
EMBEDDER = "onnx-int8"  # the default: its vectors do not depend on batch-mates
QUESTION_FIELDS = {
    "path", "n", "n_yes", "n_pred_yes", "precision", "recall", "f1", "roc_auc", "pr_auc", "ece", "ece_floor"
}


def _files() -> list[str]:
    return [str(DATA / "star.jsonl.gz"), str(DATA / "sgd.jsonl.gz")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from agents.learn import evaluate, train

    root = tmp_path_factory.mktemp("flexor")
    heads, report = root / "heads", root / "report"
    common = ["--questions", str(DATA / "questions.json"), "--answers", str(DATA / "answers.jsonl.gz")]
    emb = ["--embedder", EMBEDDER]
    assert train.main(["--conversations", *_files(), *common, *emb, "--split", "train", "--limit", "250",
                       "--out", str(heads)]) == 0
    assert evaluate.main(["--conversations", *_files(), *common, *emb, "--split", "eval", "--limit", "40",
                          "--heads", str(heads), "--report", str(report), "--no-progress"]) == 0
    return heads, report


def test_train_writes_versioned_heads_and_manifest(trained: tuple[Path, Path]) -> None:
    heads, _ = trained
    manifest = json.loads((heads / "manifest.json").read_text())
    assert manifest["embedder_id"].startswith("all-MiniLM-L6-v2")
    assert manifest["feature_version"] and manifest["split"] == "train"
    assert manifest["lexicon"] and (heads / "lexicon.json").exists()  # heads carry the lexical part
    entries = manifest["questions"]
    assert len(entries) == 13
    with_head = {q for q, e in entries.items() if e["head"]}
    assert {"q00", "q07"} <= with_head and len(with_head) >= 4  # the slice has positives for these
    for q in with_head:
        e = entries[q]
        assert (heads / e["head"] / "weights.npz").exists()
        assert e["rows"] > 0 and 0 < e["threshold"] < 1 and "f1" in e["cv_metrics"]
        assert json.loads((heads / e["head"] / "head.json").read_text())["lexical_part"]
        # the drift reference: the out-of-fold scores the cv metrics were computed from
        ref = e["reference"]
        assert ref["bins"] == 10 and ref["n"] == e["rows"] == e["cv_metrics"]["n"]
        assert sum(ref["p_yes"]) == pytest.approx(1.0, abs=1e-5)
        assert ref["yes_rate"] == pytest.approx(e["cv_metrics"]["n_pred_yes"] / e["rows"], abs=1e-6)
        assert "reference" not in json.loads((heads / e["head"] / "head.json").read_text())["cv_metrics"]
    # a question too rare for the slice says it keeps the zero-shot path
    for e in entries.values():
        if not e["head"]:
            assert e["path"] == "zero-shot" and e["reason"]


def test_eval_report_has_every_field(trained: tuple[Path, Path]) -> None:
    heads, report_dir = trained
    report = json.loads((report_dir / "report.json").read_text())
    for key in ("macro_f1", "macro_roc_auc", "conversations_per_s", "stage_share", "questions"):
        assert key in report
    assert report["conversations"] == 80 and report["conversations_per_s"] > 0
    assert abs(sum(report["stage_share"].values()) - 1.0) < 1e-3
    manifest = json.loads((heads / "manifest.json").read_text())["questions"]
    for qid, e in report["questions"].items():
        assert QUESTION_FIELDS <= set(e), qid
        assert e["path"] == ("head" if manifest[qid]["head"] else "zero-shot"), qid
        assert e["n_pred_yes"] <= e["n"] and e["n_yes"] <= e["n"]
        if 0 < e["n_yes"] < e["n"]:
            assert 0 <= e["roc_auc"] <= 1
        else:
            assert e["roc_auc"] is None
    for name in ("report.md", "pr_curves.png", "reliability.png", "answers.jsonl"):
        assert (report_dir / name).stat().st_size > 0
    assert "| q00 |" in (report_dir / "report.md").read_text()


def test_service_wiring_answers_like_eval(trained: tuple[Path, Path]) -> None:
    """The service's own head loader and questions file, a fresh (uncached) embedder, other batches."""
    from agents.cascade import Cascade
    from agents.evidence import MemoryEvidenceStore
    from agents.pipeline import Pipeline
    from agents.questions import load_questions
    from agents.similarity import SimilarityScorer
    from models.embedder import load_embedder
    from stream.app import load_heads
    from stream.config import ModelsConfig, Settings

    heads_dir, report_dir = trained
    settings = Settings(
        models=ModelsConfig(heads_dir=heads_dir, embedder=EMBEDDER), questions_file=heads_dir / "questions.yaml"
    )
    embedder = load_embedder(settings.models.embedder)
    heads, _version = load_heads(settings, embedder)
    questions = load_questions(settings.questions_file)
    assert {q.id for q in questions.questions if q.head} == set(heads)
    pipeline = Pipeline(embedder, MemoryEvidenceStore(), Cascade(SimilarityScorer(embedder), heads))

    convs = [to_conversation(c) for c in read_conversations(_files(), "eval", limit=40)]
    expected: dict[tuple[str, str], dict] = {}
    for line in (report_dir / "answers.jsonl").read_text().splitlines():
        a = json.loads(line)
        expected[(a["conversation_id"], a["question_id"])] = a

    async def service_like() -> list:
        out = []
        for start in range(0, len(convs), 7):  # different batches than flexor eval's
            out += (await pipeline.classify(convs[start : start + 7], questions)).answers
        return out

    got = asyncio.run(service_like())
    n = 0
    for conv, answers in zip(convs, got, strict=True):
        for a in answers:
            e = expected.pop((conv.conversation_id, a.question_id))
            assert a.answer == e["answer"], (conv.conversation_id, a.question_id, a.p_yes, e["p_yes"])
            assert a.decided_by == e["decided_by"]
            # report answers carry p_yes to 4 decimals; nothing else may differ
            assert a.p_yes == pytest.approx(e["p_yes"], abs=5e-5)
            n += 1
    assert not expected and n > 80


def test_few_shot_heads_carry_the_question_and_the_words(tmp_path: Path) -> None:
    """`--shots K`: few-shot heads with the lexical part and the question's zero-shot direction,
    taken by flexor eval as the few-shot path."""
    from agents.learn import evaluate, train
    from agents.similarity import SimilarityScorer
    from models.embedder import load_embedder

    heads, report = tmp_path / "heads", tmp_path / "report"
    common = ["--questions", str(DATA / "questions.json"), "--answers", str(DATA / "answers.jsonl.gz"),
              "--embedder", EMBEDDER]
    assert train.main(["--conversations", *_files(), *common, "--split", "train", "--limit", "250", "--shots", "3",
                       "--out", str(heads)]) == 0
    manifest = json.loads((heads / "manifest.json").read_text())
    assert manifest["shots"] == 3 and (heads / "lexicon.json").exists()
    meta = json.loads((heads / "q00" / "head.json").read_text())
    assert meta["kind"] == "few-shot" and meta["rows"] == 6 and meta["lexical_part"] and meta["chunk_part"]
    q00 = question_set(read_questions(DATA / "questions.json")).by_id()["q00"]
    proto = SimilarityScorer(load_embedder(EMBEDDER)).prototype(q00)
    np.testing.assert_allclose(Head.load(heads / "q00").chunk_coef, proto, atol=1e-6)
    assert evaluate.main(["--conversations", *_files(), *common, "--split", "eval", "--limit", "40",
                          "--heads", str(heads), "--report", str(report), "--no-progress"]) == 0
    questions = json.loads((report / "report.json").read_text())["questions"]
    assert questions["q00"]["path"] == "few-shot"


def test_eval_embeds_a_turn_repeated_across_conversations_once() -> None:
    """`flexor eval` runs the service's reuse cache: a repeated turn is embedded once, and the
    answers are those of a pipeline without it."""
    from agents.chunking import Turn
    from agents.learn.evaluate import build_pipeline
    from agents.pipeline import Pipeline
    from agents.types import Conversation
    from models.embedder import load_embedder

    class Counting:
        def __init__(self, inner: object) -> None:
            self.inner, self.texts = inner, 0

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def embed(self, texts: list[str]) -> np.ndarray:
            self.texts += len(texts)
            return self.inner.embed(texts)  # type: ignore[attr-defined]

    greeting = (Turn("t1", "agent", "Hello, how can I help you today?"), Turn("t2", "customer", "Hi there"))
    convs = [Conversation("t", c, 1, (*greeting, Turn("t3", "customer", text))) for c, text in
             (("a", "I was charged twice for my order"), ("b", "Please cancel my subscription"))]
    embedder = Counting(load_embedder("onnx-int8"))
    pipeline, _, _ = build_pipeline(embedder, None)  # type: ignore[arg-type]
    embedded = asyncio.run(pipeline.embed(convs))
    assert embedder.texts == 4  # two shared turns once, two own turns
    plain = Pipeline(embedder, pipeline.store, pipeline.cascade)  # type: ignore[arg-type]
    for got, want in zip(embedded, asyncio.run(plain.embed(convs)), strict=True):
        np.testing.assert_array_equal(got.vectors, want.vectors)
