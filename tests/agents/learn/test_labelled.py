"""Split rules, label/scope/exclude logic and the leak-free conversion of labelled records."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from agents.learn.labelled import (
    LabelledConversation,
    Split,
    dataset_of,
    in_split,
    iter_gold,
    question_set,
    read_answers,
    read_conversations,
    read_questions,
    split_of,
    to_conversation,
)


@pytest.mark.parametrize(
    ("cid", "split"),
    [
        ("sgd-train-1_00000", Split.TRAIN),
        ("sgd-train-44_00099", Split.TRAIN),
        ("sgd-dev-1_00000", Split.EVAL),
        ("star-1", Split.TRAIN),
        ("star-4", Split.TRAIN),
        ("star-5", Split.EVAL),
        ("star-10", Split.EVAL),
        ("star-0", Split.EVAL),
        ("star-1234", Split.TRAIN),
        ("star-1235", Split.EVAL),
    ],
)
def test_split_rules(cid: str, split: Split) -> None:
    assert split_of(cid) is split
    assert in_split(cid, split)
    assert in_split(cid, "all")
    other = Split.EVAL if split is Split.TRAIN else Split.TRAIN
    assert not in_split(cid, other)


def test_unknown_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        split_of("multiwoz-1")
    with pytest.raises(ValueError):
        dataset_of("abc")


QUESTIONS = [
    {"question_id": "qa", "dataset": "star", "question": "Did the user report fraud?",
     "positive_label": "task:fraud", "scope": [], "exclude": ["flag:multitask"], "n_yes": 1, "n_no": 1},
    {"question_id": "qb", "dataset": "star", "question": "Was the user annoyed at all?",
     "positive_label": "wq:annoyed=yes", "scope": ["wq:annoyed=yes|wq:annoyed=no"], "exclude": []},
    {"question_id": "qc", "dataset": "sgd", "question": "Did the user ask for a ride?",
     "positive_label": "intent:GetRide|intent:Taxi", "scope": [], "exclude": []},
]


def _conv(cid: str, *labels: str) -> LabelledConversation:
    return LabelledConversation(cid, (("user", "hi"), ("assistant", "hello")), frozenset(labels))


def test_label_scope_exclude(tmp_path: Path) -> None:
    (tmp_path / "q.json").write_text(json.dumps(QUESTIONS))
    qa, qb, qc = read_questions(tmp_path / "q.json")
    assert qc.positive_label == ("intent:GetRide", "intent:Taxi")
    # positive label present -> yes; absent -> no; other dataset -> not asked
    assert qa.gold(_conv("star-1", "task:fraud")) is True
    assert qa.gold(_conv("star-1", "task:other")) is False
    assert qa.gold(_conv("sgd-train-1", "task:fraud")) is None
    # exclude wins over a positive label
    assert qa.gold(_conv("star-1", "task:fraud", "flag:multitask")) is None
    # scope: asked only when one of the alternatives is present
    assert qb.gold(_conv("star-2")) is None
    assert qb.gold(_conv("star-2", "wq:annoyed=no")) is False
    assert qb.gold(_conv("star-2", "wq:annoyed=yes")) is True
    # any of the | alternatives is positive
    assert qc.gold(_conv("sgd-dev-3", "intent:Taxi")) is True
    assert qc.gold(_conv("sgd-dev-3", "intent:GetRide")) is True
    assert qc.gold(_conv("sgd-dev-3", "intent:Other")) is False


def test_reader_split_limit_and_no_leak(tmp_path: Path) -> None:
    rows = [
        {"conversation_id": f"star-{i}", "turns": [{"speaker": "user", "text": f"hello {i}"},
                                                   {"speaker": "assistant", "text": "hi"}],
         "labels": ["task:fraud"], "meta": {"user_task": "be annoying", "secret": 1}}
        for i in range(1, 11)
    ]
    rows.append({"conversation_id": "star-99", "turns": [], "labels": [], "meta": {}})  # empty: skipped
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert [c.conversation_id for c in read_conversations([path], "eval")] == ["star-5", "star-10"]
    assert len(read_conversations([path], "train")) == 8
    assert len(read_conversations([path], "all")) == 10
    assert len(read_conversations([path], "all", limit=3)) == 3

    conv = to_conversation(read_conversations([path], "eval")[0])
    assert conv.tenant_id == "eval" and conv.revision == 1
    assert conv.metadata == {"dataset": "star"}  # never labels, never meta
    assert [t.turn_id for t in conv.turns] == ["t1", "t2"]
    assert conv.turns[0].speaker == "user" and conv.turns[0].text == "hello 5"
    assert "fraud" not in repr(conv) and "annoying" not in repr(conv)


def test_answers_and_gold_alignment(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in [
            {"question_id": "qa", "conversation_id": "star-1", "answer": "yes"},
            {"question_id": "qa", "conversation_id": "star-2", "answer": "no"},
            {"question_id": "qa", "conversation_id": "star-3", "answer": "no"},
        ])
    )
    gold = read_answers(path, ids={"star-1", "star-2"})
    assert gold == {("qa", "star-1"): True, ("qa", "star-2"): False}
    (tmp_path / "q.json").write_text(json.dumps(QUESTIONS))
    qs = read_questions(tmp_path / "q.json")
    convs = [_conv("star-2"), _conv("star-7"), _conv("star-1")]
    got = {q.question_id: (idx, y) for q, idx, y in iter_gold(qs, convs, gold)}
    assert got["qa"] == ([0, 2], [False, True])
    assert got["qb"] == ([], [])


def test_question_set_export(tmp_path: Path) -> None:
    (tmp_path / "q.json").write_text(json.dumps(QUESTIONS))
    qs = question_set(read_questions(tmp_path / "q.json"), heads={"qa": "qa"})
    by_id = qs.by_id()
    assert by_id["qa"].head == "qa" and by_id["qb"].head is None
    assert by_id["qc"].applies({"dataset": "sgd"}) and not by_id["qc"].applies({"dataset": "star"})
