from __future__ import annotations

import asyncio
import threading

import numpy as np

from searchengine.util.batcher import MicroBatcher


class Recorder:
    def __init__(self, delay: float = 0.02, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.threads: set[int] = set()

    def __call__(self, items):
        self.threads.add(threading.get_ident())
        self.calls.append(list(items))
        if self.fail_on in items:
            raise ValueError("model failed")
        import time

        time.sleep(self.delay)
        return np.array([[len(x), i] for i, x in enumerate(items)], dtype=np.float32)


async def _submit_all(batcher, items):
    return await asyncio.gather(*(batcher.submit(x) for x in items), return_exceptions=True)


def test_concurrent_requests_share_calls_and_get_their_own_answers():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=20)
    items = [f"query {'x' * i}" for i in range(20)]

    async def go():
        out = await _submit_all(batcher, items)
        await batcher.close()
        return out

    out = asyncio.run(go())
    assert len(fn.calls) < len(items) and max(len(c) for c in fn.calls) <= 8
    for item, row in zip(items, out):
        assert row[0] == len(item)  # each waiter gets the row of its own item
    assert threading.get_ident() not in fn.threads  # the model runs off the event loop


def test_max_batch_one_runs_each_alone():
    fn = Recorder(delay=0)
    batcher = MicroBatcher(fn, max_batch=1, max_wait_ms=20)

    async def go():
        await _submit_all(batcher, ["a", "bb", "ccc"])
        await batcher.close()

    asyncio.run(go())
    assert fn.calls == [["a"], ["bb"], ["ccc"]]


def test_an_error_reaches_every_waiter_and_the_batcher_lives_on():
    fn = Recorder(delay=0, fail_on="bad")
    batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=30)

    async def go():
        first = await _submit_all(batcher, ["ok", "bad", "fine"])
        second = await batcher.submit("later")
        await batcher.close()
        return first, second

    first, second = asyncio.run(go())
    assert all(isinstance(r, ValueError) for r in first)
    assert second[0] == len("later")


def test_a_lone_request_waits_no_longer_than_max_wait():
    import time

    batcher = MicroBatcher(Recorder(delay=0), max_batch=64, max_wait_ms=30)

    async def go():
        t = time.perf_counter()
        await batcher.submit("alone")
        elapsed = time.perf_counter() - t
        await batcher.close()
        return elapsed

    assert asyncio.run(go()) < 0.5


def test_requests_arriving_during_a_call_form_the_next_batch_without_any_wait():
    fn = Recorder(delay=0.1)
    batcher = MicroBatcher(fn, max_batch=16, max_wait_ms=0)

    async def go():
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.sleep(0.03)  # "first" is now in the model
        rest = [asyncio.ensure_future(batcher.submit(f"q{i}")) for i in range(5)]
        await asyncio.gather(first, *rest)
        await batcher.close()

    asyncio.run(go())
    assert fn.calls == [["first"], [f"q{i}" for i in range(5)]]
