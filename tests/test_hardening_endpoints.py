"""Web Push endpoints reach push services only (issue 14, SSRF).

A probe had subscribe accept endpoints on loopback, private and metadata addresses, internal
names and port 22, and the dispatcher then POSTed to an internal HTTPS service whose 404 deleted
the row. These specify what is refused now: at subscribe (400, nothing written), at send time
(stored rows from before the rules, names that resolve inward, a second lookup that answers
otherwise: a rejected push, the row kept, nothing connected to), redirects, and the one
exception, exact local receivers for development. tests/test_hardening_deployed.py repeats the
probe's cases against the functions started as their images start them.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator

import pytest
from functions_framework.aio import create_asgi_app
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fakes.webpush import FakeWebPushService
from shared.config import ConfigError
from shared.core import Outcome, SendResult
from shared.endpoints import PUSH_SERVICES, EndpointRules, is_public_address
from shared.models import Delivery, Subscription
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import events
from tests import stores
from tests import subscription_bodies as bodies
from tests.conftest import REPO
from tests.metrics_scrape import changes, scrape, series
from tests.test_provider_webpush import device, make_provider, wakeup

#: Every endpoint the probe got accepted (issue 14), as it spelled them.
PROBED = {
    "loopback": "https://127.0.0.1/wpush/x",
    "loopback_redis_port": "https://127.0.0.1:6379/wpush/x",
    "localhost": "https://localhost/wpush/x",
    "localhost_final_dot": "https://localhost./wpush/x",
    "private_10": "https://10.0.0.1/wpush/x",
    "private_172": "https://172.16.0.1/wpush/x",
    "private_192": "https://192.168.1.1/wpush/x",
    "metadata_address": "https://169.254.169.254/latest/meta-data/",
    "ipv6_loopback": "https://[::1]/wpush/x",
    "ipv4_mapped_loopback": "https://[::ffff:127.0.0.1]/wpush/x",
    "ipv4_mapped_metadata": "https://[::ffff:169.254.169.254]/wpush/x",
    "ipv6_unique_local": "https://[fd00::1]/wpush/x",
    "unspecified": "https://0.0.0.0/wpush/x",
    "hex_integer": "https://0x7f000001/wpush/x",
    "gcp_metadata_name": "https://metadata.google.internal/computeMetadata/v1/",
    "kubernetes_api": "https://kubernetes.default.svc/api",
    "ssh_port": "https://fcm.googleapis.com:22/fcm/send/x",
}

#: IP addresses in the other spellings a resolver (inet_aton) accepts, and names inward.
OTHER_SPELLINGS = {
    "decimal_integer": "https://2130706433/x",
    "octal": "https://0177.0.0.1/x",
    "hex_dotted": "https://0x7f.0.0.1/x",
    "short_two_parts": "https://127.1/x",
    "short_three_parts": "https://127.0.1/x",
    "ipv4_mapped_hex": "https://[::ffff:7f00:1]/x",
    "ipv4_compatible": "https://[::127.0.0.1]/x",
    "ipv6_link_local": "https://[fe80::1]/x",
    "ipv6_zone": "https://[fe80::1%25eth0]/x",
    "cgnat": "https://100.64.0.1/x",
    "localhost_capitals": "https://LOCALHOST/x",
    "under_localhost": "https://push.localhost/x",
    "localhost_localdomain": "https://localhost.localdomain/x",
    "single_label": "https://redis/x",
    "mdns": "https://printer.local/x",
    "cluster_service": "https://redis.default.svc.cluster.local/x",
    "private_use_internal": "https://push.internal/x",
    "aws_metadata_name": "https://instance-data/latest/",
    "reverse_lookup_name": "https://1.0.0.127.in-addr.arpa/x",
    "userinfo": "https://user:secret@fcm.googleapis.com/fcm/send/x",
    "empty_userinfo": "https://@fcm.googleapis.com/fcm/send/x",
    "userinfo_before_internal_host": "https://fcm.googleapis.com@127.0.0.1/x",
    "push_service_on_another_port": "https://fcm.googleapis.com:8443/fcm/send/x",
}

#: Public names that are not a push service: refused by default, accepted with "*".
NOT_PUSH_SERVICES = {
    "other_public_host": "https://push.example.net/x",
    "suffix_of_the_text_only": "https://evilfcm.googleapis.com/x",
    "push_service_as_a_subdomain": "https://fcm.googleapis.com.evil.example.net/x",
    "bare_windows_domain": "https://notify.windows.com/w/?token=x",
    "other_google_api": "https://storage.googleapis.com/bucket",
    "other_apple_api": "https://api.push.apple.com/3/device/x",
}

REFUSED_ANYWAY = PROBED | OTHER_SPELLINGS


def count(engine, model=Subscription) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model))


@pytest.fixture
def subscribe(function_client, auth_env):
    return function_client("subscribe")


# --- at subscribe ---------------------------------------------------------------------------


@pytest.mark.parametrize("allowed_hosts", [None, "*"], ids=["push_services", "any_public_host"])
@pytest.mark.parametrize("endpoint", REFUSED_ANYWAY.values(), ids=REFUSED_ANYWAY.keys())
async def test_inward_endpoints_are_refused_whatever_the_allowed_hosts(
    function_client, auth_env, engine, monkeypatch, endpoint, allowed_hosts
):
    if allowed_hosts:
        monkeypatch.setenv("PUSH_WEBPUSH_ALLOWED_HOSTS", allowed_hosts)
    subscribe = function_client("subscribe")
    response = await subscribe.post("/", json=bodies.webpush(endpoint), headers=auth_env.headers("42"))
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "subscription.endpoint"
    assert count(engine) == 0


@pytest.mark.parametrize("endpoint", NOT_PUSH_SERVICES.values(), ids=NOT_PUSH_SERVICES.keys())
async def test_a_public_host_that_is_no_push_service_is_refused_by_default(subscribe, auth_env, engine, endpoint):
    response = await subscribe.post("/", json=bodies.webpush(endpoint), headers=auth_env.headers("42"))
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_field", "field": "subscription.endpoint",
        "message": "subscription.endpoint is not on a push service this service sends to",
    }
    assert count(engine) == 0


async def test_any_public_host_takes_an_explicit_star(function_client, auth_env, engine, monkeypatch):
    monkeypatch.setenv("PUSH_WEBPUSH_ALLOWED_HOSTS", "*")
    subscribe = function_client("subscribe")
    for endpoint in NOT_PUSH_SERVICES.values():
        response = await subscribe.post("/", json=bodies.webpush(endpoint), headers=auth_env.headers("42"))
        assert response.status_code == 201, endpoint
    assert count(engine) == len(NOT_PUSH_SERVICES)


async def test_allowed_hosts_widen_the_push_services_host_by_host(function_client, auth_env, engine, monkeypatch):
    monkeypatch.setenv("PUSH_WEBPUSH_ALLOWED_HOSTS", "push.example.net, *.push.example.org")
    subscribe = function_client("subscribe")
    headers = auth_env.headers("42")
    for endpoint in (
        "https://push.example.net/wpush/v2/abc",
        "https://PUSH.example.net./wpush/v2/abd",
        "https://eu.push.example.org/w/x",
        "https://fcm.googleapis.com/wp/still-a-push-service",
    ):
        assert (await subscribe.post("/", json=bodies.webpush(endpoint), headers=headers)).status_code == 201, endpoint
    for endpoint in (
        "https://a.push.example.net/x",          # an exact host admits no subdomain
        "https://push.example.org/x",            # a pattern admits no bare domain
        "https://evilpush.example.net/x",        # a suffix of the text, not of the domain
        "https://push.example.net.evil.example.net/x",
        "https://push.example.net:8443/x",
    ):
        response = await subscribe.post("/", json=bodies.webpush(endpoint), headers=headers)
        assert response.status_code == 400, endpoint
    assert count(engine) == 4


@pytest.mark.parametrize("value", [
    "10.0.0.1", "localhost", "push.internal", "*.svc", "push.example.net:8443", "https://push.example.net",
    ".notify.windows.com", "*.com",
])
def test_a_malformed_allowed_host_stops_subscribe_naming_the_setting(auth_env, database_url, monkeypatch, value):
    monkeypatch.setenv("PUSH_WEBPUSH_ALLOWED_HOSTS", value)
    with pytest.raises(ConfigError, match="PUSH_WEBPUSH_ALLOWED_HOSTS"):
        create_asgi_app(target="subscribe", source=str(REPO / "functions" / "subscribe" / "main.py"))


def test_the_push_services_are_matched_host_by_host():
    rules = EndpointRules()
    assert PUSH_SERVICES == (
        "fcm.googleapis.com", "updates.push.services.mozilla.com", "*.notify.windows.com", "web.push.apple.com",
    )
    for host in ("fcm.googleapis.com", "updates.push.services.mozilla.com", "wns2-par02p.notify.windows.com",
                 "db5p.notify.windows.com", "web.push.apple.com", "FCM.googleapis.com."):
        assert rules.refusal(host, None) is None, host
    for host in ("googleapis.com", "push.services.mozilla.com", "notify.windows.com", "push.apple.com",
                 "api.push.apple.com", "fcm.googleapis.com.example.net"):
        assert rules.refusal(host, None) is not None, host


# --- the local-development exception ------------------------------------------------------


async def test_local_receivers_are_allowed_as_exact_host_and_port_pairs(function_client, auth_env, engine, monkeypatch):
    monkeypatch.setenv("PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS", "localhost:8090, [::1]:8443")
    subscribe = function_client("subscribe")
    headers = auth_env.headers("42")
    for endpoint in ("https://localhost:8090/push/a", "https://LOCALHOST:8090/push/b", "https://[::1]:8443/push/c"):
        assert (await subscribe.post("/", json=bodies.webpush(endpoint), headers=headers)).status_code == 201, endpoint
    for endpoint in (
        "https://localhost:8091/push/x",   # another port of the same host
        "https://localhost/push/x",
        "https://127.0.0.1:8090/push/x",   # the same receiver, by another name
        "https://[::1]:8090/push/x",
        "https://user@localhost:8090/push/x",
    ):
        response = await subscribe.post("/", json=bodies.webpush(endpoint), headers=headers)
        assert response.status_code == 400, endpoint
    assert count(engine) == 3


@pytest.mark.parametrize("value", ["localhost", "localhost:", "*:8090", "localhost:*", "localhost:99999", ":8090"])
def test_local_endpoints_are_exact_pairs_or_subscribe_does_not_start(auth_env, database_url, monkeypatch, value):
    monkeypatch.setenv("PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS", value)
    with pytest.raises(ConfigError, match="PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS"):
        create_asgi_app(target="subscribe", source=str(REPO / "functions" / "subscribe" / "main.py"))


# --- at send time: stored rows ------------------------------------------------------------


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class InternalService:
    """An internal HTTPS service with a certificate the dispatcher trusts, answering every
    request with ``answer`` (by default 404: the probe's oracle, a 404 once deleted the row).
    Counts connections."""

    def __init__(self, fake: FakeWebPushService) -> None:
        self.ca = fake.ca
        self.connections = 0
        self.port = 0
        self.answer = NOT_FOUND
        self._server: asyncio.Server | None = None

    async def start(self, answer: bytes = NOT_FOUND) -> InternalService:
        self.answer = answer
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(context)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def internal_service(webpush_server) -> AsyncIterator[InternalService]:
    service = await InternalService(webpush_server).start()
    yield service
    await service.stop()


def stored_row(engine, user: str, endpoint: str) -> Subscription:
    """A row written as subscribe wrote it before the rules: straight into the store."""
    token = json.dumps({"endpoint": endpoint, "keys": bodies.webpush_keys()})
    return stores.subscribe(SubscriptionStore(engine), user, NewSubscription("webpush", token, endpoint)).subscription


def stored_inward_rows(engine, port: int) -> list[Subscription]:
    """Devices of user "victim" stored before the rules, on the internal service at ``port``
    by several names, and on the cloud's metadata service."""
    return [stored_row(engine, "victim", endpoint) for endpoint in (
        f"https://127.0.0.1:{port}/push/x",
        f"https://localhost:{port}/push/x",
        f"https://[::ffff:127.0.0.1]:{port}/push/x",
        f"https://0x7f000001:{port}/push/x",
        "https://metadata.google.internal/computeMetadata/v1/",
    )]


async def test_rows_stored_before_the_rules_are_refused_unconnected_and_kept(
    webpush_rig, function_client, engine, internal_service
):
    refused = stored_inward_rows(engine, internal_service.port)
    allowed = webpush_rig.add(engine, "victim")  # the rig's receiver: the one local endpoint allowed
    dispatch = function_client("dispatch-webpush")
    before = scrape()

    response = await dispatch.post("/", **events.notification(["victim"], id_="event-1"))

    assert response.status_code == 202
    assert internal_service.connections == 0
    assert webpush_rig.wakeups(allowed) == ["checkEchoV1"]
    assert count(engine) == len(refused) + 1  # not dead: every row kept
    with Session(engine) as session:
        outcomes = {row.subscription_id: (row.state, row.reason) for row in session.scalars(select(Delivery))}
    assert all(outcomes[row.id] == ("rejected", "endpoint_not_allowed") for row in refused)
    counted = changes(before, scrape(), "push_sends_total")
    assert counted[series("push_sends_total", provider="webpush", outcome="rejected",
                          reason="endpoint_not_allowed")] == len(refused)


# --- at send time: where the name leads -------------------------------------------------------


class Zone:
    """Stands in for DNS: each name's answers, one per lookup (the last one repeats)."""

    def __init__(self, answers: dict[str, list[list[str]]] | None = None) -> None:
        self.answers = {name: list(queue) for name, queue in (answers or {}).items()}
        self.asked: list[str] = []

    async def resolve(self, name: str, port: int) -> list[str]:
        self.asked.append(name)
        queue = self.answers.get(name.removesuffix("."))
        if not queue:
            raise OSError("NXDOMAIN")
        return queue.pop(0) if len(queue) > 1 else queue[0]


INWARD = {
    "loopback": "127.0.0.1", "private_10": "10.0.0.1", "private_172": "172.16.0.1",
    "private_192": "192.168.1.1", "metadata": "169.254.169.254", "cgnat": "100.64.0.1",
    "unspecified": "0.0.0.0", "benchmarking": "198.18.0.1", "multicast": "224.0.0.1",
    "ipv6_loopback": "::1", "unique_local": "fd00::1", "link_local": "fe80::1",
    "site_local": "fec0::1", "ipv4_mapped": "::ffff:127.0.0.1", "ipv4_compatible": "::a9fe:a9fe",
    "nat64_of_metadata": "64:ff9b::a9fe:a9fe", "local_nat64": "64:ff9b:1::a00:1",
    "sixtofour_of_loopback": "2002:7f00:1::1", "teredo": "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "ipv6_multicast": "ff02::1",
}


@pytest.mark.parametrize("address", INWARD.values(), ids=INWARD.keys())
async def test_a_push_service_name_that_resolves_inward_is_refused_without_connecting(webpush_server, address):
    zone = Zone({"fcm.googleapis.com": [[address]]})
    provider = make_provider(webpush_server, endpoint_rules=EndpointRules(resolver=zone.resolve))
    subscription = {**webpush_server.subscribe(), "endpoint": "https://fcm.googleapis.com/fcm/send/x"}

    result = await provider.send(device(subscription), wakeup())
    await provider.aclose()

    assert result == SendResult(Outcome.REJECTED, "address_not_public")
    assert zone.asked == ["fcm.googleapis.com."]  # fully qualified: no search domains


async def test_one_inward_address_among_public_ones_refuses_the_name(webpush_server):
    zone = Zone({"fcm.googleapis.com": [["142.250.185.74", "2a00:1450:4001:82b::200a", "10.0.0.7"]]})
    provider = make_provider(webpush_server, endpoint_rules=EndpointRules(resolver=zone.resolve))
    subscription = {**webpush_server.subscribe(), "endpoint": "https://fcm.googleapis.com/fcm/send/x"}

    result = await provider.send(device(subscription), wakeup())
    await provider.aclose()

    assert result == SendResult(Outcome.REJECTED, "address_not_public")


async def test_public_addresses_are_the_ones_connected_to():
    public = ["142.250.185.74", "2a00:1450:4001:82b::200a", "64:ff9b::8efa:b94a", "2002:8efa:b94a::1"]
    zone = Zone({"fcm.googleapis.com": [public]})
    assert await EndpointRules(resolver=zone.resolve).addresses("fcm.googleapis.com", 443) == public


async def test_a_name_that_does_not_resolve_is_transient(webpush_server):
    provider = make_provider(webpush_server, endpoint_rules=EndpointRules(resolver=Zone().resolve))
    subscription = {**webpush_server.subscribe(), "endpoint": "https://fcm.googleapis.com/fcm/send/x"}

    result = await provider.send(device(subscription), wakeup())
    await provider.aclose()

    assert result == SendResult(Outcome.TRANSIENT, "connection_error")


async def test_the_connection_goes_to_the_address_checked_never_to_a_second_lookup(webpush_server):
    """DNS rebinding: the first answer is checked, a later one would lead elsewhere. The
    receiver's name is known to the zone alone, so a connection made by name (a second lookup,
    by the system's resolver) could not reach it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    webpush_server.ca.issue_cert("push.rebind.test").configure_cert(context)
    received: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    zone = Zone({"push.rebind.test": [["127.0.0.1"], ["10.0.0.1"]]})
    rules = EndpointRules(local_endpoints=frozenset({("push.rebind.test", port)}), resolver=zone.resolve)
    provider = make_provider(webpush_server, endpoint_rules=rules)
    subscription = {**webpush_server.subscribe(), "endpoint": f"https://push.rebind.test:{port}/push/x"}
    try:
        result = await provider.send(device(subscription), wakeup())
    finally:
        await provider.aclose()
        server.close()
        await server.wait_closed()

    assert result == SendResult(Outcome.DELIVERED)
    assert zone.asked == ["push.rebind.test"]
    assert f"Host: push.rebind.test:{port}".encode() in received[0]  # TLS and Host keep the name


def test_embedded_ipv4_addresses_are_judged_by_the_ipv4_address_they_carry():
    assert is_public_address(ipaddress.ip_address("64:ff9b::8efa:b94a"))       # NAT64 of a public one
    assert not is_public_address(ipaddress.ip_address("64:ff9b::a00:1"))       # NAT64 of 10.0.0.1
    assert is_public_address(ipaddress.ip_address("2002:8efa:b94a::1"))        # 6to4 of a public one
    assert not is_public_address(ipaddress.ip_address("2002:a9fe:a9fe::1"))    # 6to4 of the metadata
