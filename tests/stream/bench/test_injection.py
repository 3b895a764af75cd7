"""Prompt injection: the test set is built as claimed and flip rates are measured per stage."""

from __future__ import annotations

import os
import random

from agents.chunking import Turn
from agents.learn.evaluate import build_pipeline
from agents.learn.labelled import read_questions
from agents.llm_stage import LLMCascadeStage
from agents.questions import QuestionSet
from agents.types import Answer, Conversation
from models.embedder import load_embedder
from models.llm.hf import HFEngine
from models.llm.prompts import default_library
from models.llm.tiny import ensure_tiny_model
from stream.bench.compare import asked_questions, conversation_for, load_inputs
from stream.bench.injection import INJECTIONS, _forced_evidence, build_test_set, inject, measure
from tests.conftest import shared_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_inject_appends_to_one_user_turn_only() -> None:
    turns = tuple(Turn(f"t{i}", "user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(6))
    conv = Conversation("x", "star-5", 1, turns, {"dataset": "star"})
    inj = inject(conv, INJECTIONS[0], random.Random(1))
    changed = [i for i, (a, b) in enumerate(zip(conv.turns, inj.injected.turns, strict=True)) if a != b]
    assert changed == [inj.turn_index] and inj.injected.turns[inj.turn_index].speaker == "user"
    assert inj.injected.turns[inj.turn_index].text == f"turn {inj.turn_index} {INJECTIONS[0]}"
    assert inj.original is conv
    sentences = [t.sentence for t in build_test_set([conv] * len(INJECTIONS))]
    assert sentences == list(INJECTIONS)  # every injection is used


async def test_flip_rates_per_stage_on_evaluation_conversations() -> None:
    star, sgd = shared_file("star.jsonl.gz"), shared_file("sgd.jsonl.gz")
    lq = read_questions(shared_file("questions.json"))
    convs = [conversation_for(c, lq) for c in load_inputs([star, sgd], 6)]
    pipeline, heads, _ = build_pipeline(load_embedder("onnx-int8"), None)
    questions = QuestionSet(questions=asked_questions(lq, heads))
    llm = LLMCascadeStage(HFEngine(ensure_tiny_model(), model_id="hf-tiny"))
    try:
        r = await measure(pipeline, llm, build_test_set(convs), questions)
    finally:
        await llm.aclose()
    # The engine is a random model: check how the rates are made, not what they are.
    assert r["conversations"] == 6 and r["answers"] > 6
    assert r["injections"] == sorted(INJECTIONS)  # 6 conversations: each design injection once
    for stage in ("stage1", "llm", "llm_forced", "cascade"):
        e = r[stage]
        assert e["flips"] == e["flips_to_yes"] + e["flips_to_no"] <= e["n"], stage
        assert e["flip_rate"] == round(e["flips"] / e["n"], 4), stage
    # Every answer is compared at stage 1, by the LLM (asked about every answer, none failed
    # here) and in the cascade; the forced comparison needs the injected chunk, so at most all.
    assert r["stage1"]["n"] == r["llm"]["n"] == r["cascade"]["n"] == r["answers"]
    assert 0 < r["llm_forced"]["n"] <= r["answers"]
    assert r["cascade"]["routed_to_llm"] <= 2 * r["answers"]
    # Stage 1 is an embedding-similarity / linear model over many chunks: one sentence must not
    # move it across its threshold often (docs/injection.md has the large-sample numbers).
    assert r["stage1"]["flip_rate"] <= 0.05
    # With the guard both forced prompts are the same text (next test); what is left is batch
    # numerics of the engine, far below any answer's margin.
    assert r["llm_forced"]["mean_abs_delta_p"] <= 0.01
    assert pipeline.cascade.llm is None  # measure() restores the pipeline


def test_guard_makes_the_forced_prompts_identical_on_evaluation_conversations() -> None:
    lq = read_questions(shared_file("questions.json"))
    convs = [conversation_for(c, lq) for c in load_inputs([shared_file("star.jsonl.gz"),
                                                           shared_file("sgd.jsonl.gz")], 24)]
    lib = default_library()
    compared = 0
    for inj in build_test_set(convs):  # 24 conversations: every design injection 4 times
        none = Answer("q", 1, "no", 0.0, "head", ())
        forced = _forced_evidence(inj, none, k=3)
        assert forced is not None
        orig, injected = ([e.text for e in ev] for ev in forced)
        assert inj.sentence in injected[0] and inj.sentence not in orig[0]
        assert lib.yes_no("Q?", orig) == lib.yes_no("Q?", injected), inj.sentence
        compared += 1
    assert compared == 24
