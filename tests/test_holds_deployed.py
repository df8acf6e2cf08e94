"""The emergency stop on MariaDB, with two dispatcher processes started as the image starts them
(tests/deployed.py), under load: once the holds' cache window has passed nothing more reaches the
provider, and after the resume every kept wake-up reaches its device exactly once (counted at the
fake FCM), but those whose TTL ran out meanwhile."""
from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import httpx

from shared.cli import main as pushctl
from shared.db import get_engine
from shared.hold_gate import CACHE_SECONDS
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import events
from tests import subscription_bodies as bodies
from tests.conftest import fresh_database
from tests.deployed import as_image
from tests.stores import subscribe

DEVICES = 30
TYPES = [f"wake{n}" for n in range(200)]
EVENT_EVERY = 0.15


async def test_a_pause_mid_load_stops_two_replicas_and_the_resume_sends_each_kept_wake_up_once(
        fcm_server, tmp_path: Path, monkeypatch):
    url = fresh_database("mariadb", tmp_path)
    monkeypatch.setenv("PUSH_DATABASE_URL", url)
    store = SubscriptionStore(get_engine(url))
    tokens = [bodies.fcm_token() for _ in range(DEVICES)]
    for n, token in enumerate(tokens):
        subscribe(store, f"user{n}", NewSubscription("fcm", token, token))
    users = [f"user{n}" for n in range(DEVICES)]
    credentials = fcm_server.write_service_account(tmp_path / "sa.json")
    environment = dict(os.environ) | {
        "PUSH_DATABASE_URL": url, "PUSH_FCM_CREDENTIALS": str(credentials),
        "PUSH_FCM_ENDPOINT": fcm_server.endpoint, "PUSH_FCM_CA_FILE": fcm_server.ca_path,
        "PUSH_MESSAGE_TYPES": ",".join(TYPES),
    }
    answered: dict[str, int] = {}  # message type -> status; one event per type, to all devices
    types = iter(TYPES)

    async def post(client: httpx.AsyncClient, ttl: int = 3600) -> None:
        message_type = next(types)
        response = await client.post("/", **events.notification(users, message_type=message_type, ttl_seconds=ttl))
        answered[message_type] = response.status_code

    with as_image("dispatch-fcm", environment, tmp_path / "a.log") as one, \
            as_image("dispatch-fcm", environment, tmp_path / "b.log") as two:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{one.port}", timeout=60) as a, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{two.port}", timeout=60) as b:

            async def load(seconds: float) -> None:
                started, turn = time.monotonic(), 0
                while time.monotonic() - started < seconds:
                    await post((a, b)[turn % 2])
                    turn += 1
                    await asyncio.sleep(EVENT_EVERY)

            loading = asyncio.create_task(load(2.0 + CACHE_SECONDS + 1.0 + 3.0))
            await asyncio.sleep(2.0)
            assert await asyncio.to_thread(pushctl, ["pause", "--provider", "fcm", "--reason", "load test"]) == 0
            await asyncio.sleep(CACHE_SECONDS + 1.0)
            settled = len(fcm_server.messages)
            await loading
            sent_while_paused = len(fcm_server.messages) - settled
            short_lived = [next(types), next(types)]
            for client, message_type in zip((a, b), short_lived):
                response = await client.post("/", **events.notification(users, message_type=message_type, ttl_seconds=1))
                answered[message_type] = response.status_code
            await asyncio.sleep(2.5)  # their TTL runs out while paused

            assert await asyncio.to_thread(pushctl, ["resume", "--provider", "fcm"]) == 0
            await asyncio.sleep(CACHE_SECONDS + 0.5)
            for client in (a, b, a):
                assert (await client.post("/", **events.ping())).status_code == 202

    assert sent_while_paused == 0
    assert set(answered.values()) == {202}
    delivered = Counter((m.token, m.body["message"]["data"]["type"]) for m in fcm_server.messages)
    expected = {(token, t) for token in tokens for t in answered if t not in short_lived}
    assert set(delivered) == expected  # none lost, the short-lived ones expired
    assert set(delivered.values()) == {1}  # none twice
    assert len(answered) - len(short_lived) > 30  # a load, and a pause in the middle of it
