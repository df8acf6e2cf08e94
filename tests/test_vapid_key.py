"""VAPID public key discovery: ``GET /vapid-public-key[?app=NAME]`` on subscribe, the
``applicationServerKey`` a web page subscribes with. Public, cacheable, per app."""
from __future__ import annotations

import json

import pytest

from shared.config import ConfigError
from shared.providers.webpush import WebPushProvider
from shared.subscription_api import SubscriptionApi
from shared.vapid import generate_vapid_keys

DEFAULT = generate_vapid_keys()
WIKIPEDIA = generate_vapid_keys()
COMMONS = generate_vapid_keys()
PATH = "/vapid-public-key"


@pytest.fixture(autouse=True)
def no_mounted_secrets(monkeypatch, tmp_path, auth_env):
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path / "no-secrets"))


@pytest.fixture
def apps(monkeypatch):
    """wikipedia publishes its key as given; commons' is derived from its private key; ios has
    no Web Push at all."""
    monkeypatch.setenv("PUSH_APPS", json.dumps({
        "wikipedia": {"webpush": {"vapid_public_key": WIKIPEDIA.public_key,
                                  "vapid_private_key": "/var/openfaas/secrets/wikipedia-vapid",
                                  "vapid_subject": "mailto:push@example.org"}},
        "commons": {"webpush": {"vapid_private_key": COMMONS.private_key, "vapid_subject": "mailto:push@example.org"}},
        "ios": {"fcm": {"credentials": "{}"}},
    }))


async def test_the_default_apps_key_is_served_without_a_token(function_client, monkeypatch):
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", DEFAULT.public_key)
    response = await function_client("subscribe").get(PATH)
    assert response.status_code == 200
    assert response.json() == {"app": None, "public_key": DEFAULT.public_key}


async def test_the_key_is_cacheable_and_revalidated_by_its_etag(function_client, monkeypatch):
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", DEFAULT.public_key)
    subscribe = function_client("subscribe")
    first = await subscribe.get(PATH)
    assert first.headers["cache-control"] == "public, max-age=3600"
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = await subscribe.get(PATH, headers={"If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    assert (await subscribe.get(PATH, headers={"If-None-Match": f'W/{etag}'})).status_code == 304
    assert (await subscribe.get(PATH, headers={"If-None-Match": '"another"'})).status_code == 200


async def test_another_key_has_another_etag(function_client, monkeypatch):
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", DEFAULT.public_key)
    before = (await function_client("subscribe").get(PATH)).headers["etag"]
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", WIKIPEDIA.public_key)
    assert (await function_client("subscribe").get(PATH)).headers["etag"] != before


async def test_the_key_is_derived_from_the_private_key_where_subscribe_has_it(function_client, monkeypatch):
    monkeypatch.setenv("PUSH_VAPID_PRIVATE_KEY", DEFAULT.private_key)
    response = await function_client("subscribe").get(PATH)
    assert response.json()["public_key"] == DEFAULT.public_key  # what `pushctl vapid-keygen` printed


@pytest.mark.usefixtures("apps")
@pytest.mark.parametrize("app, key", [("wikipedia", WIKIPEDIA), ("commons", COMMONS)])
async def test_each_app_has_its_own_key(function_client, app, key):
    response = await function_client("subscribe").get(PATH, params={"app": app})
    assert response.status_code == 200
    assert response.json() == {"app": app, "public_key": key.public_key}


@pytest.mark.usefixtures("apps")
@pytest.mark.parametrize("app", ["ios", "unknown"])
async def test_an_app_without_web_push_has_no_key(function_client, app):
    response = await function_client("subscribe").get(PATH, params={"app": app})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_vapid_key"


@pytest.mark.usefixtures("apps")
async def test_without_a_default_app_the_page_is_told_to_name_one(function_client):
    response = await function_client("subscribe").get(PATH)
    assert response.status_code == 404
    assert "?app=" in response.json()["error"]["message"]


@pytest.mark.parametrize("query", ["app=Not%20An%20App", "app=a&app=b"])
async def test_a_malformed_app_is_refused(function_client, monkeypatch, query):
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", DEFAULT.public_key)
    response = await function_client("subscribe").get(f"{PATH}?{query}")
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "app"


async def test_only_get_is_served(function_client, monkeypatch):
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", DEFAULT.public_key)
    response = await function_client("subscribe").post(PATH, json={})
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"


async def test_the_key_is_served_while_the_database_is_down(function_client, monkeypatch, tmp_path):
    """It needs no database: a page can always learn it."""
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", DEFAULT.public_key)
    monkeypatch.setenv("PUSH_DATABASE_URL", f"sqlite:///{tmp_path / 'missing' / 'push.sqlite3'}")
    subscribe = function_client("subscribe")
    assert (await subscribe.get(PATH)).status_code == 200
    assert (await subscribe.get("/readyz")).status_code == 503


async def test_a_listed_origin_reads_the_key(function_client, monkeypatch):
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", DEFAULT.public_key)
    monkeypatch.setenv("PUSH_CORS_ALLOWED_ORIGINS", "https://en.wikipedia.org")
    response = await function_client("subscribe").get(PATH, headers={"Origin": "https://en.wikipedia.org"})
    assert response.headers["access-control-allow-origin"] == "https://en.wikipedia.org"
    assert "ETag" in response.headers["access-control-expose-headers"]


def test_a_public_key_that_is_not_the_private_keys_stops_subscribe(monkeypatch, database_url):
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", WIKIPEDIA.public_key)
    monkeypatch.setenv("PUSH_VAPID_PRIVATE_KEY", DEFAULT.private_key)
    with pytest.raises(ConfigError, match="PUSH_VAPID_PUBLIC_KEY is not the public key of PUSH_VAPID_PRIVATE_KEY"):
        SubscriptionApi.from_env()


def test_a_public_key_that_is_not_the_private_keys_stops_the_dispatcher():
    """Where the private key lives, the published key is checked against it: pages would
    otherwise subscribe with a key no push is signed with, and every push be refused."""
    with pytest.raises(ConfigError, match="PUSH_VAPID_PUBLIC_KEY is not the public key"):
        WebPushProvider(
            vapid_private_key=DEFAULT.private_key, vapid_subject="mailto:push@example.org",
            vapid_public_key=WIKIPEDIA.public_key,
        )


@pytest.mark.parametrize(  # ids: the key is made at import, and pytest-xdist's workers must agree
    "value", ["not base64!", DEFAULT.private_key, "BAAA"], ids=["not-base64", "a-private-key", "too-short"]
)
def test_a_malformed_public_key_stops_subscribe_naming_it(monkeypatch, database_url, value):
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", value)
    with pytest.raises(ConfigError, match="PUSH_VAPID_PUBLIC_KEY"):
        SubscriptionApi.from_env()


def test_an_apps_malformed_public_key_names_its_key(monkeypatch, database_url):
    monkeypatch.setenv("PUSH_APPS", json.dumps({"commons": {"webpush": {"vapid_public_key": "BAAA"}}}))
    with pytest.raises(ConfigError, match=r"PUSH_APPS\.commons\.webpush\.vapid_public_key"):
        SubscriptionApi.from_env()
