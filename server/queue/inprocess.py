"""The embedded backend: one batching worker thread in the server process.

Jobs from every stream meet in one thread-safe queue; the worker takes the first job, then
waits at most ``max_wait_s`` for more (up to ``max_batch``), so a lone stream pays a few
milliseconds and a busy server gets full batches (the dynamic batching of Triton's
``max_queue_delay``). Torch releases the GIL during the forward, so the event loop keeps
serving streams meanwhile.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from models.inference import Detector
from server import metrics
from server.queue.base import InferenceQueue, QueueUnavailable, WindowJob, WindowScore
from server.queue.batching import score_jobs

_Item = tuple[WindowJob, asyncio.Future[WindowScore], asyncio.AbstractEventLoop]


class InProcessQueue(InferenceQueue):
    def __init__(self, detector: Detector, max_batch: int = 32, max_wait_s: float = 0.005):
        self.detector = detector
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._jobs: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._depth = 0
        self._lock = threading.Lock()

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def depth(self) -> int:
        return self._depth

    async def submit(self, job: WindowJob) -> WindowScore:
        if not await self.healthy():
            raise QueueUnavailable("the inference thread is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[WindowScore] = loop.create_future()
        with self._lock:
            self._depth += 1
        self._jobs.put((job, future, loop))
        return await future

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._jobs.get(timeout=remaining) if remaining > 0 else (
                    self._jobs.get_nowait())
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            live = [item for item in batch if not item[1].cancelled()]  # dropped streams
            with self._lock:
                self._depth -= len(batch) - len(live)
            if not live:
                continue
            started = time.perf_counter()
            try:
                results: list[WindowScore] | BaseException = score_jobs(
                    self.detector, [job for job, _, _ in live])
            except Exception as exc:  # a bad batch fails its jobs, not the thread
                results = exc
            metrics.observe_batch(len(live), time.perf_counter() - started)
            with self._lock:
                self._depth -= len(live)
            for i, (_, future, loop) in enumerate(live):
                outcome = results if isinstance(results, BaseException) else results[i]
                loop.call_soon_threadsafe(_resolve, future, outcome)


def _resolve(future: asyncio.Future[WindowScore], outcome: WindowScore | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
