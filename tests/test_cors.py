"""CORS on subscribe and unsubscribe (PUSH_CORS_ALLOWED_ORIGINS): preflights answered for the
listed origins only, and every answer, errors included, readable by a listed origin's page.
What a real browser makes of these answers is tests/test_web_client.py's part."""
from __future__ import annotations

import json

import pytest

from shared.config import ConfigError
from shared.cors import MAX_AGE_SECONDS, allowed_origins_from_env, canonical_origin
from tests import subscription_bodies as bodies

WIKI = "https://en.wikipedia.org"
OTHER_WIKI = "https://de.wikipedia.org"
ELSEWHERE = "https://attacker.example"


@pytest.fixture
def cors(monkeypatch, auth_env) -> None:
    monkeypatch.setenv("PUSH_CORS_ALLOWED_ORIGINS", f"{WIKI}, {OTHER_WIKI}")


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type"}


def assert_readable_by(response, origin: str) -> None:
    assert response.headers["access-control-allow-origin"] == origin
    assert "Origin" in response.headers["vary"]
    exposed = {name.strip() for name in response.headers["access-control-expose-headers"].split(",")}
    assert {"Retry-After", "WWW-Authenticate", "X-Request-Id"} <= exposed


@pytest.mark.usefixtures("cors")
async def test_a_listed_origins_preflight_is_allowed_the_token_and_json(function_client, engine):
    response = await function_client("subscribe").options("/", headers=preflight(WIKI))
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == WIKI
    assert response.headers["access-control-allow-methods"] == "GET, POST"
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert response.headers["access-control-max-age"] == str(MAX_AGE_SECONDS)
    assert response.headers["vary"] == "Origin"
    assert "access-control-allow-credentials" not in response.headers  # the token is no cookie


@pytest.mark.usefixtures("cors")
async def test_unsubscribes_preflight_allows_its_own_methods(function_client):
    response = await function_client("unsubscribe").options("/", headers=preflight(OTHER_WIKI, "DELETE"))
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == OTHER_WIKI
    assert response.headers["access-control-allow-methods"] == "POST, DELETE"


@pytest.mark.usefixtures("cors")
async def test_an_origin_not_listed_is_refused_its_preflight_without_cors_headers(function_client):
    response = await function_client("subscribe").options("/", headers=preflight(ELSEWHERE))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert not [name for name in response.headers if name.startswith("access-control-")]
    assert response.headers["vary"] == "Origin"


@pytest.mark.usefixtures("cors")
async def test_an_origin_not_listed_gets_its_answer_without_cors_headers(function_client, issuer):
    """The function still answers (a server cannot tell a browser from curl); the browser is
    what withholds the answer from the page."""
    response = await function_client("subscribe").get("/", headers={"Origin": ELSEWHERE, **issuer.headers("alice")})
    assert response.status_code == 200
    assert not [name for name in response.headers if name.startswith("access-control-")]
    assert response.headers["vary"] == "Origin"


@pytest.mark.usefixtures("cors")
async def test_a_listed_origin_reads_a_success(function_client, issuer):
    subscribe = function_client("subscribe")
    response = await subscribe.post("/", json=bodies.webpush(), headers={"Origin": WIKI, **issuer.headers("alice")})
    assert response.status_code == 201
    assert_readable_by(response, WIKI)


@pytest.mark.usefixtures("cors")
@pytest.mark.parametrize("status, request_kwargs", [
    (401, {}),
    (400, {"json": {"provider": "webpush"}, "auth": True}),
    (413, {"content": b"{" + b" " * 20_000 + b"}", "auth": True}),
    (415, {"content": b"{}", "headers": {"Content-Type": "text/plain"}, "auth": True}),
    (431, {"headers": {f"X-Padding-{i}": "x" for i in range(120)}, "auth": True}),
], ids=["401", "400", "413", "415", "431"])
async def test_a_listed_origin_reads_a_refusal(function_client, issuer, status, request_kwargs):
    kwargs = dict(request_kwargs)
    headers = {"Origin": WIKI, **kwargs.pop("headers", {})}
    if kwargs.pop("auth", False):
        headers.update(issuer.headers("alice"))
    if "content" in kwargs and "Content-Type" not in headers:
        headers["Content-Type"] = "application/json"
    response = await function_client("subscribe").post("/", headers=headers, **kwargs)
    assert response.status_code == status
    assert "error" in response.json()
    assert_readable_by(response, WIKI)


@pytest.mark.usefixtures("cors")
async def test_a_listed_origin_reads_when_to_retry_a_rate_limited_subscribe(function_client, issuer, monkeypatch):
    monkeypatch.setenv("PUSH_SUBSCRIBE_RATE_LIMIT", "1/minute")
    subscribe = function_client("subscribe")
    headers = {"Origin": WIKI, **issuer.headers("alice")}
    assert (await subscribe.post("/", json=bodies.webpush(), headers=headers)).status_code == 201
    response = await subscribe.post("/", json=bodies.webpush(), headers=headers)
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert_readable_by(response, WIKI)


@pytest.mark.usefixtures("cors")
async def test_a_listed_origin_reads_that_the_database_is_down(function_client, issuer, monkeypatch, tmp_path):
    monkeypatch.setenv("PUSH_DATABASE_URL", f"sqlite:///{tmp_path / 'missing' / 'push.sqlite3'}")
    response = await function_client("unsubscribe").post(
        "/", json={"all": True}, headers={"Origin": WIKI, **issuer.headers("alice")}
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "database_unavailable"
    assert_readable_by(response, WIKI)


async def test_without_the_setting_no_page_may_call(function_client, auth_env, issuer):
    subscribe = function_client("subscribe")
    response = await subscribe.options("/", headers=preflight(WIKI))
    assert response.status_code == 405
    answer = await subscribe.get("/", headers={"Origin": WIKI, **issuer.headers("alice")})
    assert answer.status_code == 200
    assert not [name for name in answer.headers if name.startswith("access-control-")]
    assert "vary" not in answer.headers


@pytest.mark.usefixtures("cors")
async def test_dispatchers_answer_no_cors_even_with_the_setting(function_client, webpush_rig):
    """Only subscribe and unsubscribe face browsers; the dispatchers build no policy."""
    dispatch = function_client("dispatch-webpush")
    for response in (
        await dispatch.options("/", headers=preflight(WIKI)),
        await dispatch.post("/", headers={"Origin": WIKI, "Content-Type": "application/json"}, content=json.dumps({})),
    ):
        assert response.status_code >= 400
        assert not [name for name in response.headers if name.startswith("access-control-")]
        assert "vary" not in response.headers


@pytest.mark.parametrize("value", ["*", "https://*.wikipedia.org", f"{WIKI}, *"])
def test_a_wildcard_stops_start_up_naming_the_setting(monkeypatch, value):
    monkeypatch.setenv("PUSH_CORS_ALLOWED_ORIGINS", value)
    with pytest.raises(ConfigError, match="PUSH_CORS_ALLOWED_ORIGINS must list exact origins"):
        allowed_origins_from_env()


@pytest.mark.parametrize("value", [
    "en.wikipedia.org", "https://en.wikipedia.org/", "https://en.wikipedia.org/w/api.php",
    "ftp://en.wikipedia.org", "https://user@en.wikipedia.org", "https://en.wikipedia.org:99999", "null",
    "https://bücher.example",
])
def test_what_is_not_an_origin_stops_start_up_naming_the_setting(value):
    with pytest.raises(ConfigError, match="PUSH_CORS_ALLOWED_ORIGINS"):
        canonical_origin(value)


@pytest.mark.parametrize("value, origin", [
    ("https://EN.Wikipedia.org", "https://en.wikipedia.org"),
    ("https://en.wikipedia.org:443", "https://en.wikipedia.org"),
    ("http://127.0.0.1:8093", "http://127.0.0.1:8093"),
    ("http://[::1]:8093", "http://[::1]:8093"),
])
def test_origins_are_compared_as_browsers_send_them(value, origin):
    assert canonical_origin(value) == origin
