"""What dispatchers accept: malformed events are refused for good, Echo's own request works."""
from __future__ import annotations

import json

import pytest

from tests import events


@pytest.fixture
def dispatch(webpush_rig, function_client):
    return function_client("dispatch-webpush")


def notification_data(**fields):
    return {"users": ["alice"], "message_type": "checkEchoV1", "event_type": "edit-user-talk", **fields}


MALFORMED_DATA = {
    "users_missing": ({"message_type": "checkEchoV1"}, "users"),
    "users_empty": (notification_data(users=[]), "users"),
    "users_not_strings": (notification_data(users=[123]), "users"),
    "users_not_a_list": (notification_data(users="alice"), "users"),
    "user_id_too_long": (notification_data(users=["x" * 65]), "users"),
    "unknown_message_type": (notification_data(message_type="showMessageText"), "message_type"),
    "dry_run_not_boolean": (notification_data(dry_run="yes"), "dry_run"),
    "ttl_negative": (notification_data(ttl_seconds=-1), "ttl_seconds"),
    "ttl_not_integer": (notification_data(ttl_seconds=1.5), "ttl_seconds"),
    "ttl_too_long": (notification_data(ttl_seconds=10**9), "ttl_seconds"),
    "event_type_not_string": (notification_data(event_type=5), "event_type"),
    "user_id_lone_surrogate": (notification_data(users=["\ud800"]), "users"),
    "event_type_lone_surrogate": (notification_data(event_type="edit-\udc00"), "event_type"),
    "unknown_field": (notification_data(text="hello"), "text"),
}


@pytest.mark.parametrize("data,field", MALFORMED_DATA.values(), ids=MALFORMED_DATA.keys())
async def test_malformed_data_answers_422_naming_the_field(dispatch, data, field):
    posted = events.binary(events.cloud_event("org.wikimedia.push.notification.requested.v1", data))
    response = await dispatch.post("/", **posted)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


async def test_too_many_users_answers_422(function_client, webpush_rig, monkeypatch):
    monkeypatch.setenv("PUSH_MAX_USERS_PER_EVENT", "2")
    dispatch = function_client("dispatch-webpush")
    response = await dispatch.post("/", **events.notification(["a", "b", "c"]))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "users"


async def test_configured_message_types_are_accepted(function_client, webpush_rig, engine, monkeypatch):
    monkeypatch.setenv("PUSH_MESSAGE_TYPES", "checkEchoV1,checkRemindersV1")
    dispatch = function_client("dispatch-webpush")
    row = webpush_rig.add(engine, "alice")
    response = await dispatch.post("/", **events.notification(["alice"], message_type="checkRemindersV1"))
    assert response.status_code == 202
    assert webpush_rig.wakeups(row) == ["checkRemindersV1"]


async def test_event_without_an_id_answers_400(dispatch):
    posted = events.notification(["alice"])
    del posted["headers"]["ce-id"]
    response = await dispatch.post("/", **posted)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_a_cloudevent"


async def test_plain_json_without_cloudevent_headers_answers_400(dispatch):
    response = await dispatch.post("/", json=notification_data())
    assert response.status_code == 400


async def test_event_data_that_is_not_json_answers_400(dispatch):
    posted = events.notification(["alice"])
    posted["content"] = b"{not json"
    response = await dispatch.post("/", **posted)
    assert response.status_code == 400


def structured_body(**attributes: str) -> str:
    """A structured-mode event as JSON text, every non-ASCII character escaped (so it can hold
    a lone surrogate, which UTF-8 cannot encode), ``data`` given as JSON text."""
    data = attributes.pop("data", json.dumps(notification_data()))
    envelope = {"specversion": "1.0", "type": "org.wikimedia.push.notification.requested.v1",
                "source": "/test", "id": "e1", "datacontenttype": "application/json", **attributes}
    return json.dumps(envelope)[:-1] + f', "data": {data}}}'


STRUCTURED = {"Content-Type": "application/cloudevents+json"}


async def test_structured_event_nested_past_the_parsers_limit_answers_400(dispatch):
    """Python's JSON parser recurses once per level, and raises RecursionError past its limit."""
    response = await dispatch.post("/", content=structured_body(data="[" * 100_000 + "]" * 100_000), headers=STRUCTURED)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_a_cloudevent"


@pytest.mark.parametrize("attribute", ["source", "id", "type"])
async def test_structured_event_attribute_with_a_lone_surrogate_answers_400_naming_it(dispatch, attribute):
    """The event key hashes source and id as UTF-8, and the logs carry the id."""
    response = await dispatch.post("/", content=structured_body(**{attribute: "/\ud800"}), headers=STRUCTURED)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == attribute


async def test_connector_message_nested_past_the_parsers_limit_answers_400(function_client, webpush_rig, monkeypatch):
    """An OpenFaaS connector's body is parsed to tell a structured CloudEvent from plain data."""
    monkeypatch.setenv("PUSH_CONNECTOR_EVENT_TYPE", "org.wikimedia.push.notification.requested.v1")
    dispatch = function_client("dispatch-webpush")
    response = await dispatch.post("/", content='{"a":' * 30_000 + "0" + "}" * 30_000, headers={"X-Topic": "push"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_a_cloudevent"


async def test_event_data_that_is_not_an_object_answers_422(dispatch):
    posted = events.notification(["alice"])
    posted["content"] = b"[1, 2]"
    response = await dispatch.post("/", **posted)
    assert response.status_code == 422


async def test_other_event_type_answers_400(dispatch):
    response = await dispatch.post("/", **events.invalid_tokens("webpush", []))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_event_type"


async def test_get_answers_405(dispatch):
    assert (await dispatch.get("/")).status_code == 405


async def test_event_over_256_kib_answers_413(dispatch):
    posted = events.notification(["alice"])
    posted["content"] = b'{"users": ["' + b"a" * 300_000 + b'"]}'
    assert (await dispatch.post("/", **posted)).status_code == 413


async def test_webpush_dispatcher_has_no_echo_endpoint(dispatch):
    response = await dispatch.post("/v1/message/webpush", json={"deviceTokens": ["x"], "messageType": "checkEchoV1"})
    assert response.status_code == 400


async def test_database_unreachable_answers_503_so_the_event_is_redelivered(webpush_rig, monkeypatch):
    import httpx
    from functions_framework.aio import create_asgi_app

    from tests.conftest import REPO

    monkeypatch.setenv("PUSH_DATABASE_URL", "mysql+pymysql://root@127.0.0.1:9/test")
    app = create_asgi_app(target="dispatch_webpush", source=str(REPO / "functions/dispatch-webpush/main.py"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://f") as client:
        response = await client.post("/", **events.notification(["alice"]))
    assert response.status_code == 503
    assert "retry-after" in response.headers


# --- Echo's request -------------------------------------------------------------------------


@pytest.fixture
def echo_rig(request, tmp_path, monkeypatch):
    from tests.rigs import RIGS

    rig_class, fixture = RIGS[request.param]
    rig = rig_class(request.getfixturevalue(fixture), tmp_path)
    rig.configure(monkeypatch)
    return rig


def echo_body(rig, tokens, **fields):
    body = {"deviceTokens": tokens, "messageType": "checkEchoV1", "dryRun": False, **fields}
    if rig.provider == "apns":
        body.setdefault("topic", "org.wikimedia.wikipedia")
    return body


@pytest.mark.parametrize("echo_rig", ["fcm", "apns"], indirect=True)
async def test_echo_request_wakes_the_named_devices(echo_rig, function_client, engine):
    dispatch = function_client(echo_rig.function)
    rows = [echo_rig.add(engine, "alice"), echo_rig.add(engine, "bob")]
    response = await dispatch.post(
        f"/v1/message/{echo_rig.provider}", json=echo_body(echo_rig, [r.token for r in rows])
    )
    assert response.status_code == 200
    assert response.json() == {"delivered": 2, "invalid": 0, "rejected": 0}
    for row in rows:
        assert echo_rig.wakeups(row) == ["checkEchoV1"]


@pytest.mark.parametrize("echo_rig", ["fcm", "apns"], indirect=True)
async def test_echo_request_for_unknown_tokens_still_sends(echo_rig, function_client, engine):
    dispatch = function_client(echo_rig.function)
    new = echo_rig.new_subscription()
    response = await dispatch.post(f"/v1/message/{echo_rig.provider}", json=echo_body(echo_rig, [new.token]))
    assert response.status_code == 200
    assert response.json()["delivered"] == 1


@pytest.mark.parametrize("echo_rig", ["fcm", "apns"], indirect=True)
async def test_echo_request_counts_dead_tokens(echo_rig, function_client, engine):
    dispatch = function_client(echo_rig.function)
    row = echo_rig.add(engine, "alice")
    echo_rig.dead(row)
    response = await dispatch.post(f"/v1/message/{echo_rig.provider}", json=echo_body(echo_rig, [row.token]))
    assert response.json() == {"delivered": 0, "invalid": 1, "rejected": 0}


@pytest.mark.parametrize("echo_rig", ["fcm", "apns"], indirect=True)
async def test_echo_dry_run_reaches_no_device(echo_rig, function_client, engine):
    dispatch = function_client(echo_rig.function)
    row = echo_rig.add(engine, "alice")
    response = await dispatch.post(
        f"/v1/message/{echo_rig.provider}", json=echo_body(echo_rig, [row.token], dryRun=True)
    )
    assert response.status_code == 200
    assert echo_rig.wakeups(row) == []


@pytest.mark.parametrize("echo_rig", ["fcm", "apns"], indirect=True)
async def test_echo_request_with_transient_failure_answers_503(echo_rig, function_client, engine):
    dispatch = function_client(echo_rig.function)
    row = echo_rig.add(engine, "alice")
    echo_rig.transient_once(row)
    response = await dispatch.post(f"/v1/message/{echo_rig.provider}", json=echo_body(echo_rig, [row.token]))
    assert response.status_code == 503


@pytest.mark.parametrize("echo_rig", ["apns"], indirect=True)
async def test_echo_apns_request_without_topic_sends_with_each_devices_own_topic(
    echo_rig, function_client, engine
):
    # Echo leaves the topic out for devices it stored without one.
    dispatch = function_client("dispatch-apns")
    known = echo_rig.add(engine, "alice")
    response = await dispatch.post(
        "/v1/message/apns", json={"deviceTokens": [known.token, "ab" * 32], "messageType": "checkEchoV1"}
    )
    assert response.status_code == 200
    assert response.json() == {"delivered": 1, "invalid": 0, "rejected": 1}  # the unknown one: no topic
    assert echo_rig.wakeups(known) == ["checkEchoV1"]
    assert [r.headers["apns-topic"] for r in echo_rig.fake.requests] == [known.topic]


ECHO_MALFORMED = {
    "tokens_missing": ({"messageType": "checkEchoV1"}, "deviceTokens"),
    "tokens_not_strings": ({"deviceTokens": [1], "messageType": "checkEchoV1"}, "deviceTokens"),
    "unknown_message_type": ({"deviceTokens": ["t"], "messageType": "other"}, "messageType"),
    "dry_run_not_boolean": ({"deviceTokens": ["t"], "messageType": "checkEchoV1", "dryRun": 1}, "dryRun"),
    "token_lone_surrogate": ({"deviceTokens": ["\ud800"], "messageType": "checkEchoV1"}, "deviceTokens"),
    "topic_lone_surrogate": ({"deviceTokens": ["t"], "messageType": "checkEchoV1", "topic": "org.\udfff"}, "topic"),
}


@pytest.mark.parametrize("echo_rig", ["fcm"], indirect=True)
@pytest.mark.parametrize("body,field", ECHO_MALFORMED.values(), ids=ECHO_MALFORMED.keys())
async def test_malformed_echo_request_answers_400_naming_the_field(echo_rig, function_client, body, field):
    dispatch = function_client("dispatch-fcm")
    response = await dispatch.post("/v1/message/fcm", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field


@pytest.mark.parametrize("echo_rig", ["fcm"], indirect=True)
async def test_echo_request_nested_past_the_parsers_limit_answers_400(echo_rig, function_client):
    """Python's JSON parser recurses once per level, and raises RecursionError past its limit."""
    dispatch = function_client("dispatch-fcm")
    response = await dispatch.post(
        "/v1/message/fcm", content="[" * 30_000 + "]" * 30_000, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
