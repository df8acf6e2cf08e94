"""Two steps of an event's path alone, in one process, CPU per call (`python bench/micro.py`):

- ``cloudevent``: reading a binary-mode CloudEvent as Echo posts it, with the CloudEvents SDK's
  ``from_http`` and with shared/events.py's own reading of the raw headers;
- ``hop``: handing work to a thread and back under uvloop, with Starlette's
  ``run_in_threadpool`` (anyio) and with an executor of one thread, as shared/batching.py does.

Steadier than the whole-function figures on a busy machine (docs/performance.md quotes both).
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import uvloop
from cloudevents.http import from_http
from starlette.concurrency import run_in_threadpool

from shared.events import NOTIFICATION_REQUESTED, _binary_event

CALLS = 20_000


def per_call_us(run: Callable[[], object]) -> float:
    started = time.process_time()
    for _ in range(CALLS):
        run()
    return round((time.process_time() - started) / CALLS * 1e6, 1)


def cloudevent() -> None:
    body = json.dumps({"users": ["solo1"], "message_type": "checkEchoV1", "event_type": "edit-user-talk"}).encode()
    raw = [(b"host", b"127.0.0.1:8080"), (b"content-length", str(len(body)).encode()),
           (b"content-type", b"application/json"), (b"ce-specversion", b"1.0"),
           (b"ce-type", NOTIFICATION_REQUESTED.encode()), (b"ce-source", b"/bench"),
           (b"ce-id", uuid.uuid4().hex.encode())]
    headers = {name.decode(): value.decode() for name, value in raw}
    for _ in range(2):  # the second round is the one to read: caches warm
        print(json.dumps({"name": "cloudevent_read", "unit": "us CPU/event",
                          "sdk_from_http": per_call_us(lambda: from_http(dict(headers), body)),
                          "shared_events": per_call_us(lambda: _binary_event(raw, body))}))


async def _hops() -> None:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)

    def work(n: int) -> int:
        return n

    for _ in range(2):
        figures = {}
        for name in ("run_in_threadpool", "executor"):
            started = time.process_time()
            for i in range(CALLS):
                if name == "executor":
                    await loop.run_in_executor(executor, functools.partial(contextvars.copy_context().run, work, i))
                else:
                    await run_in_threadpool(work, i)
            figures[name] = round((time.process_time() - started) / CALLS * 1e6, 1)
        print(json.dumps({"name": "thread_hop", "unit": "us CPU/hop", **figures}))
    executor.shutdown()


if __name__ == "__main__":
    cloudevent()
    uvloop.run(_hops())
