"""The APNs provider token shared through the database (shared/apns_tokens.py), and the APNs
provider presenting it to the fake APNs server. Storage tests run on SQLite and MariaDB; time is
an injected clock that tests advance, never a sleep."""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine, create_engine, event, select

from fakes.apns import DEFAULT_KEY_ID, DEFAULT_TEAM_ID, FakeApns, make_p8_key
from shared.apns_tokens import ApnsTokenStore
from shared.config import ConfigError
from shared.core import Device, Outcome, WakeUp, utcnow
from shared.models import ProviderToken
from shared.providers.apns import ApnsProvider, sign_provider_token

TEAM = DEFAULT_TEAM_ID
KEY_ID = DEFAULT_KEY_ID
KEY = make_p8_key()
PUBLIC_KEY = serialization.load_pem_private_key(KEY.encode(), None).public_key()
WAKEUP = WakeUp(message_type="notification", ttl_seconds=3600)


class FakeClock:
    """Naive UTC now, moved by the test."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2030, 1, 1, 12, 0, 0, 250_000)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class CountingSigner:
    """A ``sign`` callback: really signs with KEY, and counts (thread-safe)."""

    def __init__(self) -> None:
        self.calls: list[datetime] = []
        self._lock = threading.Lock()

    def __call__(self, issued_at: datetime) -> str:
        with self._lock:
            self.calls.append(issued_at)
        return sign_provider_token(KEY, KEY_ID, TEAM, issued_at)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sign() -> CountingSigner:
    return CountingSigner()


@pytest.fixture
def token_queries(engine: Engine) -> Iterator[list[str]]:
    """Statements on provider_tokens sent to the database while the test runs."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if "provider_tokens" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def stored(engine: Engine) -> tuple[str, datetime] | None:
    with engine.connect() as connection:
        row = connection.execute(
            select(ProviderToken.token, ProviderToken.issued_at).where(
                ProviderToken.team_id == TEAM, ProviderToken.key_id == KEY_ID
            )
        ).one_or_none()
    return None if row is None else (row.token, row.issued_at)


def stored_token(engine: Engine) -> str:
    row = stored(engine)
    assert row is not None
    return row[0]


def claims(token: str) -> dict:
    options = {"verify_iat": False}  # the test clock runs in 2030
    return jwt.decode(token, PUBLIC_KEY, ["ES256"], issuer=TEAM, options=options)  # type: ignore


def iat_of(token: str) -> datetime:
    return datetime.fromtimestamp(claims(token)["iat"], timezone.utc).replace(tzinfo=None)


def race(calls: list, *args: object) -> list[str]:
    """Call each of ``calls`` (bound ``get`` methods) in its own thread, all at once: the tokens."""
    barrier = threading.Barrier(len(calls))
    results: list[str | BaseException] = [""] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = calls[index](*args).token
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


# -- the store ------------------------------------------------------------------------------------


def test_first_call_signs_and_stores_a_token_for_the_team_and_key(engine, clock, sign) -> None:
    store = ApnsTokenStore(engine, clock=clock)

    token = store.get(TEAM, KEY_ID, sign).token

    assert sign.calls == [clock.now.replace(microsecond=0)]
    assert stored(engine) == (token, clock.now.replace(microsecond=0))
    assert jwt.get_unverified_header(token)["kid"] == KEY_ID
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert iat_of(token) == clock.now.replace(microsecond=0)  # issued_at is the token's iat


def test_within_the_refresh_age_the_token_is_reused_from_memory(
    engine, clock, sign, token_queries
) -> None:
    store = ApnsTokenStore(engine, clock=clock)
    token = store.get(TEAM, KEY_ID, sign).token
    queries = len(token_queries)

    clock.advance(minutes=39, seconds=59)
    again = [store.get(TEAM, KEY_ID, sign).token for _ in range(100)]

    assert again == [token] * 100
    assert len(sign.calls) == 1
    assert len(token_queries) == queries  # no database trip per call


def test_another_replica_uses_the_stored_token_without_signing(engine, clock, sign) -> None:
    token = ApnsTokenStore(engine, clock=clock).get(TEAM, KEY_ID, sign).token
    clock.advance(minutes=30)

    other_sign = CountingSigner()
    assert ApnsTokenStore(engine, clock=clock).get(TEAM, KEY_ID, other_sign).token == token
    assert other_sign.calls == []


def test_after_the_refresh_age_one_new_token_replaces_the_stored_one(engine, clock, sign) -> None:
    store = ApnsTokenStore(engine, refresh_minutes=40, clock=clock)
    old = store.get(TEAM, KEY_ID, sign).token

    clock.advance(minutes=40)
    new = store.get(TEAM, KEY_ID, sign).token

    assert new != old
    assert len(sign.calls) == 2
    assert stored(engine) == (new, clock.now.replace(microsecond=0))
    assert ApnsTokenStore(engine, clock=clock).get(TEAM, KEY_ID, sign).token == new


def test_teams_and_keys_have_tokens_of_their_own(engine, clock, sign) -> None:
    store = ApnsTokenStore(engine, clock=clock)
    first = store.get(TEAM, KEY_ID, sign).token
    other_key = store.get(TEAM, "OTHERKEY99", sign).token
    other_team = store.get("OTHERTEAM9", KEY_ID, sign).token

    assert len({first, other_key, other_team}) == 3
    assert store.get(TEAM, KEY_ID, sign).token == first


@pytest.mark.parametrize("existing", [False, True], ids=["first-token", "refresh"])
def test_ten_threads_of_one_replica_make_one_token(engine, clock, sign, existing) -> None:
    store = ApnsTokenStore(engine, clock=clock)
    if existing:
        store.get(TEAM, KEY_ID, sign).token
        clock.advance(minutes=41)
        sign.calls.clear()

    tokens = race([store.get] * 10, TEAM, KEY_ID, sign)

    assert len(sign.calls) == 1
    assert len(set(tokens)) == 1
    assert stored_token(engine) == tokens[0]


@pytest.mark.parametrize("existing", [False, True], ids=["first-token", "refresh"])
def test_replicas_racing_make_one_token_that_all_of_them_use(
    engine, clock, sign, existing
) -> None:
    replicas = [ApnsTokenStore(engine, clock=clock) for _ in range(2)]
    if existing:
        replicas[0].get(TEAM, KEY_ID, sign).token
        clock.advance(minutes=41)
        sign.calls.clear()

    # Each replica with five threads: ten callers over two stores (and two connection pools).
    tokens = race([replica.get for replica in replicas] * 5, TEAM, KEY_ID, sign)

    assert len(sign.calls) == 1
    assert len(set(tokens)) == 1
    assert stored_token(engine) == tokens[0]
    late = ApnsTokenStore(engine, clock=clock)
    assert late.get(TEAM, KEY_ID, sign).token == tokens[0]


@pytest.mark.parametrize("existing", [False, True], ids=["first-token", "refresh"])
def test_replica_that_loses_the_race_rereads_and_uses_the_winners_token(
    engine, clock, sign, existing, monkeypatch
) -> None:
    """Deterministically: B reads the stale (or missing) row, A replaces it, then B tries."""
    winner, loser = ApnsTokenStore(engine, clock=clock), ApnsTokenStore(engine, clock=clock)
    if existing:
        ApnsTokenStore(engine, clock=clock).get(TEAM, KEY_ID, sign).token
        clock.advance(minutes=45)
        sign.calls.clear()
    read = loser._read
    reads = []

    def read_then_let_the_winner_refresh(team_id: str, key_id: str):
        found = read(team_id, key_id)
        reads.append(found)
        if len(reads) == 1:
            winner.get(TEAM, KEY_ID, sign).token
        return found

    monkeypatch.setattr(loser, "_read", read_then_let_the_winner_refresh)

    token = loser.get(TEAM, KEY_ID, sign).token

    assert len(reads) == 2  # the stale row, then the winner's after losing
    assert len(sign.calls) == 1
    assert token == winner.get(TEAM, KEY_ID, sign).token == stored_token(engine)


def test_a_stored_token_older_than_the_refresh_age_is_replaced_not_served(
    engine, clock, sign
) -> None:
    ancient = sign_provider_token(KEY, KEY_ID, TEAM, clock.now - timedelta(minutes=61))
    with engine.begin() as connection:
        connection.execute(
            ProviderToken.__table__.insert().values(
                team_id=TEAM, key_id=KEY_ID, token=ancient,
                issued_at=(clock.now - timedelta(minutes=61)).replace(microsecond=0),
            )
        )

    token = ApnsTokenStore(engine, clock=clock).get(TEAM, KEY_ID, sign).token

    assert token != ancient
    assert iat_of(token) == clock.now.replace(microsecond=0)


@pytest.mark.parametrize("refresh_minutes", [20, 40, 55])
def test_no_token_older_than_an_hour_is_ever_served_nor_one_replaced_within_20_minutes(
    engine, clock, sign, refresh_minutes
) -> None:
    """Three replicas asking now and then over five hours: every token served is younger than
    the refresh age (at most 55 minutes), and tokens are issued at least 20 minutes apart."""
    replicas = [
        ApnsTokenStore(engine, refresh_minutes=refresh_minutes, clock=clock) for _ in range(3)
    ]
    served: list[tuple[datetime, str]] = []
    for step in range(5 * 60 // 7):
        clock.advance(minutes=7, seconds=step % 5)
        token = replicas[step % 3].get(TEAM, KEY_ID, sign).token
        served.append((clock.now, token))

    for now, token in served:
        assert now - iat_of(token) < timedelta(minutes=refresh_minutes) <= timedelta(minutes=55)
    issued = sorted({iat_of(token) for _, token in served})
    assert len(issued) == len(sign.calls) > 1
    assert all(b - a >= timedelta(minutes=20) for a, b in itertools.pairwise(issued))


def test_refresh_age_is_validated() -> None:
    engine = create_engine("sqlite://")
    for minutes in (19, 56, 0, 60):
        with pytest.raises(ConfigError, match="PUSH_APNS_TOKEN_REFRESH_MINUTES"):
            ApnsTokenStore(engine, refresh_minutes=minutes)
    assert ApnsTokenStore(engine).refresh_age == timedelta(minutes=40)


def test_refresh_age_comes_from_the_environment(monkeypatch) -> None:
    engine = create_engine("sqlite://")
    monkeypatch.setenv("PUSH_APNS_TOKEN_REFRESH_MINUTES", "25")
    assert ApnsTokenStore.from_env(engine).refresh_age == timedelta(minutes=25)
    for bad in ("19", "56", "forty"):
        monkeypatch.setenv("PUSH_APNS_TOKEN_REFRESH_MINUTES", bad)
        with pytest.raises(ConfigError, match="PUSH_APNS_TOKEN_REFRESH_MINUTES"):
            ApnsTokenStore.from_env(engine)


# -- the provider presenting the shared token ---------------------------------------------------


def device(token: str = "a1" * 32, environment: str = "production") -> Device:
    return Device(id=1, token=token, topic="org.example.wiki", environment=environment)


def make_provider(fake: FakeApns, store: ApnsTokenStore | None, **overrides) -> ApnsProvider:
    settings = {
        "key": fake.key_pem,
        "key_id": fake.key_id,
        "team_id": fake.team_id,
        "production_url": fake.base_url,
        "sandbox_url": fake.base_url,
        "ca_file": fake.ca_path,
        "timeout_seconds": 5.0,
        "token_store": store,
    }
    settings.update(overrides)
    return ApnsProvider(**settings)  # type: ignore[arg-type]


@pytest.fixture
def fake() -> Iterator[FakeApns]:
    with FakeApns(key_pem=KEY) as server:
        yield server


@pytest.fixture
def real_clock() -> FakeClock:
    """Starts at the real time: the fake APNs checks tokens against its own (offset) clock."""
    return FakeClock(utcnow())


@pytest.fixture
async def replicas(engine, fake, real_clock) -> AsyncIterator[list[ApnsProvider]]:
    """Two replicas: providers with token stores of their own, on one database."""
    built = [make_provider(fake, ApnsTokenStore(engine, clock=real_clock)) for _ in range(2)]
    yield built
    for provider in built:
        await provider.aclose()


def bearer(request) -> str:
    scheme, _, token = request.headers["authorization"].partition(" ")
    assert scheme == "bearer"
    return token


async def test_provider_sends_with_the_shared_token(engine, fake, replicas) -> None:
    result = await replicas[0].send(device(), WAKEUP)

    assert result.outcome is Outcome.DELIVERED
    [request] = fake.requests
    assert bearer(request) == stored_token(engine)
    assert fake.provider_tokens == [bearer(request)]


async def test_two_replicas_present_the_same_token(engine, fake, replicas) -> None:
    results = await asyncio.gather(
        *(provider.send(device(), WAKEUP) for provider in replicas for _ in range(10))
    )

    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    assert len(fake.requests) == 20
    assert fake.provider_tokens == [stored_token(engine)]


async def test_sends_within_the_refresh_age_do_not_query_the_database(
    fake, replicas, real_clock, token_queries
) -> None:
    await replicas[0].send(device(), WAKEUP)
    queries = len(token_queries)

    real_clock.advance(minutes=39)
    fake.clock_offset = 39 * 60
    for _ in range(20):
        assert (await replicas[0].send(device(), WAKEUP)).outcome is Outcome.DELIVERED

    assert len(token_queries) == queries
    assert len(fake.provider_tokens) == 1


async def test_replicas_move_to_one_new_token_and_never_present_an_expired_one(
    engine, fake, replicas, real_clock
) -> None:
    await asyncio.gather(*(provider.send(device(), WAKEUP) for provider in replicas))
    [first] = fake.provider_tokens

    # 61 minutes on: the first token would now be refused as expired.
    real_clock.advance(minutes=61)
    fake.clock_offset = 61 * 60
    results = await asyncio.gather(
        *(provider.send(device(), WAKEUP) for provider in replicas for _ in range(10))
    )

    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    assert fake.provider_tokens[0] == first
    assert len(fake.provider_tokens) == 2
    newest = fake.provider_tokens[1]
    assert newest == stored_token(engine)
    assert {bearer(r) for r in fake.requests[2:]} == {newest}


async def test_production_and_sandbox_connections_share_the_token(engine, real_clock) -> None:
    with FakeApns(key_pem=KEY) as production, FakeApns(key_pem=KEY) as sandbox:
        provider = make_provider(
            production,
            ApnsTokenStore(engine, clock=real_clock),
            sandbox_url=sandbox.base_url,
        )
        try:
            await provider.send(device(environment="production"), WAKEUP)
            await provider.send(device(environment="sandbox"), WAKEUP)
        finally:
            await provider.aclose()

    assert production.provider_tokens == sandbox.provider_tokens == [stored_token(engine)]


async def test_provider_signs_locally_when_the_token_store_fails(tmp_path, fake, caplog) -> None:
    unreachable = create_engine(f"sqlite:///{tmp_path / 'missing' / 'push.sqlite3'}")
    provider = make_provider(fake, ApnsTokenStore(unreachable))
    try:
        result = await provider.send(device(), WAKEUP)
    finally:
        await provider.aclose()

    assert result.outcome is Outcome.DELIVERED
    assert len(fake.provider_tokens) == 1
    assert "shared token store failed" in caplog.text


async def test_store_outage_keeps_the_shared_token_until_it_is_nearly_an_hour_old(
    engine, fake, replicas, real_clock, monkeypatch
) -> None:
    provider = replicas[0]
    await provider.send(device(), WAKEUP)
    [shared] = fake.provider_tokens
    store = provider._shared_token._store  # type: ignore[union-attr]

    def down(*args: object) -> str:
        raise OSError("database down")

    monkeypatch.setattr(store, "get", down)
    real_clock.advance(minutes=50)
    fake.clock_offset = 50 * 60
    assert (await provider.send(device(), WAKEUP)).outcome is Outcome.DELIVERED
    assert fake.provider_tokens == [shared]

    real_clock.advance(minutes=6)  # 56 minutes: too close to Apple's hour, sign one here
    fake.clock_offset = 56 * 60
    assert (await provider.send(device(), WAKEUP)).outcome is Outcome.DELIVERED
    assert len(fake.provider_tokens) == 2
    assert bearer(fake.requests[-1]) != shared


async def test_provider_without_a_store_signs_one_token_for_all_its_connections(fake) -> None:
    provider = make_provider(fake, None)
    try:
        await provider.send(device(environment="production"), WAKEUP)
        await provider.send(device(environment="sandbox"), WAKEUP)
    finally:
        await provider.aclose()

    assert provider._shared_token is None
    assert len(fake.provider_tokens) == 1
    assert fake.connections_made == 2


def test_every_app_provider_gets_the_shared_store(fake, monkeypatch) -> None:
    from shared.providers.router import AppRouter, providers_from_env

    store = ApnsTokenStore(create_engine("sqlite://"))
    monkeypatch.setenv("PUSH_APNS_KEY", fake.key_pem)
    monkeypatch.setenv("PUSH_APNS_KEY_ID", fake.key_id)
    monkeypatch.setenv("PUSH_APNS_TEAM_ID", fake.team_id)
    monkeypatch.setenv("PUSH_APPS", json.dumps({"commons": {"apns": {
        "key": fake.key_pem, "key_id": fake.key_id, "team_id": fake.team_id, "topics": ["org.example"]}}}))
    router = providers_from_env(ApnsProvider, token_store=store)
    assert isinstance(router, AppRouter)
    for provider in router.providers.values():
        assert provider._shared_token is not None and provider._shared_token._store is store


async def test_a_token_apple_refused_is_not_handed_to_the_replica_with_the_fixed_key(
    engine, fake, real_clock
) -> None:
    """A wrong key under the right key id signs the shared token; once the key is fixed (a new
    replica with the right one), that token must not be presented again for half an hour."""
    wrong = make_provider(fake, ApnsTokenStore(engine, clock=real_clock), key=make_p8_key())
    refused = await wrong.send(device(), WAKEUP)
    await wrong.aclose()
    fixed = make_provider(fake, ApnsTokenStore(engine, clock=real_clock))
    try:
        result = await fixed.send(device(), WAKEUP)
    finally:
        await fixed.aclose()

    assert (refused.outcome, refused.reason) == (Outcome.CREDENTIALS, "InvalidProviderToken")
    assert result.outcome is Outcome.DELIVERED
