"""Several apps in one deployment: each subscription goes out with its own app's credentials."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from fakes.apns import FakeApns
from fakes.fcm import FakeFcm
from shared.apps import load_apps
from shared.providers.router import providers_from_env
from shared.config import ConfigError
from shared.models import Subscription
from shared.providers.apns import ApnsProvider
from shared.providers.fcm import FcmProvider
from shared.vapid import generate_vapid_keys
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import events
from tests import subscription_bodies as bodies
from tests.stores import subscribe


@pytest.fixture
def second_fcm():
    with FakeFcm(project_id="commons-project") as fake:
        yield fake


@pytest.fixture
def two_fcm_apps(fcm_server, second_fcm, tmp_path, monkeypatch):
    apps = {}
    for name, fake in (("wikipedia", fcm_server), ("commons", second_fcm)):
        credentials = fake.write_service_account(tmp_path / f"{name}.json")
        apps[name] = {"fcm": {"credentials": str(credentials), "endpoint": fake.endpoint, "ca_file": fake.ca_path}}
    monkeypatch.setenv("PUSH_APPS", json.dumps(apps))
    monkeypatch.delenv("PUSH_FCM_CREDENTIALS", raising=False)
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path / "no-secrets"))
    return {"wikipedia": fcm_server, "commons": second_fcm}


def add_fcm(engine, user: str, app: str | None) -> str:
    token = bodies.fcm_token()
    subscribe(SubscriptionStore(engine), user, NewSubscription("fcm", token, token, app=app))
    return token


async def test_each_device_is_sent_through_its_apps_project(two_fcm_apps, function_client, engine):
    dispatch = function_client("dispatch-fcm")
    wikipedia = add_fcm(engine, "alice", "wikipedia")
    commons = add_fcm(engine, "alice", "commons")
    assert (await dispatch.post("/", **events.notification(["alice"]))).status_code == 202
    assert [m.token for m in two_fcm_apps["wikipedia"].messages] == [wikipedia]
    assert [m.token for m in two_fcm_apps["commons"].messages] == [commons]


async def test_device_of_an_app_no_longer_configured_is_rejected_not_retried(two_fcm_apps, function_client, engine):
    dispatch = function_client("dispatch-fcm")
    add_fcm(engine, "alice", "retired-app")
    event = events.notification(["alice"], id_="e1")
    assert (await dispatch.post("/", **event)).status_code == 202
    assert two_fcm_apps["wikipedia"].messages == [] and two_fcm_apps["commons"].messages == []


async def test_default_app_serves_subscriptions_naming_none(fcm_server, second_fcm, tmp_path, monkeypatch, function_client, engine):
    from tests.rigs import FcmRig

    FcmRig(fcm_server, tmp_path).configure(monkeypatch)  # the default app: PUSH_FCM_*
    credentials = second_fcm.write_service_account(tmp_path / "commons.json")
    monkeypatch.setenv("PUSH_APPS", json.dumps({"commons": {"fcm": {
        "credentials": str(credentials), "endpoint": second_fcm.endpoint, "ca_file": second_fcm.ca_path}}}))
    dispatch = function_client("dispatch-fcm")
    default, commons = add_fcm(engine, "alice", None), add_fcm(engine, "alice", "commons")
    await dispatch.post("/", **events.notification(["alice"]))
    assert [m.token for m in fcm_server.messages] == [default]
    assert [m.token for m in second_fcm.messages] == [commons]


def test_a_mistake_in_the_default_app_stops_start_up_beside_push_apps(two_fcm_apps, monkeypatch):
    """Devices naming no app would otherwise all be refused as ``unknown_app``, silently."""
    monkeypatch.setenv("PUSH_FCM_CREDENTIALS", "{}")
    with pytest.raises(ConfigError, match="PUSH_FCM_CREDENTIALS"):
        providers_from_env(FcmProvider)


def test_a_partly_configured_default_app_stops_start_up_naming_what_is_missing(
    apns_apps, monkeypatch, tmp_path
):
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path / "no-secrets"))
    monkeypatch.setenv("PUSH_APNS_KEY_ID", "ABC123DEFG")
    with pytest.raises(ConfigError, match="PUSH_APNS_KEY is not set"):
        providers_from_env(ApnsProvider)


@pytest.fixture
def second_apns():
    with FakeApns(key_id="COMMONSKEY", team_id="COMMONSTEA") as fake:
        yield fake


def apns_app(fake: FakeApns, topic: str) -> dict:
    return {"key": fake.key_pem, "key_id": fake.key_id, "team_id": fake.team_id, "topics": [topic],
            "production_url": fake.base_url, "sandbox_url": fake.base_url, "ca_file": fake.ca_path}


async def test_each_apns_device_is_sent_with_its_apps_key_and_team(
    apns_server, second_apns, tmp_path, monkeypatch, function_client, engine
):
    """Each fake accepts only its own key and team: a 200 from each proves which signed."""
    monkeypatch.setenv("PUSH_APPS", json.dumps({
        "wikipedia": {"apns": apns_app(apns_server, "org.wikimedia.wikipedia")},
        "commons": {"apns": apns_app(second_apns, "org.wikimedia.commons")},
    }))
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path / "no-secrets"))
    store = SubscriptionStore(engine)
    wikipedia, commons = bodies.apns_token(), bodies.apns_token()
    for token, app in ((wikipedia, "wikipedia"), (commons, "commons")):
        subscribe(store, "alice", NewSubscription("apns", token, token, f"org.wikimedia.{app}", "production", app))
    dispatch = function_client("dispatch-apns")
    assert (await dispatch.post("/", **events.notification(["alice"]))).status_code == 202
    assert [(r.token, r.headers["apns-topic"], r.status) for r in apns_server.requests] == [
        (wikipedia, "org.wikimedia.wikipedia", 200)]
    assert [(r.token, r.headers["apns-topic"], r.status) for r in second_apns.requests] == [
        (commons, "org.wikimedia.commons", 200)]


async def test_each_web_push_device_is_sent_with_its_apps_vapid_key(
    webpush_server, tmp_path, monkeypatch, function_client, engine
):
    """A push service refuses a push signed with another key than the one the browser
    subscribed with (403), as the fake does."""
    keys = {"wikipedia": generate_vapid_keys(), "commons": generate_vapid_keys()}
    monkeypatch.setenv("PUSH_APPS", json.dumps({
        app: {"webpush": {"vapid_private_key": key.private_key, "vapid_subject": "mailto:push@example.org",
                          "ca_file": webpush_server.ca_file}}
        for app, key in keys.items()
    }))
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path / "no-secrets"))
    monkeypatch.setenv("PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS", f"localhost:{webpush_server.port}")
    store = SubscriptionStore(engine)
    browsers = {app: webpush_server.subscribe(key.public_key) for app, key in keys.items()}
    for app, browser in browsers.items():
        subscribe(store, "alice", NewSubscription("webpush", json.dumps(browser), browser["endpoint"], app=app))
    dispatch = function_client("dispatch-webpush")
    assert (await dispatch.post("/", **events.notification(["alice"]))).status_code == 202
    for app, browser in browsers.items():
        assert [(p.status, p.vapid_key) for p in webpush_server.pushes_to(browser)] == [(201, keys[app].public_key)]


@pytest.fixture
def apns_apps(monkeypatch, auth_env):
    from fakes.apns import make_p8_key

    apps = {
        "wikipedia": {"apns": {"key": make_p8_key(), "key_id": "KEY1", "team_id": "TEAM1",
                               "topics": ["org.wikimedia.wikipedia"]}},
        "commons": {"apns": {"key": make_p8_key(), "key_id": "KEY2", "team_id": "TEAM2",
                             "topics": ["org.wikimedia.commons"]},
                    "fcm": {"credentials": "{}"}},
    }
    monkeypatch.setenv("PUSH_APPS", json.dumps(apps))
    return apps


async def test_apns_topic_names_the_app_of_a_subscription(apns_apps, function_client, issuer, engine):
    subscribe = function_client("subscribe")
    response = await subscribe.post("/", json=bodies.apns(topic="org.wikimedia.commons"), headers=issuer.headers("42"))
    assert response.status_code == 201
    assert response.json()["app"] == "commons"
    with Session(engine) as session:
        assert session.scalars(select(Subscription.app)).all() == ["commons"]


async def test_subscribe_naming_an_unknown_app_answers_400(apns_apps, function_client, issuer):
    subscribe = function_client("subscribe")
    response = await subscribe.post("/", json={**bodies.fcm(), "app": "wikipedia"}, headers=issuer.headers("42"))
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "app"


async def test_subscribe_naming_an_app_whose_topics_differ_answers_400(apns_apps, function_client, issuer):
    subscribe = function_client("subscribe")
    body = {**bodies.apns(topic="org.wikimedia.wikipedia"), "app": "commons"}
    response = await subscribe.post("/", json=body, headers=issuer.headers("42"))
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "topic"


async def test_subscribe_naming_a_known_app_stores_it(apns_apps, function_client, issuer, engine):
    subscribe = function_client("subscribe")
    response = await subscribe.post("/", json={**bodies.fcm(), "app": "commons"}, headers=issuer.headers("42"))
    assert response.status_code == 201
    with Session(engine) as session:
        assert session.scalars(select(Subscription.app)).all() == ["commons"]


BAD_APPS = {
    "not_json": ("{", "PUSH_APPS"),
    "not_an_object": ("[]", "PUSH_APPS"),
    "bad_app_name": ('{"Wiki Pedia": {"fcm": {}}}', "PUSH_APPS.Wiki Pedia"),
    "unknown_provider": ('{"w": {"gcm": {}}}', "PUSH_APPS.w.gcm"),
    "apns_without_topics": ('{"w": {"apns": {"key": "k", "key_id": "i", "team_id": "t"}}}', "PUSH_APPS.w.apns.topics"),
    "unknown_setting": ('{"w": {"fcm": {"credentials": "{}", "kye": 1}}}', "PUSH_APPS.w.fcm.kye"),
    "bad_credentials": ('{"w": {"fcm": {"credentials": "{}"}}}', "PUSH_APPS.w.fcm"),
}


@pytest.mark.parametrize("raw,names", BAD_APPS.values(), ids=BAD_APPS.keys())
def test_bad_apps_configuration_names_the_key_at_start_up(raw, names, monkeypatch):
    monkeypatch.setenv("PUSH_APPS", raw)
    with pytest.raises(ConfigError) as error:
        load_apps()
        providers_from_env(FcmProvider)
    assert names in str(error.value)


def test_secrets_in_the_apps_file_may_be_file_paths(tmp_path, monkeypatch):
    key = tmp_path / "vapid"
    key.write_text("secret-key-text\n")
    monkeypatch.setenv("PUSH_APPS", json.dumps({"w": {"webpush": {"vapid_private_key": str(key)}}}))
    assert load_apps().settings["w"]["webpush"]["vapid_private_key"] == "secret-key-text"
