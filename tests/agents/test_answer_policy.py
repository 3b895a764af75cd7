"""`on:` in questions.yaml: which revisions answer a question."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agents.questions import Question, QuestionFileError, load_questions
from tests.conftest import EXAMPLES

TEXT = """
questions:
  - id: leaving
    version: 1
    text: "Is the customer threatening to leave?"
    on: [open, closed]
  - id: resolved
    version: 1
    text: "Was the issue resolved?"
"""


def test_unquoted_on_is_read_and_closed_is_the_default(tmp_path: Path) -> None:
    assert True in yaml.safe_load(TEXT)["questions"][0]  # YAML 1.1 reads a bare `on:` as a bool key
    path = tmp_path / "q.yaml"
    path.write_text(TEXT)
    leaving, resolved = load_questions(path).questions
    assert (leaving.on, resolved.on) == (["open", "closed"], ["closed"])
    assert [leaving.asked_at(s) for s in ("open", "closed", "archived")] == [True, True, True]
    assert [resolved.asked_at(s) for s in ("open", "closed", "archived")] == [False, True, True]


@pytest.mark.parametrize("on", ["[open]", "[]", "[later, closed]"])
def test_on_must_name_known_statuses_and_include_closed(tmp_path: Path, on: str) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(TEXT.replace("on: [open, closed]", f"on: {on}"))
    with pytest.raises(QuestionFileError, match=r"questions\.0\.on"):
        load_questions(path)


def test_the_examples_mark_two_real_time_questions() -> None:
    realtime = {q.id for q in load_questions(EXAMPLES / "questions.yaml").questions if "open" in q.on}
    assert realtime == {"cancellation_intent", "customer_angry"}


def test_a_dumped_question_loads_back_the_same(tmp_path: Path) -> None:
    q = Question(id="a", version=1, text="Is it real-time?", on=["open", "closed"])
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({"questions": [q.model_dump(mode="json")]}))
    assert load_questions(path).questions == [q]
