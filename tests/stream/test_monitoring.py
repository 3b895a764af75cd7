"""The answer monitors in the running service, on the real broker and Postgres: audit sampling
(the tiny LLM), drift against a topic-mix shift and shadow heads (heads trained here on a slice
of ../shared/data), and `promtool check metrics` on the live /metrics of both runs."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from agents.audit import STAGE1
from agents.learn.labelled import read_answers, split_of
from stream.config import Settings
from stream.dev.produce import load_conversations, to_conversation_v1
from tests.conftest import EXAMPLES, Endpoints, fresh_database, make_settings, shared_file
from tests.harness import create_topics, metric, produce, read_topic, running_service, wait_until
from tests.promtool import promtool


@dataclass
class Run:
    settings: Settings
    registry: Any
    scrape: str
    outputs: list[dict[str, Any]]
    labels: list[asyncpg.Record]
    extra: dict[str, Any]


async def _scrape(port: int) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        return await r.text()


async def _labels(settings: Settings) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        return await conn.fetch("SELECT * FROM labels ORDER BY conversation_id, question_id")
    finally:
        await conn.close()


async def _classified(running: Any, n: int) -> None:
    async def done() -> bool:
        return metric(running.metrics.registry, "flexor_conversations_classified_total") >= n

    await wait_until(done, 300, f"{n} conversations classified")
    await running.service.monitor.drain()  # the last batch's checks run behind its publication


# -- audit sampling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def audit_runs(infra: Endpoints) -> AsyncIterator[dict[str, Run]]:
    """The same 12 example conversations through two services with the tiny LLM: one audits every
    event (rate 1.0), the other none."""
    events = load_conversations(EXAMPLES / "conversations.jsonl", 12)
    runs: dict[str, Run] = {}

    # Loading two transformers models at once in two threads fails inside transformers: the second
    # service starts once the first has its model.
    first_loaded = asyncio.Event()

    async def run(name: str, rate: float, db: str, after: asyncio.Event | None) -> None:
        s = make_settings(infra, db, **{"models.llm": "hf-tiny", "models.llm_audit_rate": rate})
        await create_topics(s)
        if after is not None:
            await after.wait()
        async with running_service(s) as running:
            first_loaded.set()
            await produce(s, events)
            await _classified(running, len(events))
            scrape = await _scrape(running.http_port)
        outputs = [orjson.loads(r.value) for r in await read_topic(s, s.topics.output)]
        runs[name] = Run(s, running.metrics.registry, scrape, outputs, await _labels(s), {})

    async with fresh_database(infra) as audited_db, fresh_database(infra) as plain_db:
        # side by side: the two start-ups overlap
        await asyncio.gather(run("audited", 1.0, audited_db, None), run("plain", 0.0, plain_db, first_loaded))
        yield runs


def _answers(run: Run) -> dict[tuple[str, int, str], dict[str, Any]]:
    return {(e["conversation_id"], e["revision"], a["question_id"]): a for e in run.outputs for a in e["answers"]}


async def test_audit_leaves_the_published_answers_unchanged(audit_runs: dict[str, Run]) -> None:
    audited, plain = audit_runs["audited"], audit_runs["plain"]
    assert len(audited.outputs) == 12
    by_event = [{e["event_id"]: e["answers"] for e in run.outputs} for run in (audited, plain)]
    assert by_event[0] == by_event[1]
    assert plain.labels == []
    assert plain.registry.get_sample_value("flexor_audit_answers_total", {"question_id": "refund_request",
                                                                        "result": "agree"}) is None


async def test_every_audited_answer_is_a_label_and_counts_for_agreement(audit_runs: dict[str, Run]) -> None:
    run = audit_runs["audited"]
    published = _answers(run)
    stage1 = {k for k, a in published.items() if a["decided_by"] in STAGE1}
    assert len(stage1) >= 50  # the examples' zero-shot answers, minus the LLM's band
    got = {(r["conversation_id"], r["revision"], r["question_id"]): r for r in run.labels}
    assert set(got) == stage1  # rate 1.0: every confident answer, and nothing the LLM decided
    assert {r["source"] for r in run.labels} == {"teacher:hf-tiny"}
    assert {r["given_by"] for r in run.labels} == {"audit"}
    tenants = {e["conversation_id"]: e["tenant_id"] for e in run.outputs}
    assert all(tenants[r["conversation_id"]] == r["tenant_id"] for r in run.labels)
    for qid in {k[2] for k in stage1}:
        pairs = [(got[k]["answer"], published[k]["answer"]) for k in stage1 if k[2] == qid]
        agree = run.registry.get_sample_value("flexor_audit_answers_total", {"question_id": qid, "result": "agree"})
        disagree = run.registry.get_sample_value("flexor_audit_answers_total",
                                                 {"question_id": qid, "result": "disagree"})
        assert (agree or 0) == sum(t == p for t, p in pairs), qid
        assert (disagree or 0) == sum(t != p for t, p in pairs), qid
    assert run.registry.get_sample_value("flexor_stage_seconds_count", {"stage": "audit"}) >= 1
    assert metric(run.registry, "flexor_audit_failures_total", {"reason": "llm"}) == 0


def test_promtool_accepts_the_live_metrics_of_an_auditing_service(audit_runs: dict[str, Run]) -> None:
    scrape = audit_runs["audited"].scrape
    for family in ("flexor_audit_answers_total", "flexor_drift_yes_rate", "flexor_answers_total",
                   "flexor_stage_seconds_bucket", "flexor_ready"):
        assert f"\n{family}{{" in scrape or f"\n{family} " in scrape, family
    result = promtool("check", "metrics", stdin=scrape.encode())
    assert result.returncode == 0, result.stdout + result.stderr


# -- drift and shadow heads ---------------------------------------------------------------------------

QUESTIONS = ["q00", "q08", "q12"]  # q00 (SGD: book a restaurant table) is the one the shift moves
WINDOW = 200


def _lines(name: str) -> list[str]:
    with gzip.open(shared_file(name), "rt", encoding="utf-8") as f:
        return f.readlines()


def _cid(line: str) -> str:
    return json.loads(line)["conversation_id"]


def _train(out: Path, data: Path, *extra: str) -> None:
    from agents.learn import train

    code = train.main(["--conversations", str(data), "--questions", str(shared_file("questions.json")),
                       "--answers", str(shared_file("answers.jsonl.gz")), "--split", "train",
                       "--only", *QUESTIONS, "--out", str(out), *extra])
    assert code == 0


def _events(lines: list[str]) -> list[dict[str, Any]]:
    return [to_conversation_v1(orjson.loads(line)) for line in lines]


def _readings(registry: Any) -> dict[str, dict[str, float | None]]:
    return {q: {"psi": registry.get_sample_value("flexor_drift_psi", {"question_id": q}),
                "yes_rate": registry.get_sample_value("flexor_drift_yes_rate", {"question_id": q})}
            for q in QUESTIONS}


def _shadow(registry: Any) -> dict[str, tuple[float, float]]:
    return {q: (metric(registry, "flexor_shadow_answers_total", {"question_id": q, "result": "agree"}),
                metric(registry, "flexor_shadow_answers_total", {"question_id": q, "result": "disagree"}))
            for q in QUESTIONS}


@pytest.fixture(scope="module")
async def drift_run(infra: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Run]:
    """Few-shot heads trained on a strided slice of the training split (live: 10 shots; candidate:
    5 shots, another seed), then two phases through one service with a drift window of 200:
    1. 200 SGD and 200 STAR conversations of the evaluation split: the training mix;
    2. 200 SGD conversations in which the user books a restaurant table (from training-split
       conversations the heads never saw) and 200 more STAR ones: only q00's traffic shifts."""
    root = tmp_path_factory.mktemp("drift")
    star, sgd = _lines("star.jsonl.gz"), _lines("sgd.jsonl.gz")
    train = [[x for x in lines if split_of(_cid(x)) == "train"] for lines in (star, sgd)]
    sample = train[0][::16] + train[1][::40]
    with gzip.open(root / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(sample)
    await asyncio.to_thread(_train, root / "live", root / "train.jsonl.gz", "--shots", "10")
    await asyncio.to_thread(_train, root / "candidate", root / "train.jsonl.gz", "--shots", "5", "--seed", "7")

    seen = {_cid(x) for x in sample}
    gold = read_answers(shared_file("answers.jsonl.gz"))
    star_eval = [x for x in star if split_of(_cid(x)) == "eval"][::3]
    sgd_eval = [x for x in sgd if split_of(_cid(x)) == "eval"][::10][:WINDOW]
    restaurant = [x for x in sgd if split_of(_cid(x)) == "train" and _cid(x) not in seen
                  and gold.get(("q00", _cid(x)))][::5][:WINDOW]
    phase1 = _events([x for pair in zip(sgd_eval, star_eval[:WINDOW], strict=True) for x in pair])
    phase2 = _events([x for pair in zip(restaurant, star_eval[WINDOW : 2 * WINDOW], strict=True) for x in pair])
    assert len(phase1) == len(phase2) == 2 * WINDOW
    (root / "phase1.jsonl").write_bytes(b"\n".join(orjson.dumps(e) for e in phase1) + b"\n")

    async with fresh_database(infra) as db:
        s = make_settings(infra, db, **{
            "models.heads_dir": root / "live", "models.shadow_heads_dir": root / "candidate",
            "questions_file": root / "live" / "questions.yaml", "drift.window": WINDOW, "drift.min_answers": WINDOW,
        })
        yield await _drift_phases(s, phase1, phase2, root)


async def _drift_phases(s: Settings, phase1: list[dict[str, Any]], phase2: list[dict[str, Any]], root: Path) -> Run:
    await create_topics(s)
    async with running_service(s) as running:
        reg = running.metrics.registry
        await produce(s, phase1)
        await _classified(running, len(phase1))
        before, shadow1 = _readings(reg), _shadow(reg)
        yes1 = {q: metric(reg, "flexor_answers_total", {"question_id": q, "answer": "yes", "decided_by": "few-shot"})
                for q in QUESTIONS}
        await produce(s, phase2)
        await _classified(running, len(phase1) + len(phase2))
        after = _readings(reg)
        scrape = await _scrape(running.http_port)
    print(f"DRIFT-PSI {json.dumps({'before_shift': before, 'after_shift': after}, sort_keys=True)}")
    return Run(s, reg, scrape, [], [], {"before": before, "after": after, "shadow_phase1": shadow1,
                                        "yes_phase1": yes1, "root": root})


@pytest.mark.slow
async def test_psi_crosses_0_2_for_the_shifted_question_only(drift_run: Run) -> None:
    before, after = drift_run.extra["before"], drift_run.extra["after"]
    for q in QUESTIONS:
        assert before[q]["psi"] is not None and before[q]["psi"] < 0.2, (q, before[q])
    assert after["q00"]["psi"] > 0.2, after["q00"]
    assert after["q08"]["psi"] < 0.2 and after["q12"]["psi"] < 0.2, after
    # every phase-2 SGD conversation is a restaurant booking: the yes-rate shows it too
    assert after["q00"]["yes_rate"] > before["q00"]["yes_rate"] + 0.3


@pytest.mark.slow
async def test_shadow_agreement_is_what_heads_diff_prints_offline(drift_run: Run) -> None:
    from stream.dev.heads_diff import diff

    root = drift_run.extra["root"]
    offline = diff(argparse.Namespace(
        live=str(root / "live"), candidate=str(root / "candidate"), conversations=[root / "phase1.jsonl"],
        questions=None, limit=None, embedder="onnx-int8", json=None,
    ))["questions"]
    online = drift_run.extra["shadow_phase1"]
    assert set(QUESTIONS) <= set(offline)
    # The heads' questions.yaml keeps every question; those without a head are zero-shot on both sides.
    assert all(offline[q]["agreement"] == 1.0 for q in set(offline) - set(QUESTIONS))
    for q in QUESTIONS:
        agree, disagree = online[q]
        assert agree + disagree == offline[q]["n"] == WINDOW, q
        assert agree == round(offline[q]["agreement"] * offline[q]["n"]), q
    assert any(disagree for _, disagree in online.values())  # the candidate is a different model
    # The published answers are the live heads' (the candidate's are never published).
    published_yes = drift_run.extra["yes_phase1"]
    for q in QUESTIONS:
        assert published_yes[q] == round(offline[q]["live_yes_rate"] * WINDOW), q
    assert any(round(offline[q]["candidate_yes_rate"] * WINDOW) != published_yes[q] for q in QUESTIONS)


@pytest.mark.slow
def test_promtool_accepts_the_live_metrics_with_drift_and_shadow(drift_run: Run) -> None:
    for family in ("flexor_drift_psi", "flexor_drift_reference_yes_rate", "flexor_shadow_answers_total"):
        assert f"\n{family}{{" in drift_run.scrape, family
    result = promtool("check", "metrics", stdin=drift_run.scrape.encode())
    assert result.returncode == 0, result.stdout + result.stderr

