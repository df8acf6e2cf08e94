"""The event contract's JSON Schemas (``openapi/events/``) and the parser the functions run
(:mod:`shared.events`) say the same thing: every example in a schema parses, a document one of
them refuses the other refuses too, at and past every bound, and the dead-token reports the
dispatchers send validate against their schema.

JSON Schema cannot say everything the parser checks. Those differences are listed in ``GAPS``
and asserted one by one (the schema accepts, the parser refuses), so none can grow unseen.

Documents are validated as a producer would: draft 2020-12 with ``format`` asserted (Python's
jsonschema, which checks ``date-time`` with rfc3339-validator), and with check-jsonschema, the
command docs/api.md shows."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cloudevents.http import CloudEvent
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from shared.settings import NotificationSettings
from shared.events import (
    MAX_EVENT_TYPE_LENGTH,
    MAX_REASON_LENGTH,
    MAX_REPORTED_SUBSCRIPTIONS,
    MAX_SUBSCRIPTION_ID,
    MAX_TTL_SECONDS,
    MAX_USER_ID_LENGTH,
    NOTIFICATION_REQUESTED,
    RFC3339_DATE_TIME,
    SUBSCRIPTION_INVALID,
    InvalidToken,
    data_object,
    invalid_tokens_event,
    parse_invalid_tokens,
    parse_notification,
)
from shared.http import ApiError
from shared.validation import is_text
from tests import events

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "openapi" / "events"
NOTIFICATION = "notification-requested.v1.json"
INVALID = "subscription-invalid.v1.json"
EVENT_TYPES = {NOTIFICATION: NOTIFICATION_REQUESTED, INVALID: SUBSCRIPTION_INVALID}
SETTINGS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


@cache
def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text(encoding="utf-8"))


def schema_accepts(name: str, document: Any) -> bool:
    validator = Draft202012Validator(schema(name), format_checker=Draft202012Validator.FORMAT_CHECKER)
    return validator.is_valid(document)


def parse(name: str, document: Any) -> Any:
    """``document`` through the parser, as a binary event's body reaches it."""
    event = CloudEvent({"type": EVENT_TYPES[name], "source": "/t", "id": "1"}, json.dumps(document).encode())
    data = data_object(event)
    if name == NOTIFICATION:
        return parse_notification(data, NotificationSettings.from_env())
    return parse_invalid_tokens(data)


def parser_accepts(name: str, document: Any) -> bool:
    try:
        parse(name, document)
    except ApiError as error:
        assert error.status == 422, error.message
        return False
    return True


@pytest.fixture(autouse=True)
def default_settings(monkeypatch):
    """The parser as deployed with every setting at its default, which is what the schemas give."""
    for name in ("PUSH_MESSAGE_TYPES", "PUSH_MAX_USERS_PER_EVENT", "PUSH_DEFAULT_TTL_SECONDS"):
        monkeypatch.delenv(name, raising=False)


def notification(**members: Any) -> dict[str, Any]:
    return {"users": ["123"], "message_type": "checkEchoV1", **members}


def report(**members: Any) -> dict[str, Any]:
    """A report of one subscription, with ``members`` of that subscription changed."""
    item = {"id": 42, "token_sha256": HASH, "reason": "Unregistered", "observed_at": "2026-12-01T10:00:00Z"}
    return {"provider": "apns", "subscriptions": [{**item, **members}]}


def without(document: dict[str, Any], member: str) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != member}


def examples() -> list[tuple[str, Any]]:
    return [(name, document) for name in (NOTIFICATION, INVALID) for document in schema(name)["examples"]]


# --- the schemas themselves ---------------------------------------------------------------


@pytest.mark.parametrize("name", [NOTIFICATION, INVALID])
def test_each_schema_is_a_valid_draft_2020_12_schema_with_examples(name):
    assert schema(name)["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema(name))
    assert len(schema(name)["examples"]) >= 3


def test_the_bounds_that_are_settings_are_the_settings_defaults():
    policy = NotificationSettings.from_env()
    members = schema(NOTIFICATION)["properties"]
    assert members["users"]["maxItems"] == policy.max_users
    assert members["message_type"]["enum"] == list(policy.message_types)
    assert members["ttl_seconds"]["default"] == policy.default_ttl_seconds


def test_the_schemas_bounds_are_the_parsers_constants():
    """Agreement at the bounds is tested on documents below; this names where each one lives."""
    members = schema(NOTIFICATION)["properties"]
    assert members["users"]["items"]["maxLength"] == MAX_USER_ID_LENGTH
    assert members["event_type"]["maxLength"] == MAX_EVENT_TYPE_LENGTH
    assert members["ttl_seconds"]["maximum"] == MAX_TTL_SECONDS
    subscriptions = schema(INVALID)["properties"]["subscriptions"]
    item = subscriptions["items"]["properties"]
    assert subscriptions["maxItems"] == MAX_REPORTED_SUBSCRIPTIONS
    assert item["id"]["maximum"] == MAX_SUBSCRIPTION_ID
    assert item["reason"]["maxLength"] == MAX_REASON_LENGTH
    assert item["observed_at"]["pattern"] == f"^{RFC3339_DATE_TIME.pattern}$"


# --- examples, refusals and gaps ----------------------------------------------------------


@pytest.mark.parametrize("name,document", examples())
def test_every_example_is_valid_and_parses(name, document):
    assert schema_accepts(name, document)
    assert parser_accepts(name, document)


def test_the_edge_examples_parse_to_what_their_descriptions_say():
    request = parse(NOTIFICATION, schema(NOTIFICATION)["examples"][2])
    assert request.users == ("123", "Zoë", "用户😀")  # a repeated id counts once
    assert (request.event_type, request.dry_run, request.ttl_seconds) == (None, True, 0)
    reported = parse(INVALID, schema(INVALID)["examples"][1])
    assert [(i.id, i.token_sha256, i.reason) for i in reported] == [
        (7, HASH, "UNREGISTERED"), (MAX_SUBSCRIPTION_ID, "0" * 64, ""),  # hex of either case
    ]
    assert reported[0].observed_at == datetime(2026, 12, 1, 10)  # 11:00+01:00, in UTC


OBSERVED_AT = "subscriptions.observed_at"
REFUSED = {
    # notification.requested.v1
    "not_an_object": (NOTIFICATION, ["123"], None),
    "users_missing": (NOTIFICATION, without(notification(), "users"), "users"),
    "users_empty": (NOTIFICATION, notification(users=[]), "users"),
    "users_past_the_default_limit": (NOTIFICATION, notification(users=[str(n) for n in range(1001)]), "users"),
    "user_id_empty": (NOTIFICATION, notification(users=[""]), "users"),
    "user_id_of_65_characters": (NOTIFICATION, notification(users=["u" * 65]), "users"),
    "user_id_a_number": (NOTIFICATION, notification(users=[123]), "users"),
    "message_type_missing": (NOTIFICATION, without(notification(), "message_type"), "message_type"),
    "message_type_not_configured": (NOTIFICATION, notification(message_type="showText"), "message_type"),
    "event_type_empty": (NOTIFICATION, notification(event_type=""), "event_type"),
    "event_type_of_65_characters": (NOTIFICATION, notification(event_type="e" * 65), "event_type"),
    "event_type_a_number": (NOTIFICATION, notification(event_type=5), "event_type"),
    "dry_run_a_string": (NOTIFICATION, notification(dry_run="yes"), "dry_run"),
    "dry_run_null": (NOTIFICATION, notification(dry_run=None), "dry_run"),
    "ttl_negative": (NOTIFICATION, notification(ttl_seconds=-1), "ttl_seconds"),
    "ttl_past_28_days": (NOTIFICATION, notification(ttl_seconds=MAX_TTL_SECONDS + 1), "ttl_seconds"),
    "ttl_with_a_fraction": (NOTIFICATION, notification(ttl_seconds=1.5), "ttl_seconds"),
    "ttl_a_boolean": (NOTIFICATION, notification(ttl_seconds=True), "ttl_seconds"),
    "ttl_null": (NOTIFICATION, notification(ttl_seconds=None), "ttl_seconds"),
    "unknown_member": (NOTIFICATION, notification(text="hello"), "text"),
    # subscription.invalid.v1
    "report_not_an_object": (INVALID, "apns", None),
    "subscriptions_missing": (INVALID, {"provider": "apns"}, "subscriptions"),
    "subscriptions_not_a_list": (INVALID, {"subscriptions": {"id": 1}}, "subscriptions"),
    "subscriptions_past_10000": (
        INVALID, {"subscriptions": report()["subscriptions"] * (MAX_REPORTED_SUBSCRIPTIONS + 1)}, "subscriptions"
    ),
    "subscription_not_an_object": (INVALID, {"subscriptions": [42]}, "subscriptions"),
    "id_missing": (INVALID, {"subscriptions": [without(report()["subscriptions"][0], "id")]}, "subscriptions.id"),
    "id_zero": (INVALID, report(id=0), "subscriptions.id"),
    "id_past_64_bits": (INVALID, report(id=MAX_SUBSCRIPTION_ID + 1), "subscriptions.id"),
    "id_a_string": (INVALID, report(id="42"), "subscriptions.id"),
    "id_a_boolean": (INVALID, report(id=True), "subscriptions.id"),
    "hash_of_63_digits": (INVALID, report(token_sha256=HASH[:63]), "subscriptions.token_sha256"),
    "hash_not_hex": (INVALID, report(token_sha256="z" * 64), "subscriptions.token_sha256"),
    "hash_null": (INVALID, report(token_sha256=None), "subscriptions.token_sha256"),
    "reason_of_65_characters": (INVALID, report(reason="r" * 65), "subscriptions.reason"),
    "reason_null": (INVALID, report(reason=None), "subscriptions.reason"),
    "observed_at_missing": (
        INVALID, {"subscriptions": [without(report()["subscriptions"][0], "observed_at")]}, OBSERVED_AT
    ),
    "observed_at_a_number": (INVALID, report(observed_at=1764583200), OBSERVED_AT),
    "observed_at_without_offset": (INVALID, report(observed_at="2026-12-01T10:00:00"), OBSERVED_AT),
    "observed_at_a_date_alone": (INVALID, report(observed_at="2026-12-01"), OBSERVED_AT),
    "observed_at_a_week_date": (INVALID, report(observed_at="2026-W48-2T10:00:00Z"), OBSERVED_AT),
    "observed_at_with_a_space": (INVALID, report(observed_at="2026-12-01 10:00:00Z"), OBSERVED_AT),
    "observed_at_offset_minute_60": (
        INVALID, report(observed_at="2026-12-01T10:00:00+00:60"), OBSERVED_AT
    ),
    "observed_at_february_30": (INVALID, report(observed_at="2026-02-30T10:00:00Z"), OBSERVED_AT),
    "observed_at_year_0": (INVALID, report(observed_at="0000-12-01T10:00:00Z"), OBSERVED_AT),
    "observed_at_a_leap_second": (INVALID, report(observed_at="2016-12-31T23:59:60Z"), OBSERVED_AT),
}


@pytest.mark.parametrize("name,document,field", REFUSED.values(), ids=REFUSED.keys())
def test_a_document_the_schema_refuses_the_parser_refuses_naming_the_field(name, document, field):
    assert not schema_accepts(name, document)
    with pytest.raises(ApiError) as refused:
        parse(name, document)
    assert (refused.value.status, refused.value.field) == (422, field)


ACCEPTED = {
    "event_type_null": (NOTIFICATION, notification(event_type=None)),
    "the_default_limit_of_users": (NOTIFICATION, notification(users=[str(n) for n in range(1000)])),
    "10000_subscriptions": (INVALID, {"subscriptions": report()["subscriptions"] * MAX_REPORTED_SUBSCRIPTIONS}),
    "no_provider": (INVALID, {"subscriptions": []}),
    "a_provider_of_any_kind": (INVALID, {"provider": 5, "subscriptions": []}),
    "unknown_members": (INVALID, {"subscriptions": [{**report()["subscriptions"][0], "app": "x"}], "v": 2}),
    "reason_missing": (INVALID, {"subscriptions": [without(report()["subscriptions"][0], "reason")]}),
    "observed_at_lower_case_t_and_z": (INVALID, report(observed_at="2026-12-01t10:00:00z")),
    "observed_at_nanoseconds": (INVALID, report(observed_at="2026-12-01T10:00:00.123456789+05:45")),
}


@pytest.mark.parametrize("name,document", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_a_document_at_a_bound_the_schema_accepts_the_parser_accepts(name, document):
    assert schema_accepts(name, document)
    assert parser_accepts(name, document)


GAPS = {
    # Every string must be text UTF-8 can encode; JSON's "\ud800" escape is a string to JSON Schema.
    "lone_surrogate_in_a_user_id": (NOTIFICATION, notification(users=["\ud800"])),
    "lone_surrogate_in_a_reason": (INVALID, report(reason="\udfff")),
    # JSON Schema's integer is any number without a fraction: 3600.0 is one. The parser takes
    # only numbers written without a fraction, as a float would lose a 64-bit id's last digits.
    "ttl_written_with_a_fraction": (NOTIFICATION, notification(ttl_seconds=3600.0)),
    "id_written_with_a_fraction": (INVALID, report(id=42.0)),
    # A time whose UTC falls in year 0 or 10000, which datetime cannot hold.
    "observed_at_before_year_1_in_utc": (INVALID, report(observed_at="0001-01-01T00:00:00+01:00")),
    "observed_at_after_year_9999_in_utc": (INVALID, report(observed_at="9999-12-31T23:59:59-01:00")),
    # Python's jsonschema only: its patterns are Python's re, whose $ also matches before a final
    # newline. ECMA-262's, which JSON Schema specifies, does not: check-jsonschema refuses it
    # (test_check_jsonschema_validates_as_the_docs_show).
    "observed_at_with_a_final_newline": (INVALID, report(observed_at="2026-12-01T10:00:00Z\n")),
}


@pytest.mark.parametrize("name,document", GAPS.values(), ids=GAPS.keys())
def test_what_json_schema_cannot_say_the_parser_refuses(name, document):
    assert schema_accepts(name, document)
    assert not parser_accepts(name, document)


# --- agreement on generated documents -----------------------------------------------------

OTHER_TYPES = [None, True, False, 0, -1, 1.5, "", "x", [], {}]


def matching(pattern: str) -> st.SearchStrategy[str]:
    """Strings ``pattern`` matches; of times, none on the two days where an offset can take a time
    out of the years 1 to 9999 (GAPS)."""
    return st.from_regex(pattern, fullmatch=True).filter(lambda s: not s.startswith(("0001-01-01", "9999-12-31")))

Place = tuple[str | int, ...]  # where in a document: member names and list positions


def places(subschema: dict[str, Any], value: Any, path: Place = ()) -> Iterator[tuple[Place, dict[str, Any]]]:
    """Every place in ``value`` (a document, or a part of one) that ``subschema`` governs, with
    the part of the schema that governs it; of a list, its first element."""
    yield path, subschema
    if isinstance(value, dict):
        for member, governing in subschema.get("properties", {}).items():
            if member in value:
                yield from places(governing, value[member], (*path, member))
    if isinstance(value, list) and value and "items" in subschema:
        yield from places(subschema["items"], value[0], (*path, 0))


def replaced(document: Any, path: Place, value: Any) -> Any:
    """``document`` with the value at ``path`` replaced (a member left out where ``value`` is
    ``LEFT_OUT``)."""
    if not path:
        return value
    copy = list(document) if isinstance(document, list) else dict(document)
    head, *rest = path
    if rest:
        copy[head] = replaced(document[head], tuple(rest), value)
    elif value is LEFT_OUT:
        del copy[head]
    else:
        copy[head] = value
    return copy


LEFT_OUT = object()


def sizes(low: int, high: int) -> list[int]:
    return sorted({max(low - 1, 0), low, high, high + 1})


def edge_values(subschema: dict[str, Any], current: Any) -> list[Any]:
    """Values on both sides of each bound ``subschema`` sets, and values of other types.
    Lists are made of copies of ``current``'s first element, so only their length is at stake."""
    types = subschema.get("type", [])
    types = [types] if isinstance(types, str) else types
    values = list(OTHER_TYPES)
    if "enum" in subschema:
        values += [*subschema["enum"], "checkEchoV2"]
    if "string" in types:
        values += ["é" * n for n in sizes(subschema.get("minLength", 0), subschema.get("maxLength", 80))]
    if "integer" in types:
        values += [subschema["minimum"] - 1, subschema["minimum"], subschema["maximum"], subschema["maximum"] + 1]
    if "array" in types and current:
        values += [current[:1] * n for n in sizes(subschema.get("minItems", 0), subschema["maxItems"])]
    return values


def variants(name: str) -> Iterator[Any]:
    """Each example of ``name`` with one place changed to each of its edge values, left out, or
    given a member the schema does not name."""
    for document in schema(name)["examples"]:
        for path, subschema in places(schema(name), document):
            current = document
            for step in path:
                current = current[step]
            for value in edge_values(subschema, current):
                yield replaced(document, path, value)
            if path and isinstance(path[-1], str):
                yield replaced(document, path, LEFT_OUT)
            if isinstance(current, dict):
                yield replaced(document, (*path, "unknown"), "x")


@pytest.mark.parametrize("name", [NOTIFICATION, INVALID])
def test_schema_and_parser_give_every_document_at_the_edges_the_same_verdict(name):
    verdicts = [(schema_accepts(name, doc), parser_accepts(name, doc), doc) for doc in variants(name)]
    assert [(by_schema, doc) for by_schema, by_parser, doc in verdicts if by_schema != by_parser] == []
    assert {by_schema for by_schema, _, _ in verdicts} == {True, False}


def values_of(subschema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of any size ``subschema``'s type may take (not only at the bounds): any text, any
    integer, anything its pattern matches; none of the GAPS (lone surrogates, integral floats,
    times that leave datetime's years)."""
    types = subschema.get("type", [])
    types = [types] if isinstance(types, str) else types
    options = [st.sampled_from(edge_values(subschema, None))]
    if "string" in types:
        options.append(st.text(max_size=subschema.get("maxLength", 80) + 2))
        if "pattern" in subschema:
            options.append(matching(subschema["pattern"]))
    if "integer" in types:
        options.append(st.integers(subschema["minimum"] - 2**64, subschema["maximum"] + 2**64))
    return st.one_of(options)


@st.composite
def documents(draw, name: str) -> Any:
    """An example of ``name`` with one or two of its places given any value of their type."""
    document = draw(st.sampled_from(schema(name)["examples"]))
    for _ in range(draw(st.integers(1, 2))):
        path, subschema = draw(st.sampled_from(list(places(schema(name), document))))
        document = replaced(document, path, draw(values_of(subschema)))
    return document


@SETTINGS
@given(observed_at=matching(f"^{RFC3339_DATE_TIME.pattern}$"))
def test_schema_and_parser_agree_on_every_time_of_the_date_time_form(observed_at):
    """The form is one pattern in both; the calendar (February 30) is the date-time format's in
    the schema, datetime's in the parser."""
    document = report(observed_at=observed_at)
    assert schema_accepts(INVALID, document) == parser_accepts(INVALID, document)


@pytest.mark.parametrize("name", [NOTIFICATION, INVALID])
def test_schema_and_parser_give_every_generated_document_the_same_verdict(name):
    verdicts = {True: 0, False: 0}

    @SETTINGS
    @given(document=documents(name))
    def check(document):
        accepted = schema_accepts(name, document)
        assert parser_accepts(name, document) == accepted, "the schema " + ("accepts" if accepted else "refuses")
        verdicts[accepted] += 1

    check()
    assert verdicts[True] >= 10 and verdicts[False] >= 10, verdicts  # both sides were explored


# --- the reports the dispatchers send -----------------------------------------------------


@SETTINGS
@given(
    dead=st.lists(
        st.builds(
            InvalidToken,
            id=st.integers(1, MAX_SUBSCRIPTION_ID),
            token_sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
            reason=st.text(max_size=100) | st.sampled_from(["Unregistered", "UNREGISTERED", "http_410"]),
            observed_at=st.datetimes(),
        ),
        max_size=5,
    ),
    provider=st.sampled_from(["fcm", "apns", "webpush"]),
)
# A provider's reason is what its answer said (FCM's errorCode is any string of the body): one
# longer than clean-up accepts, or holding a lone surrogate, once got the whole report refused.
@example(dead=[InvalidToken(1, "a" * 64, "X" * 300, datetime(2026, 12, 1))], provider="fcm")
@example(dead=[InvalidToken(1, "a" * 64, "bad \ud800", datetime(2026, 12, 1))], provider="fcm")
def test_the_report_a_dispatcher_makes_validates_and_parses_back(dead, provider):
    data = invalid_tokens_event("/push-functions/dispatch-fcm", provider, dead).get_data()
    assert schema_accepts(INVALID, data)
    parsed = parse(INVALID, data)
    assert [(i.id, i.token_sha256, i.observed_at) for i in parsed] == [
        (i.id, i.token_sha256, i.observed_at) for i in dead
    ]
    for got, sent in zip(parsed, dead):
        if len(sent.reason) <= MAX_REASON_LENGTH and is_text(sent.reason):
            assert got.reason == sent.reason


async def test_every_dispatchers_reply_report_validates_against_the_schema(rig, function_client, engine):
    dead = rig.add(engine, "alice")
    rig.dead(dead)
    response = await function_client(rig.function).post("/", **events.notification(["alice"]))
    assert response.status_code == 200
    attributes, data = events.reply_event(response)
    assert attributes["type"] == SUBSCRIPTION_INVALID
    assert schema_accepts(INVALID, data)
    assert [item["id"] for item in data["subscriptions"]] == [dead.id]


# --- the validator the docs show ----------------------------------------------------------


def check_jsonschema(name: str, documents: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess:
    """``check-jsonschema --schemafile openapi/events/<name> <file>...``, as docs/api.md shows it."""
    files = []
    for label, document in documents.items():
        files.append(tmp_path / f"{label}.json")
        files[-1].write_text(json.dumps(document))
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(SCHEMAS / name), *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )


def test_the_docs_show_the_check_jsonschema_command_for_each_schema():
    api = (REPO / "docs" / "api.md").read_text()
    for name in (NOTIFICATION, INVALID):
        assert f"check-jsonschema --schemafile openapi/events/{name}" in api


@pytest.mark.parametrize("name", [NOTIFICATION, INVALID])
def test_check_jsonschema_validates_as_the_docs_show(name, tmp_path):
    valid = {f"example_{n}": document for n, document in enumerate(schema(name)["examples"])}
    passed = check_jsonschema(name, valid, tmp_path)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    refused = {label: document for label, (of, document, _) in REFUSED.items() if of == name}
    if name == INVALID:
        refused["observed_at_with_a_final_newline"] = GAPS["observed_at_with_a_final_newline"][1]
    failed = check_jsonschema(name, refused, tmp_path)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert [label for label in refused if f"{label}.json::" not in failed.stdout] == []
