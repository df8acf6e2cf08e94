"""Load: a burst of 10,000 events at one dispatcher with a small connection pool. It must shed
what it cannot take at once with a retryable answer (503 + Retry-After) instead of queueing
everything in memory, never crash (no 500), stay within a memory bound, and every event must
complete on redelivery with each device woken exactly once per event.

This asserts the per-process cap on events in flight (shared/dispatch/admission.py,
``PUSH_DISPATCH_MAX_IN_FLIGHT``, answered 503 ``overloaded`` with Retry-After).
"""
from __future__ import annotations

import asyncio
import sys
import time

import httpx
import pytest
from functions_framework.aio import create_asgi_app

from tests import events
from tests.conftest import REPO
from tests.rigs import FcmRig

EVENTS = 10_000
CAP = 50
DEVICE_USERS = 100   # users with a device; 1 event in 10 is for one of them
BURST_LIMIT_SECONDS = 45
MEMORY_BOUND_MB = 300


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("database_url", ["mariadb"], indirect=True)
async def test_a_burst_of_10000_events_is_shed_not_queued_and_completes_on_redelivery(
    fcm_server, tmp_path, database_url, engine, monkeypatch
):
    rig = FcmRig(fcm_server, tmp_path)
    rig.configure(monkeypatch)
    monkeypatch.setenv("PUSH_DATABASE_POOL_SIZE", "3")
    monkeypatch.setenv("PUSH_DATABASE_MAX_OVERFLOW", "0")
    monkeypatch.setenv("PUSH_DISPATCH_MAX_IN_FLIGHT", str(CAP))
    app = create_asgi_app(target="dispatch_fcm", source=str(REPO / "functions/dispatch-fcm/main.py"))
    dispatcher = sys.modules["main"].dispatcher
    rows = {f"d{i}": rig.add(engine, f"d{i}") for i in range(DEVICE_USERS)}

    # Count the events being dispatched at once.
    active = peak = 0
    original = dispatcher.dispatch

    async def counted(*args, **kwargs):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            return await original(*args, **kwargs)
        finally:
            active -= 1

    dispatcher.dispatch = counted
    posted = [
        events.notification([f"d{i % DEVICE_USERS}" if i % 10 == 0 else f"nobody-{i}"], id_=f"burst-{i}")
        for i in range(EVENTS)
    ]
    due = {user: 0 for user in rows}
    for i in range(0, EVENTS, 10):
        due[f"d{i % DEVICE_USERS}"] += 1

    before = rss_mb()
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://f", limits=limits) as client:
        started = time.monotonic()
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*(client.post("/", **p) for p in posted)), BURST_LIMIT_SECONDS
            )
        except asyncio.TimeoutError:
            pytest.fail(f"the burst was not answered within {BURST_LIMIT_SECONDS} s (peak in flight {peak})")
        burst_seconds = time.monotonic() - started
        grown = rss_mb() - before
        statuses = [a.status_code for a in answers]
        counts = {s: statuses.count(s) for s in set(statuses)}
        print(f"\nLOAD burst of {EVENTS}: {counts} in {burst_seconds:.1f} s, peak in flight {peak}, "
              f"memory +{grown:.0f} MB")
        assert set(statuses) <= {202, 429, 503}, counts
        assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code != 202)
        assert peak <= CAP, f"{peak} events dispatched at once: no load shedding (cap {CAP})"
        assert counts.get(503, 0) > 0, "nothing was shed"
        assert grown < MEMORY_BOUND_MB, f"memory grew by {grown:.0f} MB"

        # The broker redelivers what was shed, at a pace the dispatcher takes.
        pending = [p for p, status in zip(posted, statuses) if status != 202]
        rounds = 0
        while pending and rounds < 50:
            rounds += 1
            results = []
            for start in range(0, len(pending), CAP):
                batch = pending[start:start + CAP]
                results += zip(batch, await asyncio.gather(*(client.post("/", **p) for p in batch)))
            assert all(r.status_code in (202, 429, 503) for _, r in results)
            pending = [p for p, r in results if r.status_code != 202]
        assert pending == [], f"{len(pending)} events still not done after {rounds} rounds"
    await dispatcher.aclose()
    lost = sum(max(due[u] - len(rig.wakeups(r)), 0) for u, r in rows.items())
    duplicated = sum(max(len(rig.wakeups(r)) - due[u], 0) for u, r in rows.items())
    print(f"LOAD redelivery rounds {rounds}: wake-ups due {sum(due.values())}, lost {lost}, duplicated {duplicated}")
    assert (lost, duplicated) == (0, 0)
