"""Property tests: whatever reaches a dispatcher (headers, body bytes, JSON of any shape, a
CloudEvent in either mode with any attributes, Echo's request with any fields) is answered with a
status the broker and Echo understand, never a 500 and never an unhandled exception."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.events import NOTIFICATION_REQUESTED, PING, SUBSCRIPTION_INVALID
from tests.hardening import error_log, running
from tests.rigs import FcmRig

# 200 (dead-token reply), 202, refusals (400, 405, 413, 415, 422, 431), retryable (429, 503).
ANSWERS = {200, 202, 400, 405, 413, 415, 422, 429, 431, 503}
ECHO_ANSWERS = {200, 400, 405, 413, 415, 429, 431, 503}
EXAMPLES = 120
USERS = ["alice", "bob"]

SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

# --- strategies ---------------------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
header_values = st.binary(max_size=60).map(
    lambda raw: bytes(b for b in raw if b >= 0x20 and b != 0x7F)
)
header_names = st.from_regex(r"\A(ce-)?[a-z][a-z0-9-]{0,20}\Z")
content_types = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "text/plain", "application/cloudevents+json",
    "application/cloudevents+json; charset=utf-8", "application/cloudevents-batch+json", "",
    "application/octet-stream", "application/xml",
]) | st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
event_types = st.sampled_from([NOTIFICATION_REQUESTED, PING, SUBSCRIPTION_INVALID]) | st.text(max_size=30)
users = st.lists(st.sampled_from(USERS) | st.text(max_size=70) | json_values, max_size=6)
notification_data = st.fixed_dictionaries(
    {"users": users | json_values},
    optional={
        "message_type": st.sampled_from(["checkEchoV1", "showText"]) | json_values,
        "event_type": st.sampled_from(["edit-user-talk", "x" * 65]) | json_values,
        "dry_run": st.booleans() | json_values,
        "ttl_seconds": st.integers(-10, 3 * 10**6) | json_values,
        "extra": json_values,
    },
)
data_bodies = (
    notification_data.map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda d: json.dumps(d).encode())
    | st.binary(max_size=200)
)
ce_attribute = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@st.composite
def binary_events(draw):
    headers = {
        "ce-specversion": draw(st.sampled_from(["1.0", "0.3", "2.0", ""])),
        "ce-type": draw(event_types.map(lambda t: t.encode("utf-8", "replace").decode("latin-1"))),
        "ce-source": draw(ce_attribute),
        "ce-id": draw(ce_attribute),
        "content-type": draw(content_types),
    }
    for name in draw(st.lists(st.sampled_from(sorted(headers)), max_size=2)):
        headers.pop(name, None)  # a required attribute missing
    raw = {k: v.encode("latin-1") for k, v in headers.items()}
    raw.update(draw(st.dictionaries(header_names, header_values, max_size=4)))
    return raw, draw(data_bodies)


@st.composite
def structured_events(draw):
    envelope = draw(st.fixed_dictionaries(
        {},
        optional={
            "specversion": st.sampled_from(["1.0", "0.3"]) | json_values,
            "type": event_types | json_values,
            "source": ce_attribute | json_values,
            "id": ce_attribute | json_values,
            "datacontenttype": content_types | json_values,
            "data": notification_data | json_values,
            "data_base64": st.text(max_size=40) | json_values,
            "time": st.text(max_size=30) | json_values,
        },
    ))
    body = json.dumps(envelope).encode() if draw(st.booleans()) else draw(st.binary(max_size=200))
    headers = {b"content-type": draw(content_types).encode("latin-1")}
    headers.update(draw(st.dictionaries(header_names, header_values, max_size=3)))
    return headers, body


@st.composite
def echo_requests(draw):
    well_formed = st.fixed_dictionaries(
        {"deviceTokens": st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3),
         "messageType": st.just("checkEchoV1")},
        optional={"dryRun": st.booleans(), "topic": st.text(max_size=20)},
    )
    body = draw(well_formed | st.fixed_dictionaries(
        {},
        optional={
            "deviceTokens": st.lists(st.text(min_size=1, max_size=40) | json_values, max_size=5) | json_values,
            "messageType": st.sampled_from(["checkEchoV1", "other"]) | json_values,
            "topic": st.sampled_from(["org.wikimedia.wikipedia"]) | json_values,
            "dryRun": st.booleans() | json_values,
            "extra": json_values,
        },
    ) | json_values)
    content = draw(st.sampled_from([json.dumps(body).encode()]) | st.binary(max_size=100))
    headers = {b"content-type": draw(st.just("application/json") | content_types).encode("latin-1")}
    headers.update(draw(st.dictionaries(header_names, header_values, max_size=3)))
    return headers, content


# --- tests --------------------------------------------------------------------------------


@pytest.fixture
def fcm(fcm_server, tmp_path, monkeypatch, engine):
    rig = FcmRig(fcm_server, tmp_path)
    rig.configure(monkeypatch)
    for user in USERS:
        rig.add(engine, user)
    return rig


def post(client, path: str, headers: dict, body: bytes, method: str = "POST"):
    return client.request(method, path, headers=headers, content=body)


def test_any_cloud_event_request_gets_a_defined_answer(fcm):
    statuses: dict[int, int] = {}
    with running("dispatch-fcm") as client, error_log() as errors:

        @SETTINGS
        # A structured event whose body is not UTF-8: the CloudEvents SDK raises UnicodeDecodeError.
        @example(request=({b"content-type": b"application/cloudevents+json"}, b"\x80"), path="/", method="POST")
        # A valid event, so the run always covers the 202 path whatever else is generated.
        @example(
            request=(
                {b"ce-specversion": b"1.0", b"ce-id": b"e1", b"ce-source": b"/t",
                 b"ce-type": b"org.wikimedia.push.notification.requested.v1", b"content-type": b"application/json"},
                b'{"users": ["u1"], "message_type": "checkEchoV1"}',
            ),
            path="/",
            method="POST",
        )
        @given(request=binary_events() | structured_events(), path=st.sampled_from(["/", "/x", "/v1/message/apns"]),
               method=st.sampled_from(["POST"] * 5 + ["GET", "PUT"]))
        def check(request, path, method):
            headers, body = request
            response = post(client, path, headers, body, method)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code in ANSWERS, (response.status_code, response.text)
            if response.status_code >= 400:
                assert response.json()["error"]["code"]
            if response.status_code in (429, 503):
                assert int(response.headers["retry-after"]) >= 1

        check()
        assert errors.unexpected == []
    assert statuses.get(202, 0) + statuses.get(200, 0) > 0, statuses  # some events were valid
    assert statuses.get(400, 0) > 0 and statuses.get(422, 0) > 0, statuses


def test_any_echo_request_gets_a_defined_answer(fcm):
    statuses: dict[int, int] = {}
    with running("dispatch-fcm") as client, error_log() as errors:

        @SETTINGS
        @given(request=echo_requests())
        def check(request):
            headers, body = request
            response = post(client, "/v1/message/fcm", headers, body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code in ECHO_ANSWERS, (response.status_code, response.text)
            if response.status_code == 200:
                assert set(response.json()) == {"delivered", "invalid", "rejected"}
            else:
                assert response.json()["error"]["code"]

        check()
        assert errors.unexpected == []
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses
