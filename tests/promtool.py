"""promtool, the Prometheus project's own checker, for the tests that use it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

WHY_MISSING = (
    "promtool is not installed: it comes with Debian's `prometheus` package, which `make install` "
    "installs when it runs as root on Debian (apt-get install prometheus)"
)


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; skips the calling test, saying why, where it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(WHY_MISSING)
    return subprocess.run([path, *args], input=stdin.decode() if stdin is not None else None,
                          capture_output=True, text=True, timeout=120)
