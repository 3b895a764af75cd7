"""Reachability of the service's dependencies (Kafka, Postgres), as an operator reads it: one log
line when a dependency goes down and one when it comes back, `flexor_dependency_up` for its state
and `flexor_dependency_errors_total` for every failed attempt in between (probes and batches).
"""

from __future__ import annotations

import logging
import time

from stream.metrics import Metrics

log = logging.getLogger(__name__)

DEPENDENCIES = ("kafka", "postgres")


class DependencyHealth:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._up = dict.fromkeys(DEPENDENCIES, False)
        self._down_since: dict[str, float] = {}  # only after it was up once: start-up is not an outage

    def is_up(self, dependency: str) -> bool:
        return self._up[dependency]

    def up(self, dependency: str) -> None:
        if self._up[dependency]:
            return
        self._up[dependency] = True
        self.metrics.dependency_up.labels(dependency).set(1)
        since = self._down_since.pop(dependency, None)
        if since is not None:
            log.info("%s: reachable again after %.1f s", dependency, time.monotonic() - since)

    def down(self, dependency: str, error: BaseException | None = None) -> None:
        self.metrics.dependency_errors.labels(dependency).inc()
        if not self._up[dependency]:
            return
        self._up[dependency] = False
        self.metrics.dependency_up.labels(dependency).set(0)
        self._down_since[dependency] = time.monotonic()
        why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if error else "probe failed"
        log.warning("%s: unreachable (%s); retrying until it is back (flexor_dependency_errors_total counts the "
                    "failed attempts)", dependency, why.rstrip(": "))
