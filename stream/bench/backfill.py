"""`flexor bench --backfill`: backfill against streaming on the same conversations, and corpus search
on the whole corpus.

1. Stream: the service (embedded broker + Postgres) classifies the conversations with every
   question but the last; conversations/s from the first produce to the last output event.
   It runs twice, with the embedding reuse cache off so that both passes embed every chunk:
   first without the HNSW index of corpus search (that run also warms up), then, on new
   revisions, with it, as the service runs in production; the second run is the one
   backfill is compared with, and the pair is the index's cost on the live path.
2. Backfill: the last question is added to the questions file and `flexor backfill`'s enqueue
   runs for it; conversations/s from the start of the scan until the job is done (rate limit off:
   this measures capacity). Nothing is embedded again. With gold answers, the backfilled
   answers' F1 for that question.
3. Live latency: new revisions produced at half the streaming rate, alone and then while a
   backfill of the question's next version runs at the default `backfill.max_rate`.
4. Search: every conversation of the files (not just --limit) stored in a fresh database with
   the chunker and embedder of the service (through the embedding cache), the HNSW index built
   by migration 005 (timed), then recall@k of `CorpusSearch` against exact search and its
   latency, for a range of ef_search. Recall counts an approximate hit as right when it is at
   least as close as the k-th exact hit (ties between equal vectors make set overlap arbitrary).
   The queries are the question texts and customer turns sampled from the corpus.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
import yaml

from agents.learn.labelled import source_names
from agents.questions import Question, QuestionSet, load_questions
from stream.bench import embedded_settings, machine, write_json
from stream.config import Settings
from stream.dev.produce import load_conversations, produce_events, read_jsonl

K = 20
EF_SWEEP = (100, 200, 400, 600, 1000)
SEARCH_QUERIES = 200
LATENCY_EVENTS = 200


def run_backfill_bench(args: argparse.Namespace) -> int:
    from stream.dev.infra import EmbeddedStack

    if args.questions is None:
        raise ValueError("--backfill needs --questions")
    qset = _question_set(args.questions, args.heads)
    if len(qset.questions) < 2:
        raise ValueError(f"{args.questions}: --backfill needs at least two questions")
    events = [e for path in args.conversations for e in load_conversations(path, args.limit)]
    gold = _gold(args.answers) if args.answers else None
    with tempfile.TemporaryDirectory(prefix="flexor-bench-") as tmp, EmbeddedStack() as stack:
        qfile = Path(tmp) / "questions.yaml"
        # Reuse cache off: the streaming phase runs the same conversations twice (without, then
        # with the HNSW index), and a warm cache would make the second pass embed nothing.
        extra: dict[str, Any] = {"backfill.max_rate": 0, "models.embedding_cache_mb": 0}
        if args.heads:
            extra["models.heads_dir"] = args.heads
        settings = embedded_settings(stack, "bench", qfile, **extra)
        loads = [os.getloadavg()]
        result = asyncio.run(_service_phases(settings, qfile, qset, events, gold))
        loads.append(os.getloadavg())
        result["search"] = asyncio.run(_search(stack.postgres.url, args.conversations, settings.models.embedder, qset))
        loads.append(os.getloadavg())
    result["load_average_1m"] = [round(x[0], 2) for x in loads]
    result["machine"] = machine()
    result["conversations"] = source_names(args.conversations)
    path = write_json(args.report, result)
    b, s, live = result["backfill"], result["search"], result["live"]
    print(
        f"backfill {b['conversations_per_s']:.0f} conv/s vs streaming {b['stream_conversations_per_s']:.1f} conv/s "
        f"(x{b['ratio']:.1f}); live p95 {live['p95_ms_alone']:.0f} ms alone, {live['p95_ms_during_backfill']:.0f} ms "
        f"during a backfill; search over {s['chunks']} chunks: recall@{K} {s['recall_at_20']:.3f}, "
        f"p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms -> {path}"
    )
    return 0


def _question_set(path: Path, heads: Path | None) -> QuestionSet:
    """questions.yaml as is, or the labelled data's questions.json (with trained heads if given)."""
    if path.suffix == ".json":
        from agents.heads import head_ids_by_question
        from agents.learn.labelled import question_set, read_questions

        return question_set(read_questions(path), head_ids_by_question(heads) if heads else None)
    return load_questions(path)


def _write(path: Path, questions: list[Question]) -> QuestionSet:
    data = {"questions": [q.model_dump(mode="json", exclude_none=True) for q in questions]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_questions(path)


def _gold(path: Path) -> dict[tuple[str, str], bool]:
    """(question id, conversation id) -> yes, from the labelled answers or labels JSONL."""
    return {(r["question_id"], r["conversation_id"]): r["answer"] == "yes" for r in read_jsonl(path)}


async def _service_phases(
    settings: Settings, qfile: Path, qset: QuestionSet, events: list[dict[str, Any]],
    gold: dict[tuple[str, str], bool] | None,
) -> dict[str, Any]:
    from agents.store import create_pool
    from agents.store.backfill import BackfillJobs
    from agents.store.search import CREATE_INDEX_SQL
    from stream.app import Running, run_service
    from stream.backfill import Pacer
    from stream.backfill_command import enqueue, follow
    from stream.bench.e2e import OutputWatcher
    from stream.config import BackfillConfig
    from stream.kafka import ensure_topics, make_producer

    held = qset.questions[-1]
    before = _write(qfile, qset.questions[:-1])
    t = settings.topics
    await ensure_topics(settings.kafka, t)
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    service = asyncio.create_task(run_service(settings, on_running=started.set_result, install_signals=False))
    running = await started
    while not (running.service.consumer and running.service.consumer.assignment()
               and running.backfill.consumer and running.backfill.consumer.assignment()):
        if service.done():
            service.result()
        await asyncio.sleep(0.1)
    watcher = OutputWatcher(settings)
    await watcher.start()
    producer = make_producer(settings.kafka)
    await producer.start()
    pool = await create_pool(settings.database_url.get_secret_value(), max_size=2)
    jobs = BackfillJobs(pool)
    try:
        # 1. Streaming, with every question but the held-out one: without the HNSW index, then with it.
        await pool.execute("DROP INDEX chunks_embedding_hnsw")
        def texts_embedded() -> int:
            return int(running.metrics.registry.get_sample_value("flexor_texts_embedded_total") or 0)

        without_index_rate, _, _ = await _stream(producer, watcher, t.input, events, 0)
        texts_first = texts_embedded()
        async with pool.acquire() as c, c.transaction():
            await c.execute(CREATE_INDEX_SQL)
        stream_rate, stream_s, keys = await _stream(producer, watcher, t.input, events, 10)
        stream_texts = texts_embedded() - texts_first

        # 2. Backfill of the held-out question, rate limit off.
        after = _write(qfile, qset.questions)
        t0 = time.monotonic()
        job = await enqueue(settings, pool, after.version, [held])
        done = await follow(jobs, job, t.backfill, poll_s=0.05)
        backfill_s = time.monotonic() - t0
        backfill_rate = done.conversations_done / backfill_s
        f1 = await _f1(pool, after.version, held.id, gold) if gold else None

        # 3. Live latency at half the streaming rate: alone, then during a backfill at the default rate.
        rate = stream_rate / 2
        sample = events[:LATENCY_EVENTS]
        alone = await _latency(producer, watcher, t.input, sample, 20, rate)
        bumped = _write(qfile, [*qset.questions[:-1], held.model_copy(update={"version": held.version + 1})])
        default_rate = BackfillConfig().max_rate
        running.backfill.pacer = Pacer(default_rate)
        job2 = asyncio.create_task(enqueue(settings, pool, bumped.version, [bumped.questions[-1]]))
        during = await _latency(producer, watcher, t.input, sample, 30, rate)
        job2_progress = await jobs.progress(await job2)
    finally:
        await pool.close()
        await producer.stop()
        await watcher.stop()
        running.service.stop()
        await asyncio.gather(service, return_exceptions=True)
    assert job2_progress is not None
    return {
        "backfill": {
            "conversations_per_s": backfill_rate,
            "stream_conversations_per_s": stream_rate,
            "ratio": backfill_rate / stream_rate,
            "question": held.id,
            "conversations": done.conversations_done,
            "published": done.published,
            "seconds": backfill_s,
            "stream_conversations": len(keys),
            "stream_seconds": stream_s,
            "stream_conversations_per_s_without_hnsw_index": without_index_rate,
            "stream_texts_embedded": stream_texts,
            "stream_texts_embedded_without_hnsw_index": texts_first,
            **({"f1_vs_gold": f1} if f1 is not None else {}),
        },
        "live": {
            "rate": rate,
            "events": len(sample),
            "p50_ms_alone": float(np.percentile(alone, 50)),
            "p95_ms_alone": float(np.percentile(alone, 95)),
            "p50_ms_during_backfill": float(np.percentile(during, 50)),
            "p95_ms_during_backfill": float(np.percentile(during, 95)),
            "backfill_max_rate": default_rate,
            "backfill_conversations_done_meanwhile": job2_progress.conversations_done,
        },
        "questions": {"before": before.version, "after": after.version, "count": len(qset.questions)},
        "settings": {"max_events": settings.batch.max_events, "embedder": settings.models.embedder,
                     "heads": settings.models.heads_dir.name if settings.models.heads_dir else "none",
                     "item_size": settings.backfill.item_size, "partitions": t.partitions},
    }


async def _stream(
    producer: Any, watcher: Any, topic: str, events: list[dict[str, Any]], bump: int
) -> tuple[float, float, set[tuple[str, int]]]:
    """Produce every event at once (revisions moved up by `bump`); (conversations/s, seconds, keys)
    from the first send to the last output event."""
    revised = [dict(e, revision=e["revision"] + bump, event_id=f"{e['event_id']}:+{bump}") for e in events]
    keys = {(e["conversation_id"], e["revision"]) for e in revised}
    t0 = time.monotonic()
    await produce_events(producer, topic, revised)
    await watcher.wait_for(keys, 3600)
    seconds = max(watcher.arrived[k] for k in keys) - t0
    return len(keys) / seconds, seconds, keys


async def _latency(
    producer: Any, watcher: Any, topic: str, sample: list[dict[str, Any]], bump: int, rate: float
) -> np.ndarray:
    """Produce new revisions of `sample` at `rate`; latency in ms from send to output."""
    revised = [dict(e, revision=e["revision"] + bump, event_id=f"{e['event_id']}:+{bump}") for e in sample]
    sent = await produce_events(producer, topic, revised, rate=rate)
    keys = [(e["conversation_id"], e["revision"]) for e in revised]
    await watcher.wait_for(set(keys), 1800)
    return np.array([(watcher.arrived[k] - s) * 1000 for k, s in zip(keys, sent, strict=True)])


async def _f1(pool: asyncpg.Pool, qset_version: str, question_id: str, gold: dict[tuple[str, str], bool]) -> float:
    rows = await pool.fetch(
        "SELECT conversation_id, answers FROM classifications WHERE question_set = $1", qset_version
    )
    tp = fp = fn = 0
    for r in rows:
        for a in orjson.loads(r["answers"]):
            truth = gold.get((a["question_id"], r["conversation_id"]))
            if a["question_id"] != question_id or truth is None:
                continue
            said = a["answer"] == "yes"
            tp, fp, fn = tp + (said and truth), fp + (said and not truth), fn + (truth and not said)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


async def _search(admin_url: str, paths: list[Path], embedder_spec: str, qset: QuestionSet) -> dict[str, Any]:
    """Store the whole corpus in a fresh database, build the index, measure recall and latency."""
    from agents.learn.embedcache import CachingEmbedder
    from agents.pipeline import embed_conversations
    from agents.store import create_pool
    from agents.store.chunks import PgEvidenceStore
    from agents.store.migrate import migrate
    from agents.store.search import CREATE_INDEX_SQL, DEFAULT_EF_SEARCH, SEARCH_SQL, CorpusSearch
    from models.embedder import load_embedder
    from stream.config import LimitsConfig
    from stream.schemas import decode_conversation

    name = f"search_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await conn.execute("DROP INDEX chunks_embedding_hnsw")  # rebuilt below, timed, as on an existing table
    finally:
        await conn.close()
    embedder = CachingEmbedder(await asyncio.to_thread(load_embedder, embedder_spec), min_segment=4096)
    limits = LimitsConfig()
    convs = [decode_conversation(orjson.dumps(e), limits).to_conversation()
             for path in paths for e in load_conversations(path)]
    pool = await create_pool(url, max_size=2)
    try:
        store = PgEvidenceStore(pool)
        t0 = time.monotonic()
        for i in range(0, len(convs), 500):
            embedded = await asyncio.to_thread(embed_conversations, embedder, convs[i : i + 500])
            await store.upsert(embedded, embedder.model_id)
        embedder.flush()
        load_s = time.monotonic() - t0
        t0 = time.monotonic()
        conn = await asyncpg.connect(url)  # no command timeout: the build takes minutes, as in `flexor migrate`
        try:
            async with conn.transaction():
                await conn.execute(CREATE_INDEX_SQL)
            await conn.execute("ANALYZE chunks")
        finally:
            await conn.close()
        build_s = time.monotonic() - t0
        chunks = int(await pool.fetchval("SELECT count(*) FROM chunks"))

        rng = random.Random(0)
        turns = [t.text for c in convs for t in c.turns if t.from_customer and len(t.text) >= 20]
        sampled = rng.sample(turns, min(len(turns), SEARCH_QUERIES - len(qset.questions)))
        texts = [q.text for q in qset.questions] + sampled
        queries = await asyncio.to_thread(embedder.embed, texts)
        search = CorpusSearch(pool)
        model = embedder.model_id
        exact = [await search.search(q, model, k=K, exact=True) for q in queries]
        plan = "\n".join(r[0] for r in await pool.fetch("EXPLAIN " + SEARCH_SQL, queries[0], model, None, K))
        sweep = []
        for ef in EF_SWEEP:
            for q in queries[:20]:  # warm the index pages
                await search.search(q, model, k=K, ef_search=ef)
            recall, lat = [], []
            for q, ex in zip(queries, exact, strict=True):
                t0 = time.perf_counter()
                hits = await search.search(q, model, k=K, ef_search=ef)
                lat.append((time.perf_counter() - t0) * 1000)
                bar = ex[-1].score - 1e-6
                recall.append(sum(h.score >= bar for h in hits) / len(ex))
            sweep.append({"ef_search": ef, "recall_at_20": float(np.mean(recall)),
                          "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95))})
    finally:
        await pool.close()
    chosen = next(s for s in sweep if s["ef_search"] == DEFAULT_EF_SEARCH)
    return {
        "chunks": chunks,
        "conversations": len(convs),
        "queries": len(texts),
        "k": K,
        "ef_search": DEFAULT_EF_SEARCH,
        "recall_at_20": chosen["recall_at_20"],
        "p50_ms": chosen["p50_ms"],
        "p95_ms": chosen["p95_ms"],
        "sweep": sweep,
        "index_used": "chunks_embedding_hnsw" in plan,
        "index_build_s": build_s,
        "load_s": load_s,
        "texts_embedded_now": embedder.misses,
    }
