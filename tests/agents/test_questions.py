"""Question registry: YAML questions, selectors, set version, validation, hot reload."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import yaml

from agents.questions import (
    Question,
    QuestionFileError,
    QuestionRegistry,
    load_questions,
    questions_from_sequence,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "questions.yaml"

TWO = """
questions:
  - id: refund_request
    version: 1
    text: "Did the customer ask for a refund?"
    threshold: 0.5
  - id: customer_angry
    version: 1
    text: "Is the customer angry?"
"""


def write(path: Path, text: str, mtime: float | None = None) -> Path:
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def q(id_: str = "q1", version: int = 1, **kw: object) -> Question:
    return Question(id=id_, version=version, text=f"Question {id_} about the customer?", **kw)


# -- the example file -------------------------------------------------------------------------------


def test_example_file_loads() -> None:
    qs = load_questions(EXAMPLES)
    ids = [x.id for x in qs.questions]
    assert len(ids) == 8
    assert {"bug_money_loss", "refund_request", "fraud_report", "cancellation_intent", "customer_angry",
            "issue_resolved", "wants_human_agent", "data_privacy"} == set(ids)
    bug = qs.by_id()["bug_money_loss"]
    assert bug.version == 1
    assert bug.speakers == ["customer"]
    assert bug.band == (0.35, 0.65)
    assert len(bug.examples.yes) == 2 and len(bug.examples.no) == 2
    assert bug.retrieval_text == bug.query
    assert qs.by_id()["issue_resolved"].speakers == []
    assert isinstance(qs.version, str) and qs.version
    # every example question applies to any conversation
    assert len(qs.applicable({})) == 8


def test_retrieval_text_falls_back_to_the_question() -> None:
    assert q().retrieval_text == q().text
    assert q(query="refund please").retrieval_text == "refund please"


# -- applies_to -------------------------------------------------------------------------------------


def test_applies_to_scalar() -> None:
    bank = q(applies_to={"domain": "bank"})
    assert bank.applies({"domain": "bank", "channel": "chat"})
    assert not bank.applies({"domain": "retail"})
    assert not bank.applies({})


def test_applies_to_list() -> None:
    chat_or_email = q(applies_to={"channel": ["chat", "email"]})
    assert chat_or_email.applies({"channel": "chat"})
    assert chat_or_email.applies({"channel": "email"})
    assert not chat_or_email.applies({"channel": "phone"})
    assert not chat_or_email.applies({})


def test_applies_to_every_key_must_match() -> None:
    both = q(applies_to={"domain": "bank", "channel": ["chat"]})
    assert both.applies({"domain": "bank", "channel": "chat"})
    assert not both.applies({"domain": "bank", "channel": "phone"})
    assert not both.applies({"domain": "retail", "channel": "chat"})


def test_applies_to_empty_matches_everything() -> None:
    assert q().applies({})
    assert q().applies({"anything": 1})


def test_applicable_filters_the_set() -> None:
    qs = questions_from_sequence(
        [q("a"), q("b", applies_to={"domain": "bank"}), q("c", applies_to={"domain": ["shop"]})]
    )
    assert [x.id for x in qs.applicable({"domain": "bank"})] == ["a", "b"]
    assert [x.id for x in qs.applicable({"domain": "shop"})] == ["a", "c"]
    assert [x.id for x in qs.applicable({})] == ["a"]


def test_applies_to_from_yaml(tmp_path: Path) -> None:
    p = write(tmp_path / "q.yaml", """
questions:
  - id: bank_only
    version: 1
    text: "Bank question for the customer?"
    applies_to: {domain: bank}
  - id: chat_or_email
    version: 1
    text: "Channel question for the customer?"
    applies_to:
      channel: [chat, email]
""")
    qs = load_questions(p)
    assert [x.id for x in qs.applicable({"domain": "bank", "channel": "chat"})] == ["bank_only", "chat_or_email"]
    assert [x.id for x in qs.applicable({"domain": "shop", "channel": "phone"})] == []


# -- version ----------------------------------------------------------------------------------------


def test_set_version_changes_with_a_question_version() -> None:
    base = questions_from_sequence([q("a"), q("b")])
    bumped = questions_from_sequence([q("a"), q("b", version=2)])
    assert base.version != bumped.version


def test_set_version_changes_when_a_question_is_added_or_removed() -> None:
    base = questions_from_sequence([q("a"), q("b")])
    assert questions_from_sequence([q("a")]).version != base.version
    assert questions_from_sequence([q("a"), q("b"), q("c")]).version != base.version


def test_set_version_ignores_in_place_edits_and_order() -> None:
    base = questions_from_sequence([q("a"), q("b")])
    edited = questions_from_sequence([q("b", threshold=0.7, band=(0.2, 0.8), top_k=5), q("a", head="a")])
    assert edited.version == base.version
    assert questions_from_sequence([q("a"), q("b")]).version == base.version  # stable across instances


def test_meaning_digest_covers_what_a_question_asks() -> None:
    base = q("a")
    for changed in (q("a", query="other words"), q("a", speakers=["customer"]), q("a", applies_to={"d": "bank"}),
                    q("a", examples={"yes": ["a snippet"]}), Question(id="a", version=1, text="Another question?")):
        assert changed.meaning != base.meaning, changed
    for same in (q("a", threshold=0.7), q("a", band=(0.1, 0.9)), q("a", top_k=5), q("a", head="h")):
        assert same.meaning == base.meaning, same


def test_set_version_from_file_edits(tmp_path: Path) -> None:
    p = write(tmp_path / "q.yaml", TWO)
    v0 = load_questions(p).version
    write(p, TWO.replace("threshold: 0.5", "threshold: 0.8"))
    assert load_questions(p).version == v0
    write(p, TWO.replace("version: 1\n    text: \"Did", "version: 2\n    text: \"Did"))
    assert load_questions(p).version != v0


# -- validation -------------------------------------------------------------------------------------


def test_duplicate_ids_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate question ids: a"):
        questions_from_sequence([q("a"), q("b"), q("a", version=2)])
    p = write(tmp_path / "q.yaml", TWO.replace("id: customer_angry", "id: refund_request"))
    with pytest.raises(QuestionFileError, match="refund_request"):
        load_questions(p)


def test_unquoted_yes_no_example_keys_are_accepted(tmp_path: Path) -> None:
    text = """
questions:
  - id: angry
    version: 1
    text: "Is the customer angry?"
    examples:
      yes:
        - "this is unacceptable"
      no:
        - "thanks, all good"
"""
    assert True in yaml.safe_load(text)["questions"][0]["examples"]  # YAML 1.1 really reads a bool key
    qs = load_questions(write(tmp_path / "q.yaml", text))
    ex = qs.questions[0].examples
    assert ex.yes == ["this is unacceptable"]
    assert ex.no == ["thanks, all good"]


def test_a_bare_list_of_questions_is_accepted(tmp_path: Path) -> None:
    p = write(tmp_path / "q.yaml", "- id: a\n  version: 1\n  text: 'Is it a question?'\n")
    assert [x.id for x in load_questions(p).questions] == ["a"]


@pytest.mark.parametrize(
    "text, where",
    [
        ("questions: []\n", "questions"),
        ("questions:\n  - id: a\n    text: 'Missing the version?'\n", "version"),
        ("questions:\n  - id: a\n    version: 0\n    text: 'Version zero?'\n", "version"),
        ("questions:\n  - id: 'bad id!'\n    version: 1\n    text: 'Bad id here?'\n", "id"),
        ("questions:\n  - id: a\n    version: 1\n    text: 'Band?'\n    band: [0.8, 0.2]\n", "band"),
        ("questions:\n  - id: a\n    version: 1\n    text: 'Threshold?'\n    threshold: 1.5\n", "threshold"),
        ("questions:\n  - id: a\n    version: 1\n    text: 'Typo?'\n    treshold: 0.5\n", "treshold"),
        ("questions:\n  - id: a\n    version: 1\n    text: 'Examples?'\n    examples: {maybe: [x]}\n", "maybe"),
        ("questions: [unclosed\n", "YAML"),
        ("just a string\n", "dictionary"),
        ("questions:\n", "questions"),  # emptied list: None, not []
        ("questions: 5\n", "questions"),
        ("questions: [5]\n", "questions.0"),
    ],
)
def test_invalid_files_are_refused_with_a_reason(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path / "q.yaml", text)
    with pytest.raises(QuestionFileError) as info:
        load_questions(path)
    msg = str(info.value)
    assert str(path) in msg
    assert where in msg.split(str(path), 1)[1]  # the reason, not just the file name
    assert "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QuestionFileError, match="does not exist"):
        load_questions(tmp_path / "nope.yaml")


def test_question_set_is_immutable() -> None:
    qs = questions_from_sequence([q("a")])
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is an implementation detail
        qs.questions[0].version = 5  # type: ignore[misc]
    assert qs.questions[0].version == 1


# -- registry ---------------------------------------------------------------------------------------


@pytest.fixture
def qfile(tmp_path: Path) -> Path:
    return write(tmp_path / "questions.yaml", TWO, mtime=1_000_000)


def test_registry_loads_current(qfile: Path) -> None:
    reg = QuestionRegistry(qfile)
    assert [x.id for x in reg.current.questions] == ["refund_request", "customer_angry"]
    assert reg.last_error is None
    assert reg.maybe_reload() is False  # nothing changed on disk


def test_registry_reload_picks_up_an_edit(qfile: Path) -> None:
    reg = QuestionRegistry(qfile)
    v0 = reg.current.version
    write(qfile, TWO.replace("version: 1\n    text: \"Is", "version: 3\n    text: \"Is"), mtime=1_000_010)
    assert reg.maybe_reload() is True
    assert reg.current.by_id()["customer_angry"].version == 3
    assert reg.current.version != v0
    assert reg.last_error is None
    assert reg.maybe_reload() is False  # the same mtime is not reloaded twice


def test_registry_reload_picks_up_a_threshold_edit_without_changing_version(qfile: Path) -> None:
    reg = QuestionRegistry(qfile)
    v0 = reg.current.version
    write(qfile, TWO.replace("threshold: 0.5", "threshold: 0.9"), mtime=1_000_010)
    assert reg.maybe_reload() is True
    assert reg.current.by_id()["refund_request"].threshold == 0.9
    assert reg.current.version == v0


def test_registry_touch_without_change_is_not_a_change(qfile: Path) -> None:
    reg = QuestionRegistry(qfile)
    os.utime(qfile, (1_000_020, 1_000_020))
    assert reg.maybe_reload() is False
    assert reg.last_error is None


def test_registry_bad_edit_keeps_previous_set(qfile: Path) -> None:
    reg = QuestionRegistry(qfile)
    before = reg.current
    write(qfile, TWO.replace("id: customer_angry", "id: refund_request"), mtime=1_000_010)
    assert reg.maybe_reload() is False
    assert reg.current is before
    assert reg.last_error is not None and "duplicate" in reg.last_error
    assert reg.maybe_reload() is False  # not retried until the file changes again

    write(qfile, "questions: [broken\n", mtime=1_000_020)
    assert reg.maybe_reload() is False
    assert reg.current is before
    assert "YAML" in (reg.last_error or "")

    # a good edit afterwards (a new text under a new version) is taken and clears the error
    edited = TWO.replace('version: 1\n    text: "Is the customer angry?"',
                         'version: 2\n    text: "Is the customer upset?"')
    write(qfile, edited, mtime=1_000_030)
    assert reg.maybe_reload() is True
    assert reg.current.by_id()["customer_angry"].text == "Is the customer upset?"
    assert reg.last_error is None


@pytest.mark.parametrize("bad", ["questions:\n", "questions: 5\n", "[]\n", "questions: [{id: a}]\n"])
def test_registry_any_bad_shape_is_refused_not_raised(qfile: Path, bad: str) -> None:
    reg = QuestionRegistry(qfile)
    before = reg.current
    write(qfile, bad, mtime=1_000_010)
    assert reg.maybe_reload() is False  # must not raise into the service's batch loop
    assert reg.current is before
    assert reg.last_error


def test_registry_deleted_file_keeps_previous_set(qfile: Path) -> None:
    reg = QuestionRegistry(qfile)
    before = reg.current
    qfile.unlink()
    assert reg.maybe_reload() is False
    assert reg.current is before
    assert reg.last_error is not None and "does not exist" in reg.last_error


def test_registry_explicit_reload(qfile: Path) -> None:
    reg = QuestionRegistry(qfile)
    write(qfile, TWO.replace("threshold: 0.5", "threshold: 0.6"), mtime=1_000_000)
    assert reg.maybe_reload() is False  # same mtime: only SIGHUP's explicit reload sees it
    assert reg.reload() is True
    assert reg.current.by_id()["refund_request"].threshold == 0.6


# -- identity: a new meaning needs a new version -------------------------------------------------------

ANGRY_V1 = 'version: 1\n    text: "Is the customer'


ANGRY_TEXT = 'text: "Is the customer angry?"'


@pytest.mark.parametrize(
    "field, replacement",
    [
        ("text", 'text: "Is the customer happy?"'),
        ("query", ANGRY_TEXT + '\n    query: "furious, unacceptable"'),
        ("speakers", ANGRY_TEXT + "\n    speakers: [customer]"),
        ("applies_to", ANGRY_TEXT + "\n    applies_to: {channel: chat}"),
        ("examples", ANGRY_TEXT + '\n    examples: {"yes": ["this is a joke"]}'),
    ],
    ids=["text", "query", "speakers", "applies_to", "examples"],
)
def test_registry_refuses_a_new_meaning_under_the_same_version(qfile: Path, field: str, replacement: str) -> None:
    reg = QuestionRegistry(qfile)
    before = reg.current
    edited = TWO.replace(ANGRY_TEXT, replacement)
    write(qfile, edited, mtime=1_000_010)
    assert reg.maybe_reload() is False
    assert reg.current is before
    error = reg.last_error or ""
    assert f"question customer_angry changed its {field} but kept version 1" in error
    assert "bump its version" in error and "\n" not in error

    # The same edit with a new version is taken.
    write(qfile, edited.replace(ANGRY_V1, ANGRY_V1.replace("version: 1", "version: 2")), mtime=1_000_020)
    assert reg.maybe_reload() is True
    assert reg.current.by_id()["customer_angry"].version == 2
    assert reg.last_error is None


def test_registry_refuses_a_bad_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(QuestionFileError):
        QuestionRegistry(write(tmp_path / "q.yaml", "questions: []\n"))


def test_registry_on_the_example_file(tmp_path: Path) -> None:
    p = tmp_path / "questions.yaml"
    shutil.copy(EXAMPLES, p)
    reg = QuestionRegistry(p)
    assert len(reg.current.questions) == 8
    v0 = reg.current.version
    write(p, p.read_text().replace("id: data_privacy\n    version: 1", "id: data_privacy\n    version: 2"),
          mtime=os.stat(p).st_mtime + 5)
    assert reg.maybe_reload() is True
    assert reg.current.by_id()["data_privacy"].version == 2
    assert reg.current.version != v0


def test_registry_refuses_a_question_brought_back_changed_under_its_old_version(qfile: Path) -> None:
    reg = QuestionRegistry(qfile)
    without = TWO.split("  - id: customer_angry")[0]
    write(qfile, without, mtime=1_000_010)
    assert reg.maybe_reload() is True and "customer_angry" not in reg.current.by_id()
    write(qfile, TWO.replace("Is the customer angry?", "Is the customer polite?"), mtime=1_000_020)
    assert reg.maybe_reload() is False
    assert "customer_angry changed its text" in (reg.last_error or "")
    write(qfile, TWO, mtime=1_000_030)  # back as it was: the same meaning, fine
    assert reg.maybe_reload() is True and "customer_angry" in reg.current.by_id()


def test_registry_applies_threshold_band_top_k_and_head_in_place(qfile: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = QuestionRegistry(qfile)
    v0 = reg.current.version
    edited = TWO.replace("threshold: 0.5", "threshold: 0.7\n    band: [0.2, 0.8]\n    top_k: 5\n    head: refund")
    write(qfile, edited, mtime=1_000_010)
    with caplog.at_level(logging.INFO, logger="agents.questions"):
        assert reg.maybe_reload() is True
    q1 = reg.current.by_id()["refund_request"]
    assert (q1.threshold, q1.band, q1.top_k, q1.head, q1.version) == (0.7, (0.2, 0.8), 5, "refund", 1)
    assert reg.current.version == v0 and reg.last_error is None
    in_place = [r.getMessage() for r in caplog.records if "applied in place" in r.getMessage()]
    assert len(in_place) == 4, in_place
    assert "refund_request@1: threshold 0.5 -> 0.7, applied in place" in in_place[0]
