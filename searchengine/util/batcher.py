"""A micro-batcher: concurrent requests share one model call.

Continuous batching: while the model is busy, arriving requests queue up; when it is free, the
next call takes everything queued (up to `max_batch`). A request that finds the model idle
runs at once, so batching adds no latency at low load. `max_wait_ms` > 0 additionally holds a
batch open that long for company (a fixed wait measured worse: it halved requests/s at
concurrency 1, see benchmarks/load.py). Calls run in a thread of the batcher's own, so the
event loop never waits on the model, and callers that wait in the loop's shared worker threads
(the query pipeline) can never take every thread the model call needs. With `max_batch=1` every request runs alone (the benchmark's baseline).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(
        self,
        fn: Callable[[Sequence[T]], np.ndarray],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.fn = fn
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch or (lambda size, seconds: None)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="batcher")

    async def submit(self, item: T) -> np.ndarray:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._thread.shutdown(wait=False)

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch and self.max_wait > 0:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            items = [item for item, _ in batch]
            start = time.perf_counter()
            try:
                out = await asyncio.get_running_loop().run_in_executor(self._thread, self.fn, items)
            except Exception as e:  # every waiter gets the error, the worker lives on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.on_batch(len(batch), time.perf_counter() - start)
            for i, (_, future) in enumerate(batch):
                if not future.done():
                    future.set_result(out[i])
