"""Poison records (`stream.poison`): a valid record whose classification raises goes to the DLQ with
reason `processing_error`, the rest of its batch is classified and the partition moves on; a burst
of such failures stops the service instead of draining the topic into the DLQ."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from stream.config import Settings
from stream.dev.produce import load_conversations
from stream.errors import FatalError
from stream.poison import PoisonBudget, isolate
from tests.conftest import EXAMPLES
from tests.harness import (
    check_delivery,
    committed,
    count_rows,
    create_topics,
    metric,
    produce,
    read_topic,
    running_service,
    wait_until,
)

# -- isolate() on its own ----------------------------------------------------------------------------


class Planted:
    """`run` for isolate(): squares its items, raises when a part holds a planted one."""

    def __init__(self, poison: set[int], error: type[Exception] = ValueError) -> None:
        self.poison, self.error, self.calls = poison, error, []  # type: ignore[var-annotated]

    async def __call__(self, idx: Sequence[int]) -> list[int]:
        self.calls.append(list(idx))
        bad = self.poison.intersection(idx)
        if bad:
            raise self.error(f"cannot handle item {min(bad)}")
        return [i * i for i in idx]


@pytest.mark.parametrize("n, poison", [(1, set()), (1, {0}), (16, set()), (16, {5}), (16, {0, 15}),
                                       (37, {3, 4, 20, 36}), (64, set(range(0, 64, 9)))])
async def test_isolate_finds_exactly_the_planted_items(n: int, poison: set[int]) -> None:
    run = Planted(poison)
    out = await isolate(n, run, PoisonBudget(1.0, 1000))
    assert set(out.errors) == poison
    assert all(f"cannot handle item {i}" == str(out.errors[i]) for i in poison)
    assert out.results == [None if i in poison else i * i for i in range(n)]
    if not poison:
        assert run.calls == [list(range(n))]  # one pass, nothing more
    else:
        assert run.calls[:2] == [list(range(n))] * 2  # retried whole once, then split
        # Each planted item costs at most one failing part per level of the split.
        levels = int(np.ceil(np.log2(n))) + 1
        assert len(run.calls) <= 2 + 2 * len(poison) * levels


async def test_isolate_lets_retriable_and_fatal_errors_through() -> None:
    from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

    for error in (KafkaConnectionError, TopicAuthorizationFailedError, OSError):
        run = Planted({2}, error)
        with pytest.raises(error):
            await isolate(8, run, PoisonBudget(1.0, 1000))
        assert len(run.calls) == 1  # not retried or split here: that is the service's retry loop


async def test_budget_stops_a_burst_while_isolating() -> None:
    budget = PoisonBudget(max_ratio=0.1, window=30)  # at most 3 of the last 30
    budget.record(ok=20, failed=2)
    run = Planted(set(range(16)))  # every item raises: a bad deploy
    with pytest.raises(FatalError, match=r"4 of the last 30 records raised while being classified \(limit 3") as info:
        await isolate(16, run, budget)
    assert "cannot handle item" in str(info.value)
    # It stopped at the second failure of this batch instead of splitting all 16 to the end.
    assert len(run.calls) < 2 + 16


def test_budget_window_forgets_old_failures() -> None:
    budget = PoisonBudget(max_ratio=0.1, window=10)  # at most 1 of the last 10
    budget.record(ok=0, failed=1)
    with pytest.raises(FatalError):
        budget.check(1, ValueError("x"))
    budget.record(ok=10, failed=0)  # the failure left the window
    budget.check(1, ValueError("x"))
    assert PoisonBudget(0.0, 200).limit == 0  # ratio 0: the first poison record stops the service


# -- the service with a planted record ---------------------------------------------------------------

MARKER = "\u2063planted-poison\u2063"


class RaisingEmbedder:
    """The real embedder, which raises on texts holding MARKER the way a tokenizer raises on an
    input it cannot handle. Everything else (model, vectors, ids) is the real embedder's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        for t in texts:
            if MARKER in t:
                raise ValueError(f"cannot tokenize text at {t.index(MARKER)}: unexpected input")
        return self._inner.embed(texts)


@pytest.fixture
def raising_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.app

    real = stream.app.load_embedder
    monkeypatch.setattr(stream.app, "load_embedder", lambda *a, **k: RaisingEmbedder(real(*a, **k)))


def _planted(event: dict[str, Any]) -> dict[str, Any]:
    turns = [dict(t) for t in event["turns"]]
    turns[0]["text"] += f" {MARKER}"
    return dict(event, turns=turns, event_id=event["event_id"] + ":planted", conversation_id=event["conversation_id"]
                + ":planted")


async def test_planted_records_go_to_the_dlq_and_the_rest_is_classified(
    settings: Settings, raising_embedder: None
) -> None:
    good = load_conversations(EXAMPLES / "conversations.jsonl", 30)
    planted = [_planted(good[3]), _planted(good[17])]
    stream = good[:10] + [planted[0]] + good[10:20] + [planted[1]] + good[20:]
    await create_topics(settings)
    async with running_service(settings) as running:
        reg = running.metrics.registry
        await produce(settings, stream)
        await wait_until(lambda: _rows_at_least(settings, len(good)), 180, "every good conversation")

        async def all_committed() -> bool:
            return sum((await committed(settings)).values()) == len(stream)

        await wait_until(all_committed, 60, "offsets committed past the planted records")
        assert metric(reg, "flexor_dlq_events_total", {"reason": "processing_error"}) == 2
        assert running.service.readiness()["state"] == "ready"
    dlq = await read_topic(settings, settings.topics.dlq)
    assert sorted(orjson.loads(r.value)["event_id"] for r in dlq) == sorted(e["event_id"] for e in planted)
    for rec in dlq:
        h = {k: v.decode() for k, v in rec.headers}
        assert h["error.reason"] == "processing_error" and h["error.type"] == "ValueError"
        assert h["error.message"].startswith("cannot tokenize text at")
        assert orjson.loads(rec.value) in planted  # the original bytes
    await check_delivery(settings, good, registry=reg)


async def test_a_burst_of_failures_stops_the_service_instead_of_draining_the_topic(
    settings: Settings, raising_embedder: None
) -> None:
    """After a bad deploy every record raises: at most max_poison_ratio x poison_window of them
    go to the DLQ, then the service stops, without committing past what it could not classify."""
    settings = settings.model_copy(update={"batch": settings.batch.model_copy(
        update={"max_poison_ratio": 0.1, "poison_window": 20, "max_events": 8})})  # 2 of the last 20
    good = load_conversations(EXAMPLES / "conversations.jsonl", 24)
    stream = [_planted(e) for e in good]
    random.Random(5).shuffle(stream)
    await create_topics(settings)
    with pytest.raises(FatalError, match="of the last 20 records raised while being classified"):
        async with running_service(settings) as running:
            await produce(settings, stream)

            async def stopped() -> bool:
                return running.service.state.value == "failed"

            await wait_until(stopped, 120, "the service to stop on its own")
    assert "limit 2, batch.max_poison_ratio" in (running.service.error or "")
    dlq = await read_topic(settings, settings.topics.dlq)
    assert len(dlq) <= 2
    assert sum((await committed(settings)).values()) <= len(dlq)  # nothing past the dead letters
    assert await count_rows(settings) == 0


async def _rows_at_least(settings: Settings, n: int) -> bool:
    return await count_rows(settings) >= n
