"""Subscribe requests written together (group commit): the subscribe function hands the store
every request that arrived while the previous batch was written, and the outcome must be that of
running them one by one, in order, each whole or not at all."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from shared.db import DatabaseUnavailable
from shared.models import Subscription
from shared.ratelimits import RateLimiter
from shared.settings import Limit
from shared.subscriptions import NewSubscription, SubscribeRequest, SubscriptionStore
from tests import subscription_bodies as bodies
from tests.stores import subscribe

T0 = datetime(2026, 1, 1, 10, 0, 0)


def fcm(token: str) -> NewSubscription:
    return NewSubscription("fcm", token, token)


def owners(engine) -> dict[str, str]:
    """Token -> user, of every stored subscription."""
    with Session(engine) as session:
        return {token: user for token, user in session.execute(select(Subscription.token, Subscription.user_id))}


def store_at(engine, cap: int = 10) -> SubscriptionStore:
    moments = iter(T0 + timedelta(seconds=n) for n in range(1000))
    return SubscriptionStore(engine, cap=cap, clock=lambda: next(moments))


def test_each_request_of_a_batch_gets_its_own_result(engine):
    store = store_at(engine)
    subscribe(store, "alice", fcm("kept"))
    results = store.subscribe_many(
        [SubscribeRequest("alice", fcm("kept")), SubscribeRequest("bob", fcm("b1")), SubscribeRequest("carol", fcm("c1"))]
    )
    assert [(r.subscription.user_id, r.subscription.token, r.created) for r in results] == [
        ("alice", "kept", False), ("bob", "b1", True), ("carol", "c1", True),
    ]
    assert len({r.subscription.id for r in results}) == 3
    assert owners(engine) == {"kept": "alice", "b1": "bob", "c1": "carol"}


def test_refreshes_in_a_batch_each_write_their_own_values(engine):
    store = store_at(engine)
    token_a, token_b = "aa" * 32, "bb" * 32
    first = [
        subscribe(store, user, NewSubscription("apns", token, token, "org.a", "production"))
        for user, token in (("alice", token_a), ("bob", token_b))
    ]
    again = store.subscribe_many([
        SubscribeRequest("alice", NewSubscription("apns", token_a, token_a, "org.a", "sandbox")),
        SubscribeRequest("bob", NewSubscription("apns", token_b, token_b, "org.b", "production")),
    ])
    assert [r.subscription.id for r in again] == [r.subscription.id for r in first]
    assert not any(r.created for r in again)
    with Session(engine) as session:
        rows = session.scalars(select(Subscription))
        stored = {row.user_id: (row.topic, row.environment, row.updated_at) for row in rows}
    assert stored == {
        "alice": ("org.a", "sandbox", again[0].subscription.updated_at),
        "bob": ("org.b", "production", again[1].subscription.updated_at),
    }


def test_requests_of_distinct_users_share_one_transaction(engine):
    commits: list[object] = []

    def committed(connection) -> None:
        commits.append(connection)

    event.listen(engine, "commit", committed)
    try:
        store_at(engine).subscribe_many([SubscribeRequest(f"user{n}", fcm(f"t{n}")) for n in range(20)])
    finally:
        event.remove(engine, "commit", committed)
    assert len(commits) == 1
    assert len(owners(engine)) == 20


def test_a_device_named_twice_in_a_batch_ends_with_the_last_user_under_a_new_id(engine):
    first, second = store_at(engine).subscribe_many(
        [SubscribeRequest("alice", fcm("shared")), SubscribeRequest("bob", fcm("shared"))]
    )
    assert first.created and second.created
    assert second.subscription.id != first.subscription.id
    assert owners(engine) == {"shared": "bob"}


def test_one_users_requests_in_a_batch_respect_the_cap_in_order(engine):
    results = store_at(engine, cap=2).subscribe_many([SubscribeRequest("alice", fcm(f"t{n}")) for n in range(4)])
    assert [r.evicted for r in results] == [0, 0, 1, 1]
    assert owners(engine) == {"t2": "alice", "t3": "alice"}


def test_a_device_moved_away_in_a_batch_frees_room_under_its_old_owners_cap(engine):
    store = store_at(engine, cap=2)
    subscribe(store, "alice", fcm("phone"))
    subscribe(store, "alice", fcm("tablet"))
    moved, added = store.subscribe_many([SubscribeRequest("bob", fcm("phone")), SubscribeRequest("alice", fcm("laptop"))])
    assert moved.created and added.evicted == 0
    assert owners(engine) == {"phone": "bob", "tablet": "alice", "laptop": "alice"}


def test_a_device_evicted_in_a_batch_is_subscribed_anew_by_the_user_naming_it(engine):
    store = store_at(engine, cap=1)
    subscribe(store, "alice", fcm("phone"))
    added, taken = store.subscribe_many([SubscribeRequest("alice", fcm("tablet")), SubscribeRequest("bob", fcm("phone"))])
    assert added.evicted == 1 and taken.created
    assert owners(engine) == {"tablet": "alice", "phone": "bob"}


def test_a_failed_transaction_fails_only_its_own_requests_and_the_others_are_written(engine):
    store = store_at(engine)
    calls = []

    def admit(connection, user_ids):
        calls.append(list(user_ids))
        if len(calls) == 2:
            raise RuntimeError("the second transaction fails")
        return [True] * len(user_ids)

    # Alice twice: two groups, so two transactions.
    results = store.subscribe_many(
        [SubscribeRequest("alice", fcm("a0")), SubscribeRequest("bob", fcm("b0")),
         SubscribeRequest("alice", fcm("a1")), SubscribeRequest("carol", fcm("c0"))],
        admit,
    )
    assert [type(r).__name__ for r in results] == [
        "SubscribeResult", "SubscribeResult", "RuntimeError", "RuntimeError"]
    assert owners(engine) == {"a0": "alice", "b0": "bob"}


def test_once_the_database_is_unavailable_the_groups_left_are_not_tried(engine):
    store = store_at(engine)
    calls = []

    def admit(connection, user_ids):
        calls.append(list(user_ids))
        raise DatabaseUnavailable("the database went away")

    results = store.subscribe_many(
        [SubscribeRequest("alice", fcm("a0")), SubscribeRequest("alice", fcm("a1"))], admit
    )
    assert [type(r) for r in results] == [DatabaseUnavailable, DatabaseUnavailable]
    assert calls == [["alice"]]


def test_requests_refused_by_the_rate_limit_write_nothing_and_the_others_go_through(engine):
    store = store_at(engine)
    limiter = RateLimiter(engine, store.clock)
    limit = Limit(2, 3600)

    def admit(connection, user_ids):
        return limiter.hit_in(connection, [f"subscribe\n{user}" for user in user_ids], limit)

    results = store.subscribe_many(
        [SubscribeRequest("alice", fcm(f"a{n}")) for n in range(3)] + [SubscribeRequest("bob", fcm("b0"))], admit
    )
    assert [r is not None for r in results] == [True, True, False, True]
    assert owners(engine) == {"a0": "alice", "a1": "alice", "b0": "bob"}


def test_hits_on_one_key_in_one_call_take_the_free_slots_in_order(engine):
    limiter = RateLimiter(engine, lambda: T0)
    limit = Limit(2, 3600)
    assert limiter.hit(["k", "other", "k", "k"], limit) == [True, True, True, False]
    assert limiter.hit(["k", "other"], limit) == [False, True]


def test_a_refund_after_refused_hits_frees_one_slot(engine):
    limiter = RateLimiter(engine, lambda: T0)
    limit = Limit(1, 3600)
    assert limiter.hit(["k", "k"], limit) == [True, False]
    limiter.refund(["k"], limit)
    assert limiter.hit(["k", "k"], limit) == [True, False]


async def test_concurrent_subscribes_of_one_user_are_admitted_up_to_the_rate_limit(
    function_client, auth_env, engine, monkeypatch
):
    monkeypatch.setenv("PUSH_SUBSCRIBE_RATE_LIMIT", "3/day")
    subscribe = function_client("subscribe")
    answers = await asyncio.gather(
        *(subscribe.post("/", json=bodies.fcm(), headers=auth_env.headers("42")) for _ in range(6))
    )
    assert sorted(a.status_code for a in answers) == [201] * 3 + [429] * 3
    assert len(owners(engine)) == 3
