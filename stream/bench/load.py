"""`flexor bench --load`: fixed-rate load on the embedded broker + Postgres, with lag and memory over time.

The service runs as its own process (`flexor serve`), so its RSS is clean of the load generator.
Phases:
1. capacity (only when --rate is omitted): a burst of events as fast as possible; capacity is the
   rate at which the service classified them. The load rate is then `--load-factor` x capacity
   (default 0.8; use 1.5 for the overload run).
2. load: events produced at the fixed rate for --duration seconds, cycling through the conversations
   with a new revision each time round (so none is skipped as a replay).
3. drain (--drain seconds, default 60): nothing produced; every event produced must be classified by
   the end (no loss once the rate drops).
Sampled every second: events produced and classified, lag (produced - classified, and the service's
own flexor_consumer_lag), events in flight, paused partitions, service RSS. Written to
DIR/bench.json and DIR/load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from agents.learn.labelled import source_names
from stream.bench import embedded_settings, machine, model_overrides, models_described, write_json
from stream.bench.e2e import OutputWatcher
from stream.config import Settings, settings_env
from stream.dev.produce import load_conversations, produce_events
from stream.kafka import ensure_topics, make_producer


def run_load(args: argparse.Namespace) -> int:
    from stream.dev.infra import EmbeddedStack, free_port

    convs = []
    for path in args.conversations:
        convs += load_conversations(path, args.limit)
    convs = convs[: args.limit]
    overrides, questions = model_overrides(args, args.report)
    with EmbeddedStack() as stack:
        settings = embedded_settings(
            stack, "load", questions,
            **{"kafka.session_timeout_ms": 6000, "kafka.heartbeat_interval_ms": 500, "metrics_port": free_port(),
               **overrides},
        )
        result = asyncio.run(_load(settings, convs, args, stack.workdir / "serve.log"))
    result["settings"].update(models_described(args))
    result["machine"] = machine()
    result["conversations"] = source_names(args.conversations)
    path = write_json(args.report, result)
    _chart(result, args.report / "load.png")
    s = result["summary"]
    print(
        f"load {result['rate']:.1f} ev/s for {result['duration_s']:.0f} s (capacity {result.get('capacity') or '-'}): "
        f"classified {s['classified_per_s']:.1f} ev/s, p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, "
        f"p99 {s['p99_ms']:.0f} ms, max lag {s['max_lag']}, RSS growth after warm-up "
        f"{s['rss_growth_after_warmup'] * 100:.1f}%, lost {s['lost']} -> {path}"
    )
    return 0 if s["lost"] == 0 else 1


def _events(convs: list[dict[str, Any]], start: int, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(start, start + n):
        base = convs[i % len(convs)]
        rnd = i // len(convs)
        # Revisions step by 10 a round: the examples hold some conversations at two revisions, and
        # one (conversation, revision) must never stand for two different contents.
        out.append(dict(base, revision=base["revision"] + 10 * (rnd + 1), event_id=f"{base['event_id']}:load{rnd}"))
    return out


SAMPLED = ("flexor_consumer_lag", "flexor_in_flight_events", "flexor_partitions_paused",
           "flexor_embedding_cache_bytes")


def _scrape(port: int) -> dict[str, float]:
    """The SAMPLED gauges from the service's /metrics, summed over their labels."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in SAMPLED:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
            elif sample.name == "flexor_answers_total":
                key = f"decided_by.{sample.labels['decided_by']}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _start_service(settings: Settings, log: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    env = {**os.environ, **settings_env(settings)}
    flexor = Path(sys.executable).parent / "flexor"
    with open(log, "ab") as out:
        return subprocess.Popen([str(flexor), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)


async def _load(settings: Settings, convs: list[dict[str, Any]], args: argparse.Namespace, log: Path) -> dict[str, Any]:
    t = settings.topics
    await ensure_topics(settings.kafka, t)
    proc = await asyncio.to_thread(_start_service, settings, log)
    watcher = OutputWatcher(settings)
    producer = make_producer(settings.kafka)
    await producer.start()
    await watcher.start()
    result: dict[str, Any] = {"settings": {"max_events": settings.batch.max_events,
                                           "max_wait_ms": settings.batch.max_wait_ms,
                                           "max_in_flight": settings.batch.max_in_flight,
                                           "partitions": t.partitions, "embedder": settings.models.embedder,
                                           "embedding_cache_mb": settings.models.embedding_cache_mb}}
    try:
        ps = psutil.Process(proc.pid)
        while (await asyncio.to_thread(_scrape, settings.metrics_port)).get("flexor_in_flight_events") is None:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited (log: {log})")
            await asyncio.sleep(0.5)
        next_i = 0
        # Warm the models and the group (one small batch), then measure capacity if needed.
        warm = _events(convs, next_i, 16)
        next_i += len(warm)
        await produce_events(producer, t.input, warm)
        await watcher.wait_for({(e["conversation_id"], e["revision"]) for e in warm}, 600)
        capacity = None
        rate = args.rate
        if rate is None:
            burst = _events(convs, next_i, max(200, min(600, len(convs) * 2)))
            next_i += len(burst)
            t0 = time.monotonic()
            await produce_events(producer, t.input, burst)
            keys = {(e["conversation_id"], e["revision"]) for e in burst}
            await watcher.wait_for(keys, 1800)
            capacity = len(burst) / (max(watcher.arrived[k] for k in keys) - t0)
            rate = capacity * args.load_factor
        result.update(capacity=capacity, rate=rate, duration_s=args.duration, drain_s=args.drain,
                      load_factor=args.load_factor if args.rate is None else None)

        samples: list[dict[str, float]] = []
        load = _events(convs, next_i, int(rate * args.duration))
        load_keys = {(e["conversation_id"], e["revision"]) for e in load}
        produced = 0

        def on_sent(n: int) -> None:
            nonlocal produced
            produced = n

        t_start = time.monotonic()

        async def sampler() -> None:
            while True:
                m = await asyncio.to_thread(_scrape, settings.metrics_port)
                now = time.monotonic() - t_start
                done = len(load_keys & watcher.arrived.keys())
                samples.append({
                    "t": round(now, 2), "produced": produced, "classified": done, "lag": produced - done,
                    "service_lag": m.get("flexor_consumer_lag", float("nan")),
                    "in_flight": m.get("flexor_in_flight_events", float("nan")),
                    "paused": m.get("flexor_partitions_paused", float("nan")),
                    "rss_mb": ps.memory_info().rss / 2**20,
                    "cache_mb": m.get("flexor_embedding_cache_bytes", float("nan")) / 2**20,
                })
                await asyncio.sleep(1.0)

        sampling = asyncio.create_task(sampler())
        try:
            # Load phase: a fixed schedule (sends that fall behind catch up without bursting past it).
            times = await produce_events(producer, t.input, load, rate=rate, on_sent=on_sent)
            sent_at = {(e["conversation_id"], e["revision"]): at for e, at in zip(load, times, strict=True)}
            load_end = time.monotonic()
            # Drain phase: nothing produced; everything sent must arrive.
            deadline = load_end + args.drain
            while time.monotonic() < deadline and not sent_at.keys() <= watcher.arrived.keys():  # noqa: ASYNC110
                await asyncio.sleep(0.5)
            drained_s = time.monotonic() - load_end
            final = await asyncio.to_thread(_scrape, settings.metrics_port)
        finally:
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
    finally:
        await producer.stop()
        await watcher.stop()
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)

    lat = np.array([(watcher.arrived[k] - s) * 1000 for k, s in sent_at.items() if k in watcher.arrived])
    lost = sum(1 for k in sent_at if k not in watcher.arrived)
    load_samples = [s for s in samples if s["t"] <= args.duration]
    rss = np.array([s["rss_mb"] for s in load_samples])
    warm_n = max(1, int(len(rss) * 0.2))
    tail_n = max(1, int(len(rss) * 0.1))
    rss_warm = float(np.mean(rss[warm_n - 1 : warm_n + tail_n - 1])) if len(rss) else float("nan")
    rss_end = float(np.mean(rss[-tail_n:])) if len(rss) else float("nan")
    lags = np.array([s["lag"] for s in load_samples])
    half = len(lags) // 2
    ts = np.array([s["t"] for s in load_samples])
    slope = float(np.polyfit(ts[half:], lags[half:], 1)[0]) if len(lags) - half >= 3 else float("nan")
    classified_in_load = [watcher.arrived[k] for k in sent_at if k in watcher.arrived]
    result["summary"] = {
        "produced": len(sent_at),
        "classified": len(sent_at) - lost,
        "lost": lost,
        "produce_rate": len(sent_at) / args.duration,
        "classified_per_s": (len(classified_in_load) / (max(classified_in_load) - t_start))
        if classified_in_load else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p95_ms": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "max_lag": int(lags.max()) if len(lags) else 0,
        "lag_at_end_of_load": int(lags[-1]) if len(lags) else 0,
        "lag_slope_second_half_per_s": slope,
        "rss_mb_after_warmup": rss_warm,
        "rss_mb_end": rss_end,
        "rss_mb_max": float(rss.max()) if len(rss) else float("nan"),
        "rss_growth_after_warmup": (rss_end - rss_warm) / rss_warm if len(rss) else float("nan"),
        "max_in_flight": float(np.nanmax([s["in_flight"] for s in samples])) if samples else float("nan"),
        "paused_fraction": float(np.nanmean([s["paused"] for s in load_samples])) if load_samples else 0.0,
        "drain_s": drained_s,
        "decided_by": {k.split(".", 1)[1]: int(v) for k, v in sorted(final.items()) if k.startswith("decided_by.")},
        "cache_mb_end": final.get("flexor_embedding_cache_bytes", float("nan")) / 2**20,
    }
    result["samples"] = samples
    return result


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    if not s:
        return
    t = [x["t"] for x in s]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [x["produced"] for x in s], label="produced")
    axes[0].plot(t, [x["classified"] for x in s], label="classified")
    axes[0].set_ylabel("events (cumulative)")
    axes[0].legend()
    axes[1].plot(t, [x["lag"] for x in s], label="produced - classified")
    axes[1].plot(t, [x["service_lag"] for x in s], label="flexor_consumer_lag")
    axes[1].plot(t, [x["in_flight"] for x in s], label="in flight")
    axes[1].set_ylabel("events")
    axes[1].legend()
    axes[2].plot(t, [x["rss_mb"] for x in s])
    axes[2].set_ylabel("service RSS (MiB)")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.axvline(result["duration_s"], color="grey", linestyle=":")
    fig.suptitle(f"load {result['rate']:.1f} ev/s for {result['duration_s']:.0f} s, then drain")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
