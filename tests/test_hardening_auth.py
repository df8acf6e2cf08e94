"""Who gets in: only an unexpired, already valid token of the wiki, for the issuer and audience
configured, signed with the wiki's key by an algorithm that key is for; whether the key is a PEM
or comes from a JWKS. And once in, a caller reaches only their own subscriptions, and cannot
tell another user's device from one nobody has. Also the Web Push host allow-list."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Subscription
from tests import subscription_bodies as bodies

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
).decode()
KID = "wiki-2024"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**extra) -> dict:
    now = int(time.time())
    return {"sub": "42", "iat": now, "exp": now + 300, **extra}


def rs256(key=RSA_KEY, kid: str | None = KID, **extra) -> str:
    return jwt.encode(claims(**extra), key, "RS256", headers={"kid": kid} if kid else None)


def hs256_keyed_with(secret: bytes, kid: str | None = KID) -> str:
    """HS256 "signed" with the public key's PEM: the classic algorithm-confusion forgery."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def unsigned(kid: str | None = KID) -> str:
    header = {"alg": "none", "typ": "JWT", **({"kid": kid} if kid else {})}
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}."


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def refused(client, token: str, code: str = "invalid_token") -> None:
    response = await client.post("/", json=bodies.fcm(), headers=bearer(token))
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == code
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


class Jwks:
    """The wiki's JWKS endpoint, on a local HTTP server."""

    def __init__(self) -> None:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
        self.document = {"keys": [{**jwk, "kid": KID, "alg": "RS256", "use": "sig"}]}
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.fetches += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/w/rest.php/oauth2/jwks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks(monkeypatch):
    server = Jwks()
    monkeypatch.delenv("PUSH_AUTH_PUBLIC_KEY", raising=False)
    monkeypatch.setenv("PUSH_SECRETS_DIR", "/nonexistent")
    monkeypatch.setenv("PUSH_AUTH_JWKS_URL", server.url)
    yield server
    server.stop()


@pytest.fixture
def rsa_pem(monkeypatch):
    monkeypatch.setenv("PUSH_AUTH_PUBLIC_KEY", RSA_PEM)


# --- tokens -------------------------------------------------------------------------------


async def test_jwks_configuration_accepts_the_wikis_rs256_tokens_by_kid(jwks, function_client):
    subscribe = function_client("subscribe")
    response = await subscribe.post("/", json=bodies.fcm(), headers=bearer(rs256()))
    assert response.status_code == 201
    assert jwks.fetches >= 1


async def test_jwks_configuration_refuses_forgeries(jwks, function_client):
    subscribe = function_client("subscribe")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await refused(subscribe, rs256(key=other))                   # another key, the wiki's kid
    await refused(subscribe, rs256(kid="not-a-wiki-key"))        # a kid the JWKS lacks
    await refused(subscribe, rs256(kid=None))                    # no kid at all
    await refused(subscribe, hs256_keyed_with(RSA_PEM.encode())) # HS256 keyed with the public PEM
    await refused(subscribe, unsigned())                         # alg none
    await refused(subscribe, rs256(exp=int(time.time()) - 120), code="expired_token")
    await refused(subscribe, rs256(nbf=int(time.time()) + 600))


async def test_jwks_configuration_checks_issuer_and_audience(jwks, function_client, monkeypatch):
    monkeypatch.setenv("PUSH_AUTH_ISSUER", "https://meta.wikimedia.org")
    monkeypatch.setenv("PUSH_AUTH_AUDIENCE", "push-app")
    subscribe = function_client("subscribe")
    await refused(subscribe, rs256(iss="https://evil.example", aud="push-app"))
    await refused(subscribe, rs256(iss="https://meta.wikimedia.org", aud="other-app"))
    await refused(subscribe, rs256(aud="push-app"))  # no iss
    ok = await subscribe.post(
        "/", json=bodies.fcm(), headers=bearer(rs256(iss="https://meta.wikimedia.org", aud=["x", "push-app"]))
    )
    assert ok.status_code == 201


async def test_unreachable_jwks_answers_503_not_401(function_client, monkeypatch):
    monkeypatch.delenv("PUSH_AUTH_PUBLIC_KEY", raising=False)
    monkeypatch.setenv("PUSH_AUTH_JWKS_URL", "http://127.0.0.1:9/jwks")
    subscribe = function_client("subscribe")
    response = await subscribe.post("/", json=bodies.fcm(), headers=bearer(rs256()))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "auth_unavailable"
    assert response.headers["retry-after"]


async def test_rsa_pem_configuration_refuses_hs256_keyed_with_the_pem(rsa_pem, function_client):
    subscribe = function_client("subscribe")
    for secret in (RSA_PEM.encode(), RSA_PEM.strip().encode()):
        await refused(subscribe, hs256_keyed_with(secret, kid=None))
    der = RSA_KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    await refused(subscribe, hs256_keyed_with(der, kid=None))
    await refused(subscribe, unsigned(kid=None))
    # ES256 signed by some EC key is not RS256: refused, while the wiki's own token works.
    await refused(subscribe, jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), "ES256"))
    assert (await subscribe.post("/", json=bodies.fcm(), headers=bearer(rs256(kid=None)))).status_code == 201


async def test_not_yet_valid_token_is_refused_beyond_the_leeway(function_client, auth_env):
    subscribe = function_client("subscribe")
    now = int(time.time())
    await refused(subscribe, auth_env.token("42", nbf=now + 600))
    await refused(subscribe, auth_env.token("42", iat=now + 600))  # issued in the future
    inside = await subscribe.post("/", json=bodies.fcm(), headers=auth_env.headers("42", nbf=now + 10))
    assert inside.status_code == 201  # within PUSH_AUTH_LEEWAY_SECONDS (30): clock skew


async def test_expired_token_is_refused_beyond_the_leeway(function_client, auth_env):
    subscribe = function_client("subscribe")
    await refused(subscribe, auth_env.token("42", lifetime=-31), code="expired_token")
    assert (await subscribe.post("/", json=bodies.fcm(), headers=auth_env.headers("42", lifetime=-5))).status_code == 201


async def test_tokens_naming_no_usable_user_are_refused(function_client, auth_env):
    subscribe = function_client("subscribe")
    for sub in ("", "x" * 65, 42, ["42"]):
        token = jwt.encode({**claims(), "sub": sub}, auth_env.key, "ES256")
        await refused(subscribe, token)


# --- one user and another ---------------------------------------------------------------------


def without_request_id(response) -> tuple:
    headers = {k: v for k, v in response.headers.items() if k not in ("x-request-id", "date")}
    return response.status_code, headers, response.content


async def test_a_user_cannot_see_or_delete_another_users_devices(function_client, auth_env, engine):
    subscribe, unsubscribe = function_client("subscribe"), function_client("unsubscribe")
    alice = auth_env.headers("alice")
    mallory = auth_env.headers("mallory")
    devices = [bodies.fcm(), bodies.apns(), bodies.webpush()]
    for body in devices:
        assert (await subscribe.post("/", json=body, headers=alice)).status_code == 201
    assert (await subscribe.get("/", headers=mallory)).json() == {"subscriptions": []}

    def named(body):
        if body["provider"] == "webpush":
            return {"provider": "webpush", "endpoint": body["subscription"]["endpoint"]}
        return {"provider": body["provider"], "token": body["token"]}

    theirs = [named(body) for body in devices]
    nobodys = [named(body) for body in (bodies.fcm(), bodies.apns(), bodies.webpush())]
    for held, free in zip(theirs, nobodys):
        for method in ("POST", "DELETE"):
            a = await unsubscribe.request(method, "/", json=held, headers=mallory)
            b = await unsubscribe.request(method, "/", json=free, headers=mallory)
            assert a.status_code == 404
            assert without_request_id(a) == without_request_id(b)
    a = await unsubscribe.post("/", json={"all": True}, headers=mallory)
    assert a.status_code == 404
    with Session(engine) as session:
        owners = select(Subscription.user_id).where(Subscription.user_id.in_(["alice", "mallory"]))
        assert sorted(session.scalars(owners)) == ["alice"] * 3
    assert len((await subscribe.get("/", headers=alice)).json()["subscriptions"]) == 3


async def test_subscribing_another_users_device_looks_like_a_new_device(function_client, auth_env, engine):
    """A device belongs to whoever registers it last (README): the caller gets the same answer as
    for a device nobody had, and the previous holder no longer sees it."""
    subscribe = function_client("subscribe")
    body = bodies.fcm()
    await subscribe.post("/", json=body, headers=auth_env.headers("alice"))
    moved = await subscribe.post("/", json=body, headers=auth_env.headers("mallory"))
    fresh = await subscribe.post("/", json=bodies.fcm(), headers=auth_env.headers("mallory"))
    assert moved.status_code == fresh.status_code == 201
    for view in (moved.json(), fresh.json()):
        assert set(view) == {"id", "provider", "token_sha256", "created", "updated"}
        assert view["created"] == view["updated"]
    assert (await subscribe.get("/", headers=auth_env.headers("alice"))).json() == {"subscriptions": []}
