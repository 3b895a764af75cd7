"""The Grafana dashboard (deploy/grafana/flexor.json) against Grafana's own schema: JSON schemas
generated from the TypeScript types of @grafana/schema (deploy/grafana/schema/generate.sh) for
the dashboard model and for the options of each panel type it uses. No Grafana server can be
installed here (no Debian, PyPI or npm package carries one), so the schema is the check."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "flexor.json"
SCHEMAS = REPO / "deploy" / "grafana" / "schema"


def schema(name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / f"{name}.schema.json").read_text()))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def errors(validator: jsonschema.Draft7Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_dashboard_is_a_valid_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert errors(schema("dashboard"), dashboard) == []


def test_the_schema_check_catches_a_broken_dashboard(dashboard: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(dashboard))
    broken["panels"][1]["gridPos"]["w"] = "wide"
    broken["graphTooltip"] = 7
    broken["refreshEvery"] = "30s"
    found = "\n".join(errors(schema("dashboard"), broken))
    assert "'refreshEvery' was unexpected" in found and "graphTooltip: 7 is not one of" in found
    assert "\npanels/1: " in found  # a panel or a row: neither has a textual width


def test_every_panels_options_fit_its_panel_type(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    assert {p["type"] for p in panels} <= {"row", "timeseries", "stat"}  # the types with a schema here
    for p in panels:
        if p["type"] == "row":
            continue
        assert errors(schema(f"{p['type']}-options"), p["options"]) == [], p["title"]
        if p["type"] == "timeseries":
            assert errors(schema("timeseries-fieldconfig"), p["fieldConfig"]["defaults"]["custom"]) == [], p["title"]


def test_panels_do_not_overlap_and_have_unique_ids(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for a, b in combinations(panels, 2):
        ga, gb = a["gridPos"], b["gridPos"]
        apart = (ga["x"] + ga["w"] <= gb["x"] or gb["x"] + gb["w"] <= ga["x"]
                 or ga["y"] + ga["h"] <= gb["y"] or gb["y"] + gb["h"] <= ga["y"])
        assert apart, (a["title"], b["title"])
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)


def test_the_dashboard_shows_what_operators_look_at(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    needed = {
        "throughput": "rate(flexor_conversations_classified_total",
        "consumer lag per partition": "sum by (topic, partition) (flexor_consumer_lag)",
        "latency p50": "histogram_quantile(0.5, sum by (le) (rate(flexor_event_latency_seconds_bucket",
        "latency p95": "histogram_quantile(0.95, sum by (le) (rate(flexor_event_latency_seconds_bucket",
        "latency p99": "histogram_quantile(0.99, sum by (le) (rate(flexor_event_latency_seconds_bucket",
        "batch sizes": "flexor_batch_size_bucket",
        "time per stage": "sum by (stage) (rate(flexor_stage_seconds_sum",
        "DLQ by reason": "sum by (reason) (rate(flexor_dlq_events_total",
        "answers by decided_by": "sum by (decided_by) (rate(flexor_answers_total",
        "LLM calls": 'flexor_result_cache_total{result="miss"}',
        "cache hits": 'flexor_result_cache_total{result="hit"}',
        "fallbacks": "flexor_llm_fallbacks_total",
        "audit agreement": 'flexor_audit_answers_total{result="agree"',
        "shadow agreement": 'flexor_shadow_answers_total{result="agree"',
        "drift": "flexor_drift_psi",
        "yes-rate": "flexor_drift_yes_rate",
        "readiness": "min(flexor_ready)",
    }
    missing = [what for what, query in needed.items() if query not in exprs]
    assert missing == []
