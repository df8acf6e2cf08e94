"""Property tests: whatever reaches a dispatcher or the clean-up function (headers, body bytes,
JSON of any shape, a CloudEvent in either mode with any attributes, Echo's request with any
fields) is answered with a status the broker and Echo understand, never a 500 and never an
unhandled exception; and a refused report deletes nothing.

Bodies are built as JSON text, not dumped from Python values, so they can hold what json.dumps
never makes: nesting past the parser's recursion limit and numbers beyond any float or past
Python's 4300-digit limit. Strings include lone surrogates (JSON's ``"\\ud800"``), which no
UTF-8 encoder takes."""
from __future__ import annotations

import json
from datetime import timedelta, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from cloudevents.http import from_http
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.events import NOTIFICATION_REQUESTED, PING, SUBSCRIPTION_INVALID, _binary_event
from shared.models import Subscription
from tests.hardening import error_log, running
from tests.subscription_bodies import TOPIC

# 200 (dead-token reply), 202, refusals (400, 405, 413, 415, 422, 431), retryable (429, 503).
ANSWERS = {200, 202, 400, 405, 413, 415, 422, 429, 431, 503}
ECHO_ANSWERS = {200, 400, 405, 413, 415, 429, 431, 503}
# Per test and database: the whole file stays well under a minute per database.
EXAMPLES = 100
USERS = ["alice", "bob"]

# Deeply nested bodies are large; hypothesis warns when it describes them.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

# --- strategies ---------------------------------------------------------------------------

# Text, half of it holding a lone surrogate (which st.text() never generates).
lone_surrogates = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text(max_size=20), st.characters(categories=["Cs"]), st.text(max_size=20),
)
texts = st.text(max_size=40) | lone_surrogates
scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=25,
)
extreme_numbers = st.sampled_from(["1e400", "-1e400", "1e-400", "-0", str(2**63), str(2**70), "9" * 5000])
# JSON text of any value; json.dumps escapes lone surrogates, so it always encodes.
json_texts = json_values.map(json.dumps) | extreme_numbers
depths = st.sampled_from([100, 990, 1000, 5000, 30_000])
deep_nesting = depths.map(lambda n: "[" * n + "]" * n) | depths.map(lambda n: '{"a":' * n + "0" + "}" * n)
# Any JSON document, nested past the parser's recursion limit too.
documents = json_texts | deep_nesting


def object_text(members: dict[str, str]) -> str:
    """A JSON object from its members' JSON texts."""
    return "{" + ",".join(f"{json.dumps(key)}:{value}" for key, value in members.items()) + "}"


def json_objects(required: dict, optional: dict) -> st.SearchStrategy[str]:
    """JSON objects whose members are drawn as JSON text, each member also possibly any value."""
    def anything(strategies: dict) -> dict:
        return {key: strategy | json_texts for key, strategy in strategies.items()}

    return st.fixed_dictionaries(anything(required), optional=anything(optional)).map(object_text)


@st.composite
def spoiled(draw, valid: dict[str, str], hostile: dict[str, st.SearchStrategy[str]]) -> str:
    """The JSON object ``valid`` (members as JSON text) with up to two members replaced by or
    added from ``hostile``: each hostile value is often the only thing wrong, so it reaches
    whatever comes after the checks of the other members."""
    members = dict(valid)
    for name in draw(st.sets(st.sampled_from(sorted(hostile)), max_size=2)):
        members[name] = draw(hostile[name])
    return object_text(members)


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
users = st.lists(st.sampled_from(USERS) | texts | st.text(min_size=65, max_size=70), max_size=6).map(json.dumps)
notification_data = spoiled(
    {"users": json.dumps(USERS), "message_type": json.dumps("checkEchoV1")},
    {
        "users": users | json_texts,
        "message_type": st.sampled_from(["checkEchoV1", "showText"]).map(json.dumps) | json_texts,
        "event_type": (st.sampled_from(["edit-user-talk", "x" * 65]) | texts).map(json.dumps) | json_texts,
        "dry_run": st.booleans().map(json.dumps) | json_texts,
        "ttl_seconds": st.integers(-10, 3 * 10**6).map(str) | json_texts,
        "extra": json_texts,
    },
)
data_bodies = (notification_data | documents).map(str.encode) | st.binary(max_size=200)
ce_attribute = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
BINARY = {b"ce-specversion": b"1.0", b"ce-id": b"e1", b"ce-source": b"/t",
          b"ce-type": NOTIFICATION_REQUESTED.encode(), b"content-type": b"application/json"}
STRUCTURED = {b"content-type": b"application/cloudevents+json"}
JSON = {b"content-type": b"application/json"}


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
def structured_events(draw, data: st.SearchStrategy[str] = notification_data | deep_nesting):
    envelope = json_objects(
        {},
        {
            "specversion": st.sampled_from(["1.0", "0.3"]).map(json.dumps),
            "type": event_types.map(json.dumps),
            "source": (ce_attribute | texts).map(json.dumps),
            "id": (ce_attribute | texts).map(json.dumps),
            "datacontenttype": content_types.map(json.dumps),
            "data": data,
            "data_base64": st.text(max_size=40).map(json.dumps),
            "time": st.text(max_size=30).map(json.dumps),
        },
    )
    body = draw(envelope).encode() if draw(st.booleans()) else draw(st.binary(max_size=200))
    headers = {b"content-type": draw(content_types).encode("latin-1")}
    headers.update(draw(st.dictionaries(header_names, header_values, max_size=3)))
    return headers, body


@st.composite
def well_formed_events(draw, event_type: str, data: st.SearchStrategy[str]):
    """Events of ``event_type`` valid in either mode but for their data and, in structured mode,
    their source and id (which may hold lone surrogates): what gets past the envelope to the
    data's parser, which the fuzzed envelopes above seldom do."""
    body = draw(data)
    if draw(st.booleans()):
        headers = {b"ce-specversion": b"1.0", b"ce-type": event_type.encode(), b"ce-source": b"/test",
                   b"ce-id": draw(st.uuids()).hex.encode(), b"content-type": b"application/json"}
        return headers, body.encode()
    envelope = {"specversion": json.dumps("1.0"), "type": json.dumps(event_type),
                "source": json.dumps(draw(st.just("/test") | texts)),
                "id": json.dumps(draw(st.uuids().map(str) | texts)), "data": body}
    return STRUCTURED, object_text(envelope).encode()


@st.composite
def echo_requests(draw, tokens: st.SearchStrategy[str]):
    well_formed = json_objects(
        {"deviceTokens": st.lists(tokens, min_size=1, max_size=3).map(json.dumps),
         "messageType": st.just(json.dumps("checkEchoV1"))},
        {"dryRun": st.booleans().map(json.dumps), "topic": st.just(json.dumps(TOPIC))},
    )
    anything = json_objects(
        {},
        {
            "deviceTokens": st.lists(tokens | texts, max_size=5).map(json.dumps),
            "messageType": st.sampled_from(["checkEchoV1", "other"]).map(json.dumps),
            "topic": (st.sampled_from([TOPIC]) | texts).map(json.dumps),
            "dryRun": st.booleans().map(json.dumps),
            "extra": json_texts,
        },
    )
    content = draw((well_formed | anything | documents).map(str.encode) | st.binary(max_size=100))
    headers = {b"content-type": draw(st.just("application/json") | content_types).encode("latin-1")}
    headers.update(draw(st.dictionaries(header_names, header_values, max_size=3)))
    return headers, content


def timestamps() -> st.SearchStrategy[str]:
    """RFC 3339 times of any year and offset, and the edges where converting to UTC leaves the
    years datetime can hold."""
    offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda minutes: timezone(timedelta(minutes=minutes)))
    edges = st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00Z"])
    anytime = st.builds(lambda moment, zone: moment.replace(tzinfo=zone).isoformat(), st.datetimes(), offsets)
    return edges | anytime


@st.composite
def report_items(draw, rows: list[Subscription]) -> str:
    """A report of one of these subscriptions at any time, or of anything else."""
    row = draw(st.sampled_from(rows))
    valid = {"id": str(row.id), "token_sha256": json.dumps(row.token_sha256),
             "observed_at": json.dumps(draw(timestamps())), "reason": json.dumps("UNREGISTERED")}
    return draw(spoiled(valid, {
        "id": st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**70]).map(str) | json_texts,
        "token_sha256": st.sampled_from(["z" * 64, "\ud800" * 64, "a" * 63 + "\udfff"]).map(json.dumps)
        | json_texts,
        "observed_at": texts.map(json.dumps) | json_texts,
        "reason": texts.map(json.dumps) | json_texts,
    }))


def invalid_token_reports(rows: list[Subscription]) -> st.SearchStrategy[str]:
    """``subscription.invalid.v1`` data about these subscriptions (data of any other shape comes
    with the fuzzed envelopes)."""
    return st.lists(report_items(rows), min_size=1, max_size=3).map(
        lambda items: object_text({"provider": json.dumps("fcm"), "subscriptions": f"[{','.join(items)}]"})
    )


# --- tests --------------------------------------------------------------------------------


@pytest.fixture
def devices(rig, engine) -> list[Subscription]:
    """A device of each user with the rig's provider, so valid events reach real sends."""
    return [rig.add(engine, user) for user in USERS]


def post(client, path: str, headers: dict, body: bytes, method: str = "POST"):
    return client.request(method, path, headers=headers, content=body)


def notification(**data: object) -> bytes:
    """``notification.requested.v1`` data, as json.dumps writes it (lone surrogates escaped)."""
    return json.dumps({"users": ["alice"], "message_type": "checkEchoV1", **data}).encode()


def structured(**attributes: object) -> bytes:
    """A structured ``notification.requested.v1`` event."""
    envelope = {"specversion": "1.0", "type": NOTIFICATION_REQUESTED, "source": "/t", "id": "e2", **attributes}
    return json.dumps({**envelope, "data": json.loads(notification())}).encode()


REPORT = {**BINARY, b"ce-type": SUBSCRIPTION_INVALID.encode()}


def report(**item: object) -> bytes:
    """``subscription.invalid.v1`` data reporting one subscription."""
    valid = {"id": 1, "token_sha256": "a" * 64, "observed_at": "2026-01-01T00:00:00Z"}
    return json.dumps({"provider": "fcm", "subscriptions": [{**valid, **item}]}).encode()


def subscription_ids(engine) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(select(Subscription.id)))


@pytest.mark.parametrize("rig", ["fcm", "webpush"], indirect=True)
def test_any_cloud_event_request_gets_a_defined_answer(rig, devices):
    statuses: dict[int, int] = {}
    with running(rig.function) as client, error_log() as errors:

        @SETTINGS
        # A structured event whose body is not UTF-8: the CloudEvents SDK raises UnicodeDecodeError.
        @example(request=(STRUCTURED, b"\x80"), path="/", method="POST")
        # A valid event, so the run always covers the 202 path whatever else is generated.
        @example(request=(BINARY, notification()), path="/", method="POST")
        # What the audit found: a user id and a structured event's source holding a lone surrogate.
        @example(request=(BINARY, notification(users=["\ud800"])), path="/", method="POST")
        @example(request=(STRUCTURED, structured(source="/\ud800")), path="/", method="POST")
        @given(
            request=binary_events() | structured_events()
            | well_formed_events(NOTIFICATION_REQUESTED, notification_data),
            path=st.sampled_from(["/", "/x", "/v1/message/apns"]),
            method=st.sampled_from(["POST"] * 5 + ["GET", "PUT"]),
        )
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


@pytest.mark.parametrize("rig", ["fcm", "apns"], indirect=True)
def test_any_echo_request_gets_a_defined_answer(rig, devices):
    statuses: dict[int, int] = {}
    tokens = st.sampled_from([device.token for device in devices]) | texts.filter(bool)
    with running(rig.function) as client, error_log() as errors:

        @SETTINGS
        # What the audit found: a token holding a lone surrogate.
        @example(request=(JSON, json.dumps({"deviceTokens": ["\ud800"], "messageType": "checkEchoV1"}).encode()))
        @given(request=echo_requests(tokens))
        def check(request):
            headers, body = request
            response = post(client, f"/v1/message/{rig.provider}", headers, body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code in ECHO_ANSWERS, (response.status_code, response.text)
            if response.status_code == 200:
                assert set(response.json()) == {"delivered", "invalid", "rejected"}
            else:
                assert response.json()["error"]["code"]

        check()
        assert errors.unexpected == []
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses


@pytest.mark.parametrize("rig", ["fcm"], indirect=True)
def test_any_invalid_token_report_gets_a_defined_answer_and_a_refused_one_deletes_nothing(rig, devices, engine):
    statuses: dict[int, int] = {}
    reports = invalid_token_reports(devices)
    with running("cleanup-invalid-tokens") as client, error_log() as errors:

        @SETTINGS
        # What the audit found: a time that is out of range in UTC, an id past 64 bits.
        @example(request=(REPORT, report(observed_at="0001-01-01T00:00:00+01:00")))
        @example(request=(REPORT, report(id=2**70)))
        @given(
            request=well_formed_events(SUBSCRIPTION_INVALID, reports | deep_nesting)
            | binary_events() | structured_events(reports | deep_nesting)
        )
        def check(request):
            headers, body = request
            before = subscription_ids(engine)
            response = post(client, "/", headers, body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code in ANSWERS - {200}, (response.status_code, response.text)
            if response.status_code >= 400:
                assert response.json()["error"]["code"]
                assert subscription_ids(engine) == before, "a refused report deleted subscriptions"

        check()
        assert errors.unexpected == []
    assert statuses.get(202, 0) > 0 and statuses.get(400, 0) > 0 and statuses.get(422, 0) > 0, statuses


def test_a_binary_event_reads_as_the_cloudevents_sdk_reads_it():
    """The dispatchers read a well-formed binary event themselves (the SDK's marshaller cost
    about as much CPU as the rest of reading the request): the event is the SDK's, attribute for
    attribute (``time``, which the SDK makes up when it is missing, aside) and its data alike;
    whatever it leaves to the SDK (``None``) is what the SDK reads or refuses as before."""
    read = 0

    @SETTINGS
    @example(request=(BINARY, notification()))
    @example(request=({**BINARY, b"ce-subject": "caf\u00e9".encode()}, b"not json"))
    @given(request=binary_events() | well_formed_events(NOTIFICATION_REQUESTED, notification_data))
    def check(request):
        nonlocal read
        headers, body = request
        # As the server hands them over: names in lower case, both as bytes.
        raw = [(_bytes(name).lower(), _bytes(value)) for name, value in headers.items()]
        lean = _binary_event(raw, body)
        if lean is None:
            return
        read += 1
        as_starlette_gives_them: dict[str, str] = {}
        for name, value in raw:
            as_starlette_gives_them.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        sdk = from_http(as_starlette_gives_them, body)
        ours, theirs = dict(lean.get_attributes()), dict(sdk.get_attributes())
        if "ce-time" not in as_starlette_gives_them:
            ours.pop("time"), theirs.pop("time")
        assert ours == theirs
        assert lean.data == sdk.data

    check()
    assert read > 0


def _bytes(text: str | bytes) -> bytes:
    return text.encode("latin-1") if isinstance(text, str) else text
