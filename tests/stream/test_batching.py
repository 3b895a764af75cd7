"""MicroBatcher: ready by count or by age, driven by an injected clock."""

from __future__ import annotations

import pytest

from stream.batching import MicroBatcher


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_empty_batcher_is_never_ready(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(3, 0.2, clock=clock)
    assert not b.ready()
    assert len(b) == 0
    assert b.time_left() == pytest.approx(0.2)
    clock.advance(100)
    assert not b.ready()
    assert b.take() == []


def test_ready_at_max_events(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(3, 10.0, clock=clock)
    b.append(1)
    b.append(2)
    assert not b.ready()
    b.append(3)
    assert b.ready()
    assert b.take() == [1, 2, 3]
    assert len(b) == 0
    assert not b.ready()


def test_ready_at_max_wait(clock: FakeClock) -> None:
    b: MicroBatcher[str] = MicroBatcher(100, 0.2, clock=clock)
    b.append("a")
    clock.advance(0.1)
    b.append("b")  # a later record does not extend the deadline of the open batch
    assert not b.ready()
    assert b.time_left() == pytest.approx(0.1)
    clock.advance(0.0999)
    assert not b.ready()
    clock.advance(0.0001)
    assert b.time_left() == 0.0
    assert b.ready()
    clock.advance(5)
    assert b.time_left() == 0.0  # never negative
    assert b.take() == ["a", "b"]


def test_age_starts_at_first_append_not_construction(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(10, 1.0, clock=clock)
    clock.advance(50)
    b.append(1)
    assert not b.ready()
    assert b.time_left() == pytest.approx(1.0)


def test_take_returns_at_most_max_events_and_rest_gets_fresh_age(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(3, 1.0, clock=clock)
    for i in range(7):
        b.append(i)
    clock.advance(2.0)  # the whole backlog is overdue
    assert b.ready()
    assert b.take() == [0, 1, 2]  # oldest first
    assert len(b) == 4
    assert b.ready()  # still >= max_events
    assert b.take() == [3, 4, 5]
    assert len(b) == 1
    # the remaining record starts a new batch aged from the take
    assert b.time_left() == pytest.approx(1.0)
    assert not b.ready()
    clock.advance(1.0)
    assert b.ready()
    assert b.take() == [6]
    assert len(b) == 0
    assert b.time_left() == pytest.approx(1.0)


def test_after_take_empties_next_append_opens_a_new_batch(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(5, 1.0, clock=clock)
    b.append(1)
    clock.advance(0.9)
    b.take()
    clock.advance(0.9)
    b.append(2)
    assert b.time_left() == pytest.approx(1.0)
    assert not b.ready()


def test_drop_removes_items_and_keeps_age_when_some_remain(clock: FakeClock) -> None:
    b: MicroBatcher[tuple[int, int]] = MicroBatcher(10, 1.0, clock=clock)
    for part, off in [(0, 1), (1, 1), (0, 2), (1, 2)]:
        b.append((part, off))
    clock.advance(0.6)
    assert b.drop(lambda item: item[0] != 1) == 2
    assert len(b) == 2
    assert b.time_left() == pytest.approx(0.4)  # the surviving records keep their age
    clock.advance(0.4)
    assert b.ready()
    assert b.take() == [(0, 1), (0, 2)]


def test_drop_everything_resets_age(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(10, 1.0, clock=clock)
    b.append(1)
    b.append(2)
    clock.advance(0.9)
    assert b.drop(lambda _: False) == 2
    assert len(b) == 0
    assert not b.ready()
    assert b.time_left() == pytest.approx(1.0)
    b.append(3)
    clock.advance(0.5)  # would be overdue if the old age had been kept
    assert not b.ready()
    assert b.time_left() == pytest.approx(0.5)


def test_drop_nothing(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(10, 1.0, clock=clock)
    assert b.drop(lambda _: False) == 0
    b.append(1)
    assert b.drop(lambda _: True) == 0
    assert len(b) == 1


@pytest.mark.parametrize("max_events, max_wait", [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -0.5)])
def test_invalid_args_raise(max_events: int, max_wait: float) -> None:
    with pytest.raises(ValueError):
        MicroBatcher(max_events, max_wait)


def test_default_clock_is_monotonic() -> None:
    b: MicroBatcher[int] = MicroBatcher(1, 60.0)
    b.append(1)
    assert 59.0 < b.time_left() <= 60.0
    assert b.ready()
