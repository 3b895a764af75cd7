import asyncio
import math
import threading
import time

import numpy as np
import pytest

from models.llm.engine import EngineError
from models.llm.scheduler import BatchScheduler, SchedulerClosed


class Counting:
    """The real tiny engine, recording each batch it is given; fails batches holding "boom"."""

    def __init__(self, engine, delay_s: float = 0.0):
        self.engine = engine
        self.model_id = engine.model_id
        self.stats = engine.stats
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def score(self, prompts):
        self.batches.append(list(prompts))
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if any("boom" in p for p in prompts):
            raise EngineError("engine failed on this batch", retriable=True)
        return self.engine.score(prompts)

    def generate(self, prompts, max_tokens=64):
        return self.engine.generate(prompts, max_tokens)

    def count_tokens(self, prompts):
        return self.engine.count_tokens(prompts)


# Short prompts: the scheduler does not care what they say, and the tests stay fast.
PROMPTS = [f"customer {i}: my payment {'failed' if i % 3 else 'worked'} {'again ' * (i % 7)}- yes?" for i in range(70)]


@pytest.fixture(scope="module")
def expected(tiny_engine):
    return tiny_engine.score(PROMPTS)


async def test_concurrent_requests_are_batched_and_resolved_in_order(tiny_engine, expected):
    engine = Counting(tiny_engine)
    async with BatchScheduler(engine, max_batch=32, max_wait_ms=200) as scheduler:
        got = await asyncio.gather(*(scheduler.score(p) for p in PROMPTS))
    assert len(engine.batches) == math.ceil(70 / 32)
    assert [len(b) for b in engine.batches] == [32, 32, 6]
    assert [p for b in engine.batches for p in b] == PROMPTS  # arrival order kept
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert engine.threads == {"llm-engine_0"}  # off the event loop, one worker thread
    assert scheduler.stats.batches == 3 and scheduler.stats.prompts == 70


async def test_score_many_keeps_input_order(tiny_engine, expected):
    async with BatchScheduler(Counting(tiny_engine), max_batch=16, max_wait_ms=50) as scheduler:
        got = await scheduler.score_many(PROMPTS[:20][::-1])
    np.testing.assert_allclose(got, expected[:20][::-1], atol=1e-5)


async def test_a_lone_request_runs_as_a_batch_of_one(tiny_engine, expected):
    # How long it waits for company (max_wait) is a latency: `python -m models.llm.bench` measures it.
    engine = Counting(tiny_engine)
    async with BatchScheduler(engine, max_batch=32, max_wait_ms=30) as scheduler:
        got = await scheduler.score(PROMPTS[0])
    assert [len(b) for b in engine.batches] == [1]
    assert got == pytest.approx(expected[0], abs=1e-5)


async def test_a_failed_batch_fails_every_caller_of_that_batch_only(tiny_engine, expected):
    engine = Counting(tiny_engine)
    prompts = PROMPTS[:8]
    prompts[5] = "boom " + prompts[5]
    async with BatchScheduler(engine, max_batch=4, max_wait_ms=100) as scheduler:
        results = await asyncio.gather(*(scheduler.score(p) for p in prompts), return_exceptions=True)
        # The scheduler keeps working after a failed batch.
        assert await scheduler.score(PROMPTS[0]) == pytest.approx(expected[0], abs=1e-5)
    np.testing.assert_allclose(results[:4], expected[:4], atol=1e-5)
    assert all(isinstance(r, EngineError) and r.retriable for r in results[4:])
    assert scheduler.stats.failed_batches == 1


async def test_the_event_loop_keeps_running_during_a_batch(tiny_engine):
    engine = Counting(tiny_engine, delay_s=0.4)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    async with BatchScheduler(engine, max_batch=8, max_wait_ms=1) as scheduler:
        await scheduler.score_many(PROMPTS[:8])
    task.cancel()
    assert ticks >= 10  # a blocked loop would tick about once


async def test_close_runs_what_is_queued_then_refuses(tiny_engine, expected):
    engine = Counting(tiny_engine, delay_s=0.1)
    scheduler = BatchScheduler(engine, max_batch=4, max_wait_ms=1)
    pending = [asyncio.create_task(scheduler.score(p)) for p in PROMPTS[:10]]
    await asyncio.sleep(0)
    await scheduler.close()
    np.testing.assert_allclose([await t for t in pending], expected[:10], atol=1e-5)
    with pytest.raises(SchedulerClosed):
        await scheduler.score(PROMPTS[0])


async def test_a_cancelled_caller_does_not_disturb_the_others(tiny_engine, expected):
    engine = Counting(tiny_engine)
    async with BatchScheduler(engine, max_batch=8, max_wait_ms=100) as scheduler:
        tasks = [asyncio.create_task(scheduler.score(p)) for p in PROMPTS[:6]]
        await asyncio.sleep(0)
        tasks[2].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    np.testing.assert_allclose([done[i] for i in (0, 1, 3, 4, 5)], expected[[0, 1, 3, 4, 5]], atol=1e-5)


async def test_a_bounded_queue_applies_backpressure(tiny_engine, expected):
    engine = Counting(tiny_engine, delay_s=0.05)
    async with BatchScheduler(engine, max_batch=2, max_wait_ms=1, max_queue=2) as scheduler:
        got = await scheduler.score_many(PROMPTS[:9])
    np.testing.assert_allclose(got, expected[:9], atol=1e-5)
    assert max(len(b) for b in engine.batches) <= 2


def test_bad_limits_are_refused(tiny_engine):
    with pytest.raises(ValueError):
        BatchScheduler(tiny_engine, max_batch=0)


async def test_callers_waiting_on_a_full_queue_at_close_are_not_left_hanging(tiny_engine):
    engine = Counting(tiny_engine, delay_s=0.2)
    scheduler = BatchScheduler(engine, max_batch=1, max_wait_ms=1, max_queue=1)
    tasks = [asyncio.create_task(scheduler.score(p)) for p in PROMPTS[:6]]
    await asyncio.sleep(0.05)
    await scheduler.close()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert all(isinstance(r, float | SchedulerClosed) for r in done)
    assert any(isinstance(r, float) for r in done)
