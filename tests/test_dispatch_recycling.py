"""Wake-ups across connections the providers recycle, as their front ends do: each fake sends a
graceful GOAWAY, then the final one, after every 100 streams (real ones: about 1,000), refuses
some streams outright (RST_STREAM REFUSED_STREAM), and answers a round trip late, so streams are
in flight when each GOAWAY lands. Ten thousand wake-ups per provider, counted at the fake: not one
event fails, not one wake-up is lost or sent twice. The subject is the transport, not storage:
it runs on SQLite only (the dispatch specification runs on both, with recycling on too)."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from fakes.apns import FakeApns
from fakes.fcm import FakeFcm
from fakes.server import Network
from fakes.webpush import FakeWebPushService
from shared.subscriptions import SubscriptionStore
from tests import events
from tests.rigs import RIGS
from tests.stores import subscribe

DEVICES = 200
EVENTS = 50
"""Each event names every device's user: EVENTS x DEVICES = 10,000 wake-ups."""
IN_FLIGHT = 4
NETWORK = Network(rtt=0.005, recycle_after=100, refuse_every=97)


def recycling_fake(provider: str):
    if provider == "apns":
        return FakeApns(network=Network(**{**NETWORK.__dict__, "max_concurrent_streams": 1}))
    if provider == "fcm":
        return FakeFcm(network=NETWORK)
    return FakeWebPushService(network=NETWORK)


def accepted_per_device(rig, rows) -> Counter:
    return Counter({row.id: len(rig.wakeups(row)) for row in rows})


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("provider", ["apns", "fcm", "webpush"])
async def test_ten_thousand_wakeups_across_recycled_connections_none_failed_lost_or_doubled(
        provider, function_client, engine, tmp_path, monkeypatch):
    rig_class, _ = RIGS[provider]
    with recycling_fake(provider) as fake:
        rig = rig_class(fake, tmp_path)
        rig.configure(monkeypatch)
        store = SubscriptionStore(engine)
        rows = [subscribe(store, f"u{i}", rig.new_subscription()).subscription
                for i in range(DEVICES)]
        users = [f"u{i}" for i in range(DEVICES)]
        dispatch = function_client(rig.function)
        posts = asyncio.Semaphore(IN_FLIGHT)

        async def post(number: int) -> int:
            async with posts:
                response = await dispatch.post("/", **events.notification(users, id_=f"e{number}"))
                return response.status_code

        statuses = await asyncio.gather(*(post(n) for n in range(EVENTS)))

        assert Counter(statuses) == {202: EVENTS}
        assert accepted_per_device(rig, rows) == Counter({row.id: EVENTS for row in rows})
        counts = fake.counts
        assert counts.pushes_accepted == EVENTS * DEVICES
        assert counts.pushes_refused == 0
        # The recycling and the refusals did happen, many times over.
        assert counts.connections_made >= 20
        assert counts.goaways >= 20
        assert counts.streams_refused >= 50
