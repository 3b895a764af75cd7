"""`flexor bench --learn` on the service's formats (the examples, 80/20 hash split): the fields the
issue names, the pool it counts, and teacher answers that match the rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.learn.datasets import holdout_share
from stream.bench.learn import learn, parse_rounds
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.slow


def test_learn_bench_writes_curves_for_both_strategies(tmp_path: Path) -> None:
    learn(conversations=[EXAMPLES / "conversations.jsonl"], questions_path=EXAMPLES / "questions.yaml",
          answers_path=EXAMPLES / "labels.jsonl", report=tmp_path, rounds=[6], only=["customer_angry"])
    result = json.loads((tmp_path / "bench.json").read_text())["learn"]
    newest: dict[str, int] = {}
    for line in (EXAMPLES / "conversations.jsonl").read_text().splitlines():
        c = json.loads(line)
        newest[c["conversation_id"]] = max(newest.get(c["conversation_id"], 0), c["revision"])
    pool = [r for r in map(json.loads, (EXAMPLES / "labels.jsonl").read_text().splitlines())
            if r["question_id"] == "customer_angry" and r["revision"] == newest[r["conversation_id"]]
            and holdout_share(r["conversation_id"]) >= 0.2]
    assert result["pool_pairs"] == len(pool) and result["questions"] == 1
    assert 0 < result["full_macro_f1"] <= 1
    for strategy in ("uncertainty", "random"):
        zero, six = result["curves"][strategy]
        assert zero == {"labels_per_question": 0, "macro_f1": result["zero_shot_macro_f1"], "teacher_calls": 0}
        assert six["labels_per_question"] == 6 and six["teacher_calls"] == 6 and 0 <= six["macro_f1"] <= 1
    assert result["goals"] == {}  # neither 100 nor 200 labels per question were reached
    assert (tmp_path / "learn.png").stat().st_size > 0 and "| 6 |" in (tmp_path / "bench.md").read_text()


def test_rounds_must_increase() -> None:
    assert parse_rounds("20,40,100") == [20, 40, 100]
    for bad in ("40,20", "0,10", "a", ""):
        with pytest.raises(ValueError, match="--rounds"):
            parse_rounds(bad)


def test_agreement_discounts_a_teacher_that_always_says_no() -> None:
    from stream.bench.learn import agreement

    always_no = agreement([(False, False)] * 90 + [(False, True)] * 10)
    assert always_no["rate"] == 0.9 and always_no["kappa"] == 0.0 and always_no["both_yes"] == 0
    perfect = agreement([(True, True)] * 10 + [(False, False)] * 90)
    assert perfect["rate"] == 1.0 and perfect["kappa"] == 1.0
