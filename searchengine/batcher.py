"""A micro-batcher: concurrent requests share one model call.

The first request to arrive opens a batch; it is run when `max_batch` requests have joined or
`max_wait_ms` has passed, whichever comes first, in a worker thread, so the event loop never
waits on the model. With `max_batch=1` every request runs alone (the baseline the load
benchmark compares against).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(
        self,
        fn: Callable[[Sequence[T]], np.ndarray],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.fn = fn
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch or (lambda size, seconds: None)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

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

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
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
                out = await asyncio.to_thread(self.fn, items)
            except Exception as e:  # every waiter gets the error, the worker lives on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.on_batch(len(batch), time.perf_counter() - start)
            for i, (_, future) in enumerate(batch):
                if not future.done():
                    future.set_result(out[i])
