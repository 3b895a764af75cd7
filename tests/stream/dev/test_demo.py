"""`flexor up --demo` as a newcomer runs it: a subprocess that must exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_up_demo_exits_zero() -> None:
    flexor = Path(sys.executable).parent / "flexor"
    r = subprocess.run(
        [str(flexor), "up", "--demo", "--metrics-port", "0", "--timeout", "400"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "100 conversation revisions classified" in r.stdout
    assert "2 malformed events sent to the DLQ" in r.stdout
    assert "/metrics" in r.stdout
    for qid in ("bug_money_loss", "fraud_report", "refund_request"):
        assert qid in r.stdout
