"""`flexor bench --compare --engine hf-tiny --limit 5` writes every field (real data, real engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream.cli import main
from tests.conftest import shared_file

MODE_FIELDS = (
    "conversations_per_s",
    "llm_calls_per_conversation",
    "llm_prompt_tokens_per_conversation",
    "p50_ms",
    "p95_ms",
    "macro_f1",
)


def test_compare_writes_every_field(tmp_path: Path) -> None:
    star, sgd = shared_file("star.jsonl.gz"), shared_file("sgd.jsonl.gz")
    questions, answers = shared_file("questions.json"), shared_file("answers.jsonl.gz")
    report = tmp_path / "report"
    code = main([
        "bench", "--compare", "--engine", "hf-tiny", "--limit", "5",
        "--conversations", str(star), str(sgd), "--questions", str(questions), "--answers", str(answers),
        "--report", str(report),
    ])
    assert code == 0
    result = json.loads((report / "bench.json").read_text())
    assert result["n"] == 5 and result["per_source"] == {"star": 3, "sgd": 2}
    assert result["engine"] == "hf-tiny" and result["machine"]["cpus"] >= 1
    b, c = result["baseline"], result["cascade"]
    # The engine is a random model: its answers mean nothing, so check how the numbers are made.
    for mode in (b, c):
        assert all(isinstance(mode[f], (int, float)) for f in MODE_FIELDS), mode
        assert mode["conversations"] == 5
        # seconds is rounded to the millisecond and the rate to 4 decimals: the rate lies within
        # those roundings of 5 / seconds.
        low, high = 5 / (mode["seconds"] + 5e-4) - 5e-5, 5 / (mode["seconds"] - 5e-4) + 5e-5
        assert low <= mode["conversations_per_s"] <= high
        assert mode["p50_ms"] <= mode["p95_ms"]
        assert sum(mode["decided_by"].values()) == pytest.approx(1.0, abs=1e-3)
        # macro F1 is the mean over the questions that have a positive, from the per-question table.
        f1s = [q["f1"] for q in mode["per_question"].values() if q["n_yes"]]
        assert mode["macro_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-4)
    assert b["decided_by"] == {"baseline": 1.0}
    # The cascade calls the LLM once per answer it routed there, and only for those.
    assert c["llm_calls_per_conversation"] == pytest.approx(
        c["answers_per_conversation"] * c["decided_by"].get("llm", 0.0), abs=0.01)
    assert result["ratios"]["throughput"] == pytest.approx(c["conversations_per_s"] / b["conversations_per_s"],
                                                           abs=0.01)
    # The baseline makes two calls per asked question, over the whole conversation each time.
    assert b["llm_calls_per_conversation"] == 2 * b["answers_per_conversation"]
    assert b["answers_per_conversation"] == c["answers_per_conversation"]  # the same questions asked
    assert c["llm_calls_per_conversation"] < b["llm_calls_per_conversation"]
    assert set(result["ratios"]) >= {"throughput", "prompt_tokens"}
    if c["llm_prompt_tokens_per_conversation"] > 0:
        # The baseline's prompts hold the whole conversation; the cascade's, a few excerpts.
        per_call = {m: x["llm_prompt_tokens_per_conversation"] / x["llm_calls_per_conversation"] for m, x in
                    (("baseline", b), ("cascade", c))}
        assert per_call["baseline"] > per_call["cascade"], per_call
        assert result["ratios"]["prompt_tokens"] == pytest.approx(
            b["llm_prompt_tokens_per_conversation"] / c["llm_prompt_tokens_per_conversation"], abs=0.01)
    else:
        assert result["ratios"]["prompt_tokens"] is None and result["notes"]
    assert "| macro F1 |" in (report / "bench.md").read_text()
    assert (report / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_macro_f1_averages_only_questions_with_a_positive() -> None:
    from agents.learn.labelled import LabelledQuestion
    from agents.types import Answer
    from stream.bench.compare import macro_f1

    def q(qid: str) -> LabelledQuestion:
        return LabelledQuestion(qid, "sgd", f"{qid}?", ("x",), (), ())

    def a(qid: str, yes: bool) -> Answer:
        return Answer(qid, 1, "yes" if yes else "no", 0.9 if yes else 0.1, "head", ())

    gold = {("qa", "c1"): True, ("qa", "c2"): False, ("qb", "c1"): False, ("qb", "c2"): False}
    answers = [[a("qa", True), a("qb", False)], [a("qa", True), a("qb", True)]]
    f1, per_q = macro_f1([q("qa"), q("qb")], ["c1", "c2"], answers, gold)
    # qa: 1 TP, 1 FP -> F1 2/3. qb has no positive: reported (with its false alarm), not averaged.
    assert per_q["qb"]["n_yes"] == 0 and per_q["qb"]["n_pred_yes"] == 1
    assert abs(f1 - 2 / 3) < 1e-4
