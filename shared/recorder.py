"""Writing what the sends came to as soon as they answer, and through a database outage.

A redelivered event sends nothing twice only where the ledger (:mod:`shared.deliveries`, and the
pending table for a flush) knows the outcome. Two faults left it not knowing:

- **a crash.** What the process had sent but not yet written is sent again by the redelivery.
  Outcomes used to be written every 100 ms, longer than a whole 300-device event's sends, so a
  kill lost the record of nearly everything the killed process sent. A :class:`Recorder` takes
  each outcome the moment its send answered and writes by *group commit*: one write at a time,
  each taking everything handed over while the previous one ran, with no timer. Under light load
  a write holds a few outcomes and starts at once; under load writes grow, not multiply. A
  write takes ten times as long while the event loop is busy sending (this thread waits for the
  GIL between the database's round trips), so dozens of answers could arrive during one: the
  sends therefore wait for :meth:`Recorder.room` before they start, and none starts while
  :data:`ROOM` outcomes wait for their write. What a kill leaves answered (and read) but
  unwritten is then fewer than ``ROOM`` plus what was on the wire when the sends stopped (at
  most the send concurrency of each event in flight), whatever the GIL does.
- **a database blip.** A write that cannot reach the database used to give up at once: the event
  was answered 503 and its claims, still ``sending``, were taken over and sent again once their
  lease ran out. A :class:`Recorder` tries the write again (with what arrived meanwhile) until
  each outcome's own time runs out: the event's dispatch deadline, then the drain period
  (``PUSH_DISPATCH_DRAIN_SECONDS``). The event waits for its outcomes before it answers, so an
  outage shorter than that costs time, not duplicates. The writes must be safe to repeat: a write
  cut off mid-statement may have committed (see :mod:`shared.deliveries`).

Every claim lease must outlast that time (:data:`shared.settings.RULES`): a claim running out
while its invocation could still record would let another invocation take the devices over and
send again.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar


from shared.db import DatabaseUnavailable

log = logging.getLogger(__name__)

Item = TypeVar("Item")
T = TypeVar("T")

#: The first pause before a write is tried again; it doubles up to :data:`MAX_PAUSE`.
FIRST_PAUSE = 0.05
MAX_PAUSE = 1.0
#: How many outcomes may wait for their write (queued, or in the write under way) before
#: :meth:`Recorder.room` holds new sends back: what a kill leaves answered but unwritten, beyond
#: the sends already on the wire (``bench/faults.py`` measures it).
ROOM = 16


@dataclass(eq=False)
class _Entry(Generic[Item]):
    item: Item
    until: float
    """``time.monotonic()`` after which a failing write gives this item up."""
    done: asyncio.Future[None]


class Recorder(Generic[Item]):
    """Calls ``write(items)`` on a thread of its own, one call at a time, with every item handed
    to :meth:`add` since the previous call began. A call raising :class:`DatabaseUnavailable` is
    made again, after a pause, with the same items and those added meanwhile; an item is given
    up (its future fails with that error) once a call fails after the item's ``until``. Another
    exception fails that call's items: retrying would not help.

    The thread takes the next items as soon as a write returns, without waiting for the event
    loop (busy with the sends, it would hand them over only between its callbacks), and is
    started on the first :meth:`add` of each process (gunicorn forks the worker after the
    dispatcher is made)."""

    def __init__(self, write: Callable[[Sequence[Item]], object], what: str, max_batch: int = 5000,
                 room: int = ROOM) -> None:
        self._write = write
        self._what = what
        self._max_batch = max_batch
        self._room = room
        self._queue: list[_Entry[Item]] = []
        self._outstanding = 0
        """Items handed over and not yet settled: queued, or in the write under way."""
        self._waiting: list[asyncio.Future[None]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, item: Item, until: float) -> asyncio.Future[None]:
        """Hand ``item`` over to be written; the future is done once it is."""
        loop = asyncio.get_running_loop()
        entry = _Entry(item, until, loop.create_future())
        with self._wake:
            self._queue.append(entry)
            self._outstanding += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"recorder: {self._what}", daemon=True)
                self._thread.start()
            self._wake.notify()
        return entry.done

    async def room(self) -> None:
        """Return once fewer than ``room`` items wait for their write; call it before a send
        whose outcome will be added. While the event loop is busy sending, this thread waits for
        the GIL between the database's round trips and a write takes ten times as long, so the
        answers would pile up unwritten (a kill re-sends them all); held back, the sends pause,
        the loop idles and the write finishes at full speed. Through a database outage the sends
        wait here until it returns or their deadline cancels them (a waiter cancelled is skipped
        when the room comes): past the room, none is made whose outcome could not be written."""
        loop = asyncio.get_running_loop()
        while True:
            with self._wake:
                if self._outstanding < self._room:
                    return
                waiter = loop.create_future()
                self._waiting.append(waiter)
            await waiter

    def _settled(self, count: int) -> None:
        """``count`` items are written or given up: wake the sends waiting for room."""
        with self._wake:
            self._outstanding -= count
            if self._outstanding >= self._room:
                return
            waiting, self._waiting = self._waiting, []
        _resolve_on_loops(waiting, None)

    def _take(self) -> list[_Entry[Item]]:
        with self._wake:
            while not self._queue:
                self._wake.wait()
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            return batch

    def _run(self) -> None:
        pause, failing_since = FIRST_PAUSE, None
        while True:
            batch = self._take()
            try:
                self._write([entry.item for entry in batch])
            except DatabaseUnavailable as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("could not record %s yet: database unavailable; trying again", self._what)
                given_up = [entry for entry in batch if entry.until <= now]
                if given_up:
                    log.error("could not record %s: database unavailable", self._what,
                              extra={"given_up": len(given_up)})
                    _settle(given_up, exc)
                    self._settled(len(given_up))
                with self._wake:
                    self._queue[:0] = [entry for entry in batch if entry.until > now]
                time.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)
                continue
            except Exception as exc:  # noqa: BLE001 - handed to every item of the write
                _settle(batch, exc)
                self._settled(len(batch))
                continue
            if failing_since is not None:
                log.info("recorded %s after %.1f s of database outage", self._what,
                         time.monotonic() - failing_since, extra={"recorded": len(batch)})
                pause, failing_since = FIRST_PAUSE, None
            _settle(batch, None)
            self._settled(len(batch))


def _settle(entries: list[_Entry[Item]], error: BaseException | None) -> None:
    """Resolve the entries' futures on their loops, from the writer's thread."""
    _resolve_on_loops([entry.done for entry in entries], error)


def _resolve_on_loops(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """Resolve ``futures`` on their loops (one call per loop), from the writer's thread."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for future in futures:
        by_loop.setdefault(future.get_loop(), []).append(future)
    for loop, on_loop in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, on_loop, error)


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


async def written(futures: Iterable[asyncio.Future[None]]) -> None:
    """Wait for every one of ``futures`` (from :meth:`Recorder.add`); raise the first error, once
    all are settled (so no failure goes unretrieved)."""
    results = await asyncio.gather(*futures, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def until_reachable(call: Callable[[], Awaitable[T]], until: float, what: str) -> T:
    """``await call()``, again after a pause while the database is unreachable, until
    ``time.monotonic()`` passes ``until``; then the last :class:`DatabaseUnavailable` is raised.
    For a write that is safe to repeat (a claim with its token chosen beforehand)."""
    pause, warned = FIRST_PAUSE, False
    while True:
        try:
            return await call()
        except DatabaseUnavailable:
            if time.monotonic() + pause >= until:
                raise
            if not warned:
                log.warning("could not %s yet: database unavailable; trying again", what)
                warned = True
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)
