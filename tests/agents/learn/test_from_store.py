"""Learning from what the service stored (real broker and Postgres): the example conversations go
through the service once per module; each test gets a copy of that database.

- `train --from-store` writes the same heads as `flexor train` from the files, on the same labels;
- `eval --from-store` scores the held-out share exactly as `flexor eval` scores the files' eval split;
- `flexor label` with the `gold:` teacher picks by its strategy and resumes after a SIGKILL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from agents.learn.datasets import holdout_share, read_service_conversations
from agents.learn.label import candidates, choose, label_question
from agents.learn.labels_import import import_labels
from agents.learn.select import uncertainty
from agents.learn.stored import open_pool
from agents.learn.teacher import GoldTeacher
from agents.questions import load_questions
from agents.store.labels import LabelsTable, teacher_source
from stream.config import load_settings
from stream.dev.produce import load_conversations
from tests.conftest import EXAMPLES, Endpoints
from tests.harness import count_rows, produce, running_service, wait_until

pytestmark = pytest.mark.slow
QUESTIONS = EXAMPLES / "questions.yaml"
LABELS = EXAMPLES / "labels.jsonl"
FLEXOR = str(Path(sys.executable).parent / "flexor")


async def _admin(infra: Endpoints, sql: str) -> None:
    conn = await asyncpg.connect(infra.postgres_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _url(infra: Endpoints, name: str) -> str:
    return infra.postgres_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module")
async def stored_examples(infra: Endpoints) -> AsyncIterator[str]:
    """A database in which the service stored the 100 example events (97 conversations, 3 of
    them at a second revision); used only as a template."""
    name = f"tpl_{uuid.uuid4().hex[:10]}"
    await _admin(infra, f'CREATE DATABASE "{name}"')
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(None, **{
        "kafka.bootstrap_servers": infra.bootstrap_servers, "kafka.session_timeout_ms": 3000,
        "kafka.heartbeat_interval_ms": 300, "database_url": _url(infra, name),
        "topics.input": f"in-{suffix}", "topics.output": f"out-{suffix}", "topics.dlq": f"dlq-{suffix}",
        "topics.feedback": f"fb-{suffix}", "group_id": f"g-{suffix}", "questions_file": QUESTIONS,
        "metrics_port": 0, "metrics_host": "127.0.0.1", "batch.max_wait_ms": 100,
    })
    events = load_conversations(EXAMPLES / "conversations.jsonl")
    async with running_service(settings):
        await produce(settings, events)

        async def all_classified() -> bool:
            return await count_rows(settings) == len(events)

        await wait_until(all_classified, 180, "the examples classified")
    yield name
    await _admin(infra, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def stored(infra: Endpoints, stored_examples: str) -> AsyncIterator[str]:
    """A fresh copy of the stored examples; its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await _admin(infra, f'CREATE DATABASE "{name}" TEMPLATE "{stored_examples}"')
    yield _url(infra, name)
    await _admin(infra, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def env_for(database: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "FLEXOR_DATABASE_URL")}
    return {**env, "FLEXOR_DATABASE_URL": database}


def flexor(database: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEXOR, *args], env=env_for(database), capture_output=True, text=True, timeout=600)


async def _import(database: str, path: Path) -> None:
    pool = await open_pool(database, max_size=1)
    try:
        await import_labels(pool, path, load_questions(QUESTIONS))
    finally:
        await pool.close()


async def test_train_from_store_equals_train_from_files(stored: str, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in LABELS.read_text().splitlines()]
    few = [r for r in rows if r["question_id"] == "data_privacy"]
    few = [r for r in few if r["answer"] == "yes"][:2] + [r for r in few if r["answer"] == "no"][:5]
    subset = [r for r in rows if r["question_id"] == "customer_angry"] + few
    labels = tmp_path / "subset.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in subset))
    only = ["--only", "customer_angry", "data_privacy"]
    files = flexor(stored, "train", "--conversations", str(EXAMPLES / "conversations.jsonl"), "--questions",
                   str(QUESTIONS), "--answers", str(labels), "--split", "all", "--out", str(tmp_path / "files"), *only)
    assert files.returncode == 0, files.stderr
    await _import(stored, labels)
    store = flexor(stored, "train", "--from-store", "--questions", str(QUESTIONS), "--split", "all",
                   "--out", str(tmp_path / "store"), *only)
    assert store.returncode == 0, store.stderr
    assert "nothing embedded again" in store.stderr
    assert "data_privacy: 2 positives and 5 negatives (need 3 of each) in split all: keeps the zero-shot path" \
        in store.stderr

    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("files", "store"))
    assert b["from_store"] and b["conversations"] == a["conversations"] == 97
    # Labels of an earlier revision than the newest (the one stored) are left out alike.
    newest = {c.conversation_id: c.revision for c in read_service_conversations(EXAMPLES / "conversations.jsonl")}
    kept = [r for r in subset if r["revision"] == newest[r["conversation_id"]]]
    assert len(kept) < len(subset)
    assert b["notes"] == a["notes"] == [f"{len(subset) - len(kept)} labels left out: another revision"]
    for qid in ("customer_angry", "data_privacy"):
        assert b["questions"][qid].pop("labels_by_source") == {"import": sum(r["question_id"] == qid for r in kept)}
        assert a["questions"][qid] == b["questions"][qid], qid
    assert b["questions"]["data_privacy"]["path"] == "zero-shot"
    assert (tmp_path / "files" / "lexicon.json").read_text() == (tmp_path / "store" / "lexicon.json").read_text()
    for head in ("customer_angry",):
        meta = [json.loads((tmp_path / d / head / "head.json").read_text()) for d in ("files", "store")]
        for m in meta:
            m.pop("created")
        assert meta[0] == meta[1]
        with np.load(tmp_path / "files" / head / "weights.npz") as x, np.load(tmp_path / "store" / head /
                                                                              "weights.npz") as y:
            assert set(x.files) == set(y.files)
            for k in x.files:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{head}/{k}")


async def test_eval_from_store_scores_the_held_out_share_like_the_files(stored: str, tmp_path: Path) -> None:
    await _import(stored, LABELS)
    files = flexor(stored, "eval", "--conversations", str(EXAMPLES / "conversations.jsonl"), "--questions",
                   str(QUESTIONS), "--answers", str(LABELS), "--split", "eval", "--report", str(tmp_path / "f"),
                   "--no-progress")
    assert files.returncode == 0, files.stderr
    store = flexor(stored, "eval", "--from-store", "--questions", str(QUESTIONS), "--report", str(tmp_path / "s"),
                   "--no-progress")
    assert store.returncode == 0, store.stderr
    f, s = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("f", "s"))
    held_out = {c.conversation_id for c in read_service_conversations(EXAMPLES / "conversations.jsonl")
                if holdout_share(c.conversation_id) < 0.2}
    assert 5 < s["conversations"] == len(held_out) == f["conversations"] < 40
    assert s["embedding_cache"] == "stored vectors" and s["labelled_pairs"] == f["labelled_pairs"]
    for qid, entry in f["questions"].items():
        # The ECE floor is a seeded simulation over the rows in their order (file vs table order).
        got = s["questions"][qid]
        assert got.pop("ece_floor") == pytest.approx(entry.pop("ece_floor"), abs=0.05)
        assert got == entry, qid
    assert s["macro_f1"] == f["macro_f1"]
    answers = [sorted((tmp_path / d / "answers.jsonl").read_text().splitlines()) for d in ("f", "s")]
    assert answers[0] == answers[1]
    assert {json.loads(line)["conversation_id"] for line in answers[1]} == held_out


async def test_label_gold_picks_by_strategy(stored: str, tmp_path: Path) -> None:
    from agents.learn.evaluate import build_pipeline
    from models.embedder import load_embedder

    questions = load_questions(QUESTIONS).by_id()
    q = questions["customer_angry"]
    embedder = load_embedder("onnx-int8")
    pipeline, _, _ = build_pipeline(embedder, None)
    teacher = GoldTeacher(LABELS)
    rows = [r for r in map(json.loads, LABELS.read_text().splitlines())
            if r["question_id"] == "customer_angry" and r["revision"] == 1]
    seed_labels = tmp_path / "seed.jsonl"  # both answers: past the cold start, uncertainty alone picks
    both = [r for r in rows if r["answer"] == "yes"][:3] + [r for r in rows if r["answer"] == "no"][:3]
    seed_labels.write_text("".join(json.dumps(r) + "\n" for r in both))
    await _import(stored, seed_labels)
    pool = await open_pool(stored, max_size=2)
    try:
        run = await label_question(pool, q, teacher, 5, strategy="uncertainty", cascade=pipeline.cascade,
                                   embedder_id=embedder.model_id)
        assert (run.asked, run.had, run.cost.pairs) == (5, 0, 5)
        got = [g for g in await LabelsTable(pool).fetch(["customer_angry"]) if g.source != "import"]
        assert len(got) == 5 and {g.source for g in got} == {teacher_source("gold:labels.jsonl")}
        gold = {(r["conversation_id"], r["revision"]): r["answer"]
                for r in map(json.loads, LABELS.read_text().splitlines()) if r["question_id"] == "customer_angry"}
        assert all(gold[(g.conversation_id, g.revision)] == g.answer for g in got)
        # The picks are among the conversations whose zero-shot p_yes, computed afresh by the
        # service's pipeline on the files, lies closest to the threshold.
        convs = read_service_conversations(EXAMPLES / "conversations.jsonl")
        result = await pipeline.classify(convs, load_questions(QUESTIONS))
        p = {c.conversation_id: next(a.p_yes for a in row if a.question_id == q.id)
             for c, row in zip(convs, result.answers, strict=True)}
        u = {cid: float(uncertainty(np.array([v]), q.threshold)[0]) for cid, v in p.items()}
        ranked = sorted(u.values(), reverse=True)
        picked = [u[g.conversation_id] for g in got]
        assert min(picked) >= ranked[10 * 5 - 1] - 1e-6  # inside the prefilter (10 x the budget)
        assert np.mean(picked) > np.mean(list(u.values())) + 0.1
        # The budget counts: asking again for 5 asks nothing; 12 asks 7 more, none twice, at random.
        again = await label_question(pool, q, teacher, 5, strategy="random")
        assert (again.had, again.asked) == (5, 0)
        more = await label_question(pool, q, teacher, 12, strategy="random", seed=3)
        assert more.asked == 7 and len(await LabelsTable(pool).fetch(["customer_angry"])) == 6 + 12
    finally:
        await pool.close()


async def test_label_resumes_after_a_kill(stored: str, tmp_path: Path) -> None:
    """The label process is SIGKILLed while it waits to store its second batch (the test holds an
    uncommitted row of that batch); the rerun asks only for the rest of the budget."""
    q = load_questions(QUESTIONS).by_id()["refund_request"]
    teacher = GoldTeacher(LABELS)
    pool = await open_pool(stored, max_size=2)
    try:
        cands = await candidates(pool, q, teacher)
        order = [cands[i] for i in choose("random", 9, 13, n_candidates=len(cands))]
    finally:
        await pool.close()
    blocker = order[3]  # the first pair of the second batch of 3
    hold = await asyncpg.connect(stored)
    tx = hold.transaction()
    await tx.start()
    await hold.execute("INSERT INTO labels VALUES ($1, $2, $3, $4, 1, 'no', 'human', 'blocker')",
                       blocker.tenant_id, blocker.conversation_id, blocker.revision, q.id)
    args = ["label", "--teacher", f"gold:{LABELS}", "--question", q.id, "--budget", "9", "--strategy", "random",
            "--concurrency", "3", "--questions", str(QUESTIONS)]
    log = tmp_path / "label.log"
    with open(log, "w") as out:  # noqa: ASYNC230
        proc = subprocess.Popen([FLEXOR, *args], env=env_for(stored), stdout=out, stderr=out)  # noqa: ASYNC220
    watch = await asyncpg.connect(stored)  # not in a transaction: pg_stat_activity is read afresh
    try:
        async def waiting_on_the_lock() -> bool:
            n = await watch.fetchval("SELECT count(*) FROM labels WHERE source LIKE 'teacher:%'")
            waiting = await watch.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                           "AND datname = current_database()")
            assert proc.poll() is None, log.read_text()
            return n == 3 and waiting == 1

        await wait_until(waiting_on_the_lock, 120, "the first batch stored and the second waiting")
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        await tx.rollback()
        await watch.close()
    first = {r["conversation_id"] for r in await hold.fetch("SELECT conversation_id FROM labels")}
    await hold.close()
    assert first == {c.conversation_id for c in order[:3]}

    rerun = flexor(stored, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert "answered 6 pairs" in rerun.stdout and "now 9/9" in rerun.stdout, rerun.stdout
    pool = await open_pool(stored, max_size=1)
    try:
        got = await LabelsTable(pool).fetch([q.id])
    finally:
        await pool.close()
    assert len(got) == 9 and first <= {g.conversation_id for g in got}
    assert {g.source for g in got} == {"teacher:gold:labels.jsonl"}
