"""Group commit: the database work of concurrent requests, done in one transaction.

A dispatcher handles many events at once, and each needs the same two short transactions (claim
its devices, record the outcomes). Run one by one, their fixed cost (a thread hop, a connection, a
commit round trip, statement set-up) outweighs the rows they write: that made the database most of
a dispatcher's CPU per event. A :class:`Batcher` runs one batch at a time in a worker thread;
requests arriving meanwhile queue up and go together in the next batch. Under light load a batch
holds one request and costs what it did alone; under load, batches grow and the cost per request
falls, with no timer and no added latency.

Each Batcher has a thread of its own (an executor of one worker), handed its batch through the
executor's C queue: Starlette's ``run_in_threadpool`` (anyio's worker threads, a capacity
limiter, a cancel scope and a Python ``queue.Queue`` per hop) cost about twice as much CPU per
hop, on the path of every event (bench/README.md, "Profiling"). One thread is all a Batcher
uses, since it runs one batch at a time.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class Batcher(Generic[Request, Result]):
    """Calls ``run(requests)`` (in a thread) with every request queued since the last call began,
    and hands each caller its own result (``run`` returns them in order). When ``run`` raises,
    every caller of that batch gets the exception: a batch is one transaction, done whole or not
    at all. A ``run`` that writes a batch in several transactions returns, for the requests of
    one that failed, the exception instead of a result: only their callers get it."""

    def __init__(
        self, run: Callable[[Sequence[Request]], Sequence[Result | Exception]], max_batch: int = 200
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._queue: list[tuple[Request, asyncio.Future[Result]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")

    async def submit(self, request: Request) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append((request, future))
        drainer = self._drainer
        if drainer is None or drainer.done() or drainer.get_loop() is not loop:
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            try:
                # The drainer's context (log fields) goes along, as run_in_threadpool took it.
                run = functools.partial(contextvars.copy_context().run, self._run, [r for r, _ in batch])
                results = await asyncio.get_running_loop().run_in_executor(self._thread, run)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
