"""One rig per provider: configures a dispatcher against its fake server, makes devices, scripts
the provider's answers and counts what reached each device. Lets one dispatch specification run
against all three providers."""
from __future__ import annotations

import json
import time
from pathlib import Path

from fakes import fcm as fake_fcm
from fakes import webpush as fake_webpush
from shared.models import Subscription
from shared.vapid import generate_vapid_keys
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import subscription_bodies as bodies
from tests.stores import subscribe


class Rig:
    provider: str

    def __init__(self, fake, tmp_path: Path) -> None:
        self.fake = fake
        self.tmp_path = tmp_path

    @property
    def function(self) -> str:
        return f"dispatch-{self.provider}"

    def add(self, engine, user: str) -> Subscription:
        """A device of ``user`` subscribed with this provider."""
        return subscribe(SubscriptionStore(engine), user, self.new_subscription()).subscription


class FcmRig(Rig):
    provider = "fcm"

    def configure(self, monkeypatch) -> None:
        path = self.fake.write_service_account(self.tmp_path / "service-account.json")
        monkeypatch.setenv("PUSH_FCM_CREDENTIALS", str(path))
        monkeypatch.setenv("PUSH_FCM_ENDPOINT", self.fake.endpoint)
        monkeypatch.setenv("PUSH_FCM_CA_FILE", self.fake.ca_path)

    def new_subscription(self) -> NewSubscription:
        token = bodies.fcm_token()
        return NewSubscription("fcm", token, token)

    def dead(self, row: Subscription) -> None:
        self.fake.script(row.token, "UNREGISTERED")

    def transient_once(self, row: Subscription) -> None:
        self.fake.script(row.token, "UNAVAILABLE", fake_fcm.OK)

    def rate_limited_once(self, row: Subscription, retry_after: int) -> None:
        self.fake.script(row.token, fake_fcm.fcm_error("QUOTA_EXCEEDED", retry_after=retry_after), fake_fcm.OK)

    def rejected(self, row: Subscription) -> None:
        self.fake.script(row.token, "THIRD_PARTY_AUTH_ERROR")

    def hang(self, row: Subscription) -> None:
        self.fake.script(row.token, fake_fcm.HANG)

    def wakeups(self, row: Subscription) -> list[str]:
        """Message types that reached the device (dry runs do not)."""
        return [m.body["message"]["data"]["type"] for m in self.fake.messages
                if m.token == row.token and not m.validate_only]

    def attempts(self, row: Subscription) -> int:
        return len([r for r in self.fake.requests if r.token == row.token])

    def ttls(self, row: Subscription) -> list[int]:
        """The TTL (seconds) of each wake-up that reached the device."""
        return [int(m.body["message"]["android"]["ttl"].removesuffix("s")) for m in self.fake.messages
                if m.token == row.token and not m.validate_only]


class ApnsRig(Rig):
    provider = "apns"

    def configure(self, monkeypatch) -> None:
        monkeypatch.setenv("PUSH_APNS_KEY", self.fake.key_pem)
        monkeypatch.setenv("PUSH_APNS_KEY_ID", self.fake.key_id)
        monkeypatch.setenv("PUSH_APNS_TEAM_ID", self.fake.team_id)
        monkeypatch.setenv("PUSH_APNS_PRODUCTION_URL", self.fake.base_url)
        monkeypatch.setenv("PUSH_APNS_SANDBOX_URL", self.fake.base_url)
        monkeypatch.setenv("PUSH_APNS_CA_FILE", self.fake.ca_path)

    def new_subscription(self) -> NewSubscription:
        token = bodies.apns_token()
        return NewSubscription("apns", token, token, topic=bodies.TOPIC, environment="production")

    def dead(self, row: Subscription) -> None:
        self.fake.respond(row.token, 410, "Unregistered")

    def transient_once(self, row: Subscription) -> None:
        self.fake.respond(row.token, 503, "ServiceUnavailable", once=True)

    def rate_limited_once(self, row: Subscription, retry_after: int) -> None:
        self.fake.respond(row.token, 429, "TooManyRequests", retry_after=retry_after, once=True)

    def rejected(self, row: Subscription) -> None:
        self.fake.respond(row.token, 400, "BadTopic")

    def hang(self, row: Subscription) -> None:
        self.fake.hang(row.token)

    def wakeups(self, row: Subscription) -> list[str]:
        return [r.body["data"]["type"] for r in self.fake.requests if r.token == row.token and r.status == 200]

    def attempts(self, row: Subscription) -> int:
        return len([r for r in self.fake.requests if r.token == row.token])

    def ttls(self, row: Subscription) -> list[int]:
        """What is left of each delivered wake-up's TTL now (APNs takes an expiry time)."""
        return [int(r.headers["apns-expiration"]) - int(time.time()) for r in self.fake.requests
                if r.token == row.token and r.status == 200]


class WebPushRig(Rig):
    provider = "webpush"

    def configure(self, monkeypatch) -> None:
        keys = generate_vapid_keys()
        monkeypatch.setenv("PUSH_VAPID_PRIVATE_KEY", keys.private_key)
        monkeypatch.setenv("PUSH_VAPID_SUBJECT", "mailto:push@example.org")
        monkeypatch.setenv("PUSH_WEBPUSH_CA_FILE", self.fake.ca_file)
        # The fake push service is a local receiver: the one endpoint the rules let through.
        monkeypatch.setenv("PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS", f"localhost:{self.fake.port}")

    def new_subscription(self, application_server_key: str | None = None) -> NewSubscription:
        subscription = self.fake.subscribe(application_server_key)
        return NewSubscription("webpush", json.dumps(subscription), subscription["endpoint"])

    def add_stale(self, engine, user: str) -> Subscription:
        """A device of ``user`` whose browser subscribed with a VAPID key other than ours (one
        rotated away since): the push service refuses our pushes to it, and only to it."""
        other = generate_vapid_keys().public_key
        return subscribe(SubscriptionStore(engine), user, self.new_subscription(other)).subscription

    def dead(self, row: Subscription) -> None:
        self.fake.script(json.loads(row.token), 410, then=410)

    def transient_once(self, row: Subscription) -> None:
        self.fake.script(json.loads(row.token), 503)

    def rate_limited_once(self, row: Subscription, retry_after: int) -> None:
        self.fake.script(json.loads(row.token), fake_webpush.Answer(429, retry_after=str(retry_after)))

    def rejected(self, row: Subscription) -> None:
        self.fake.script(json.loads(row.token), 413, then=413)

    def hang(self, row: Subscription) -> None:
        self.fake.script(json.loads(row.token), fake_webpush.HANG, then=fake_webpush.HANG)

    def wakeups(self, row: Subscription) -> list[str]:
        return [p.message()["type"] for p in self.fake.pushes_to(json.loads(row.token)) if p.status == 201]

    def attempts(self, row: Subscription) -> int:
        return len(self.fake.pushes_to(json.loads(row.token)))

    def ttls(self, row: Subscription) -> list[int]:
        return [int(p.ttl) for p in self.fake.pushes_to(json.loads(row.token)) if p.status == 201]


RIGS = {"fcm": (FcmRig, "fcm_server"), "apns": (ApnsRig, "apns_server"), "webpush": (WebPushRig, "webpush_server")}
