"""Access tokens: only a valid token of the wiki lets a caller in, as the user it names."""
from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.auth import Authenticator
from shared.config import ConfigError
from tests import subscription_bodies as bodies

pytestmark = pytest.mark.usefixtures("auth_env")


@pytest.fixture
def subscribe(function_client):
    return function_client("subscribe")


async def assert_refused(client, headers, code="invalid_token"):
    response = await client.post("/", json=bodies.fcm(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code
    assert response.headers["www-authenticate"].startswith("Bearer")
    listing = await client.get("/", headers=headers)
    assert listing.status_code == 401


async def test_missing_authorization_answers_401(subscribe):
    await assert_refused(subscribe, {}, code="missing_token")


async def test_non_bearer_scheme_answers_401(subscribe, issuer):
    await assert_refused(subscribe, {"Authorization": "Basic " + issuer.token("42")})


async def test_expired_token_answers_401(subscribe, issuer):
    await assert_refused(subscribe, issuer.headers("42", lifetime=-120), code="expired_token")


async def test_token_without_exp_answers_401(subscribe, issuer):
    token = jwt.encode({"sub": "42"}, issuer.key, "ES256")
    await assert_refused(subscribe, {"Authorization": f"Bearer {token}"})


async def test_token_without_sub_answers_401(subscribe, issuer):
    token = jwt.encode({"exp": int(time.time()) + 60}, issuer.key, "ES256")
    await assert_refused(subscribe, {"Authorization": f"Bearer {token}"})


async def test_token_whose_sub_is_not_text_answers_401(subscribe, issuer):
    # JSON's "\ud800" decodes to a lone surrogate: no user id, and nothing could store it.
    token = jwt.encode({"sub": "\ud800", "exp": int(time.time()) + 60}, issuer.key, "ES256")
    await assert_refused(subscribe, {"Authorization": f"Bearer {token}"})


async def test_token_signed_by_another_key_answers_401(subscribe):
    forged = jwt.encode({"sub": "42", "exp": int(time.time()) + 60}, ec.generate_private_key(ec.SECP256R1()), "ES256")
    await assert_refused(subscribe, {"Authorization": f"Bearer {forged}"})


async def test_tampered_token_answers_401(subscribe, issuer):
    header, payload, signature = issuer.token("42").split(".")
    other = issuer.token("43").split(".")[1]
    await assert_refused(subscribe, {"Authorization": f"Bearer {header}.{other}.{signature}"})


async def test_alg_none_token_answers_401(subscribe):
    unsigned = jwt.encode({"sub": "42", "exp": int(time.time()) + 60}, None, algorithm="none")
    await assert_refused(subscribe, {"Authorization": f"Bearer {unsigned}"})


async def test_hs256_token_keyed_with_the_public_key_answers_401(subscribe, issuer):
    import base64
    import hashlib
    import hmac
    import json

    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    signing_input = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': '42', 'exp': int(time.time()) + 60})}"
    mac = hmac.new(issuer.public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    await assert_refused(subscribe, {"Authorization": f"Bearer {token}"})


async def test_garbage_token_answers_401(subscribe):
    await assert_refused(subscribe, {"Authorization": "Bearer not-a-jwt"})


async def test_wrong_issuer_answers_401_when_an_issuer_is_configured(function_client, issuer, monkeypatch):
    monkeypatch.setenv("PUSH_AUTH_ISSUER", "https://meta.wikimedia.org")
    subscribe = function_client("subscribe")
    await assert_refused(subscribe, issuer.headers("42", iss="https://evil.example"))
    ok = await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42", iss="https://meta.wikimedia.org"))
    assert ok.status_code == 201


async def test_wrong_audience_answers_401_when_an_audience_is_configured(function_client, issuer, monkeypatch):
    monkeypatch.setenv("PUSH_AUTH_AUDIENCE", "push-client-id")
    subscribe = function_client("subscribe")
    await assert_refused(subscribe, issuer.headers("42", aud="other-client"))
    await assert_refused(subscribe, issuer.headers("42"))
    ok = await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42", aud="push-client-id"))
    assert ok.status_code == 201


async def test_rs256_tokens_work_with_an_rsa_key(function_client, monkeypatch):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    monkeypatch.setenv("PUSH_AUTH_PUBLIC_KEY", pem.decode())
    subscribe = function_client("subscribe")
    token = jwt.encode({"sub": "42", "exp": int(time.time()) + 60}, key, "RS256")
    response = await subscribe.post("/", json=bodies.fcm(), headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 201


def test_public_key_may_be_given_as_a_file_path(issuer, tmp_path, monkeypatch):
    path = tmp_path / "wiki.pem"
    path.write_text(issuer.public_pem)
    monkeypatch.setenv("PUSH_AUTH_PUBLIC_KEY", str(path))
    assert Authenticator.from_env().user_id(f"Bearer {issuer.token('42')}") == "42"


def test_missing_key_configuration_names_the_variable(monkeypatch):
    monkeypatch.delenv("PUSH_AUTH_PUBLIC_KEY")
    monkeypatch.setenv("PUSH_SECRETS_DIR", "/nonexistent")
    with pytest.raises(ConfigError, match="PUSH_AUTH_PUBLIC_KEY"):
        Authenticator.from_env()


def test_malformed_key_configuration_names_the_variable(monkeypatch):
    monkeypatch.setenv("PUSH_AUTH_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----")
    with pytest.raises(ConfigError, match="PUSH_AUTH_PUBLIC_KEY"):
        Authenticator.from_env()
