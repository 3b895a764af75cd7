"""`flexor bench --e2e --monitoring`: what audit sampling and shadow heads cost the service.

The same conversations go through the service four times per round, side by side in one run on
one embedded broker and Postgres: without the monitors (`base`), with audit sampling
(`--audit-rate`, default 0.01), with shadow heads (`--shadow-heads`), and with both. Every
variant has the same LLM stage (`--engine`) and live heads (`--heads`); each run gets a fresh
database and topics, so no cache carries over. Rounds alternate the order (base first, then
base last) so a machine that slows down during the run does not favour one variant; the ratios
compare each variant's median with base's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path
from typing import Any

from agents.learn.labelled import source_names
from stream.bench import embedded_settings, fresh_database, machine, write_json
from stream.bench.e2e import measure_service
from stream.dev.produce import load_conversations


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    audit = {"models.llm_audit_rate": args.audit_rate}
    shadow = {"models.shadow_heads_dir": args.shadow_heads}
    return {"base": {}, "audit": audit, "shadow": shadow, "audit+shadow": {**audit, **shadow}}


def run_monitoring(args: argparse.Namespace) -> int:
    from stream.dev.infra import EmbeddedStack

    if args.shadow_heads is None or not (Path(args.shadow_heads) / "manifest.json").is_file():
        raise ValueError("--monitoring needs --shadow-heads DIR: a heads directory (flexor train --out)")
    if not 0 < args.audit_rate <= 1:
        raise ValueError("--audit-rate must be in (0, 1]")
    events = load_conversations(args.conversations[0], args.limit)
    with EmbeddedStack() as stack:
        result = asyncio.run(_compare(stack, args, events))
    result["machine"] = machine()
    result["conversations"] = source_names(args.conversations[:1])
    path = write_json(args.report, result)
    for name, ratio in result["ratios"].items():
        print(f"{name}: throughput {ratio['throughput']:.3f} x base, p95 latency {ratio['p95_ms']:.3f} x base")
    for name, checks in result["check_seconds_over_classify_seconds"].items():
        print(f"{name}: " + ", ".join(f"{c} {v:.3f} x classify time per batch" for c, v in checks.items()))
    print(f"-> {path}")
    return 0


def _sum(registry: Any, family: str, **labels: str) -> float:
    return sum(s.value for m in registry.collect() if m.name == family for s in m.samples
               if s.name == f"{family}_total" and all(s.labels.get(k) == v for k, v in labels.items()))


def _stage_means(registry: Any) -> dict[str, float]:
    """Mean seconds per batch of each stage. Within one run, the shadow and audit times against
    `classify` measure their cost without the noise between runs on a shared machine."""
    sums = {s.labels["stage"]: s.value for m in registry.collect() if m.name == "flexor_stage_seconds"
            for s in m.samples if s.name == "flexor_stage_seconds_sum"}
    counts = {s.labels["stage"]: s.value for m in registry.collect() if m.name == "flexor_stage_seconds"
              for s in m.samples if s.name == "flexor_stage_seconds_count"}
    return {stage: sums[stage] / counts[stage] for stage in sorted(sums) if counts.get(stage)}


async def _compare(stack: Any, args: argparse.Namespace, events: list[dict[str, Any]]) -> dict[str, Any]:
    plan = variants(args)
    order = [name for r in range(args.rounds) for name in (list(plan) if r % 2 == 0 else list(reversed(plan)))]
    common = {"models.llm": args.engine, "models.llm_audit_rate": 0.0}
    if args.heads is not None:
        common["models.heads_dir"] = args.heads
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    latency_rate = None
    for name in order:
        db = await fresh_database(stack.postgres.url, "bench")
        settings = embedded_settings(stack, "mon", args.questions, database_url=db, **{**common, **plan[name]})
        measured, registry = await measure_service(settings, events, latency_rate)
        latency_rate = latency_rate or measured["latency_rate"]  # the same produce rate for every run
        audited = _sum(registry, "flexor_audit_answers")
        shadowed = _sum(registry, "flexor_shadow_answers")
        agreed = _sum(registry, "flexor_audit_answers", result="agree"), _sum(registry, "flexor_shadow_answers",
                                                                              result="agree")
        measured.update({
            "audited_answers": audited,
            "audit_agreement": agreed[0] / audited if audited else None,
            "shadow_answers": shadowed,
            "shadow_agreement": agreed[1] / shadowed if shadowed else None,
            "llm_routed_answers": _sum(registry, "flexor_result_cache"),
            "seconds_per_batch": _stage_means(registry),
        })
        runs[name].append(measured)
        print(f"{name}: {measured['conversations_per_s']:.1f} conv/s, p95 {measured['p95_ms']:.0f} ms "
              f"at {measured['latency_rate']:.1f}/s, {audited:.0f} audited, {shadowed:.0f} shadow answers")
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in ("conversations_per_s", "p50_ms", "p95_ms")}
               for name, rs in runs.items()}
    base = medians["base"]
    # Within-run cost: seconds of each check per batch, over seconds of classifying a batch.
    within = {name: {check: statistics.median(r["seconds_per_batch"][check] / r["seconds_per_batch"]["classify"]
                                              for r in rs)
                     for check in ("shadow", "audit") if all(check in r["seconds_per_batch"] for r in rs)}
              for name, rs in runs.items()}
    return {
        "runs": runs,
        "medians": medians,
        "ratios": {name: {"throughput": m["conversations_per_s"] / base["conversations_per_s"],
                          "p95_ms": m["p95_ms"] / base["p95_ms"]}
                   for name, m in medians.items() if name != "base"},
        "check_seconds_over_classify_seconds": {name: v for name, v in within.items() if v},
        "settings": {"engine": args.engine, "audit_rate": args.audit_rate, "rounds": args.rounds,
                     "heads": Path(args.heads).name if args.heads else None,
                     "shadow_heads": Path(args.shadow_heads).name, "order": order},
    }
