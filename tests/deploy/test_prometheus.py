"""The Prometheus config and alert rules, checked by promtool (Debian's `prometheus` package):
config, rules, the rules' unit tests; plus what promtool cannot know: every alert has a severity,
a runbook section that exists, and unit tests that fire it and that do not; every metric the
rules and the dashboard query is one the service exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream.metrics import Metrics
from tests.promtool import promtool

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
ALERTS = PROM / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "flexor.json"
OPERATIONS = REPO / "docs" / "operations.md"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_promtool_checks_the_config_and_the_rules_it_loads() -> None:
    result = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout and "SUCCESS" in result.stdout


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(yaml.safe_load(ALERTS.read_text())['groups'][0]['rules']) + len(alerts())} rules found" \
        in result.stdout


def test_the_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(PROM / "alerts.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # Grafana's macros take values a query could have; each query becomes a recording rule
    exprs = [e.replace("$__rate_interval", "5m").replace("$question", ".*") for e in dashboard_exprs()]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                          for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(tmp_path / "dashboard.rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_the_issues_alerts_exist() -> None:
    assert {a["alert"] for a in alerts()} >= {
        "FlexorConsumerLagGrowing", "FlexorDeadLetterRatioHigh", "FlexorNotReady", "FlexorLLMFallbacks",
        "FlexorAuditAgreementDropped", "FlexorDrift", "FlexorNoEvents",
    }


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives headings: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", markdown, re.MULTILINE)}


def test_every_alert_has_a_severity_and_a_runbook_section() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/operations.md" and anchor in anchors, (rule["alert"], anchor)


def test_every_alert_has_unit_tests_that_fire_it_and_that_do_not() -> None:
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert fired == names, f"no firing test for {names - fired}"
    assert silent == names, f"no test where {names - silent} stays silent"


def exported_names() -> set[str]:
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


@pytest.mark.parametrize("where", ["alerts", "dashboard"])
def test_queries_name_only_metrics_the_service_exports(where: str) -> None:
    text = ALERTS.read_text() if where == "alerts" else "\n".join(dashboard_exprs())
    used = set(re.findall(r"\bflexor_[a-z0-9_]+", text))
    assert used, where
    assert used <= exported_names(), f"{where} queries metrics nobody exports: {sorted(used - exported_names())}"
