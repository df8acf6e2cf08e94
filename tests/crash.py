"""What a crash costs: dispatch-fcm, started as its image starts it, SIGKILLed at a random moment of
an event's sends, the event redelivered to a fresh process once the lease ran out, and every
wake-up counted per device at the FCM fake.

The fake notes when each accepted send arrived and when its answer left, and kills the process
group itself at the chosen send (the k-th of the event, k drawn at random), so the moment is
exact. A send whose answer had not left the fake by then was *in flight*: the killed process
could not know it was delivered, so it is sent again by design (at-least-once, bounded by the
send concurrency). Any other device sent to twice is a send the provider had answered but the
process had not yet recorded, or not even read: an answer that left the fake just before the
kill is still on its way back or unread in the process's socket, and the fake cannot tell. The
process itself has at most ``PUSH_DISPATCH_CONCURRENCY`` sends whose answer it has not read;
the devices re-sent beyond that many are answers it had read and not yet written, which
:meth:`shared.recorder.Recorder.room` keeps below :data:`shared.recorder.ROOM`.

Used by the suite (a few kills, ``tests/test_hardening_faults.py``) and by ``bench/faults.py``
(the distribution over many).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from fakes.fcm import FakeFcm
from fakes.server import Reply
from tests import events
from tests.deployed import Deployed, as_image

LEASE_SECONDS = 3
#: The settings of the killed and the fresh process: a lease short enough to wait out, above
#: the deadline and drain as the dispatcher requires.
CONCURRENCY = 100
SETTINGS = {"PUSH_DELIVERY_LEASE_SECONDS": "3", "PUSH_DISPATCH_DEADLINE_SECONDS": "2",
            "PUSH_DISPATCH_DRAIN_SECONDS": "0.5", "PUSH_DISPATCH_CONCURRENCY": str(CONCURRENCY),
            "PUSH_LOG_LEVEL": "warning"}
MAX_REDELIVERIES = 10


@dataclass(frozen=True)
class Send:
    token: str
    arrived: float
    answered: float
    """When the answer left the fake (``time.monotonic()``): arrival plus the network's round
    trip and the fake's latency."""


class CountingFcm(FakeFcm):
    """The FCM fake, noting every accepted send, and SIGKILLing a process group at the k-th."""

    def __init__(self, **kwargs) -> None:
        super().__init__(record=False, **kwargs)
        self.sends: list[Send] = []
        self.killed_at: float | None = None
        self._kill: tuple[int, int] | None = None

    def arm(self, at_send: int, process_group: int) -> None:
        """Forget the sends so far; kill ``process_group`` when the ``at_send``-th arrives."""
        with self.lock:
            self.sends, self.killed_at, self._kill = [], None, (at_send, process_group)

    def handle(self, request):
        reply = super().handle(request)
        if isinstance(reply, Reply) and reply.push and reply.status == 200:
            now = time.monotonic()
            token = json.loads(request.body)["message"]["token"]
            with self.lock:
                self.sends.append(Send(token, now, now + self.network.rtt + reply.delay))
                if self._kill is not None and len(self.sends) >= self._kill[0]:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self._kill[1], signal.SIGKILL)
                    self.killed_at, self._kill = now, None
        return reply


@dataclass(frozen=True)
class KillCount:
    """One kill, counted per device at the fake."""

    devices: int
    sent_before: int
    """Devices whose wake-up the fake had answered before the kill."""
    in_flight: int
    """Devices whose first wake-up the killed process had sent but the fake not answered yet."""
    duplicated: int
    beyond_in_flight: int
    """Devices sent to twice although the fake had answered the first send before the kill."""
    beyond_concurrency: int
    """Devices sent to twice beyond :data:`CONCURRENCY` (the most the process could have sent
    without reading the answer): answers it had read but not yet recorded, at least."""
    lost: int
    redeliveries: int


def count(tokens: list[str], sends: list[Send], killed_at: float, redelivered_at: float,
          redeliveries: int) -> KillCount:
    """The counts of one kill from the sends the fake accepted: those that arrived before the
    redelivery are the killed process's (some arrive only after the kill: sent before it)."""
    killed: dict[str, Send] = {}
    times: dict[str, int] = dict.fromkeys(tokens, 0)
    for send in sends:
        if send.arrived < redelivered_at:
            killed.setdefault(send.token, send)
        times[send.token] += 1
    answered = {token for token, send in killed.items() if send.answered < killed_at}
    in_flight = set(killed) - answered
    twice = {token for token, n in times.items() if n > 1}
    return KillCount(len(tokens), len(answered), len(in_flight), len(twice), len(twice & answered),
                     max(len(twice) - CONCURRENCY, 0), sum(1 for n in times.values() if n == 0), redeliveries)


def post(dispatcher: Deployed, posted: dict) -> int | None:
    """The event posted as the broker does; its status, ``None`` when the process died."""
    request = urllib.request.Request(f"http://127.0.0.1:{dispatcher.port}/", data=posted["content"],
                                     headers=posted["headers"], method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ConnectionError):
        return None


@contextlib.contextmanager
def dispatchers(environment: Mapping[str, str], log: Path) -> Iterator[Iterator[Deployed]]:
    """Fresh dispatch-fcm processes, one after another, each started while the previous works."""
    with contextlib.ExitStack() as stack:
        def fresh() -> Iterator[Deployed]:
            while True:
                yield stack.enter_context(as_image("dispatch-fcm", {**environment, **SETTINGS}, log))

        yield fresh()


def kill_once(fake: CountingFcm, killed: Deployed, fresh: Deployed, users: list[str], tokens: list[str],
              event_id: str, at_send: int) -> KillCount:
    """Post a new event to ``killed``, SIGKILL it at the ``at_send``-th send of the event,
    redeliver the event to ``fresh`` once the lease ran out, and count."""
    posted = events.notification(users, id_=event_id)
    fake.arm(at_send, killed.process.pid)
    answer: list[int | None] = []
    first = threading.Thread(target=lambda: answer.append(post(killed, posted)))
    first.start()
    first.join(30)
    killed.process.wait(10)
    assert answer == [None] and fake.killed_at is not None, f"the dispatcher was not killed mid-event: {answer}"
    killed_at = fake.killed_at
    time.sleep(max(killed_at + LEASE_SECONDS + 0.2 - time.monotonic(), 0))
    redelivered_at = time.monotonic()
    for redelivery in range(1, MAX_REDELIVERIES + 1):
        status = post(fresh, posted)
        if status == 202:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the redelivered event was still not done: {status}")
    with fake.lock:
        sends = list(fake.sends)
    return count(tokens, sends, killed_at, redelivered_at, redelivery)


def summary(kills: list[KillCount]) -> dict[str, object]:
    """Min, median and max of each count over the kills."""
    fields = ("beyond_in_flight", "beyond_concurrency", "in_flight", "duplicated", "sent_before", "lost")
    return {name: {"min": min(v), "median": statistics.median(v), "max": max(v)}
            for name in fields for v in [[getattr(k, name) for k in kills]]} | {"kills": len(kills)}


def as_dict(kill: KillCount) -> dict[str, int]:
    return asdict(kill)
