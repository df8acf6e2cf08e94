"""One-request forms of the stores' batch entry points, for tests that set up a row or two.

The code has only the batch forms (subscribe writes every request that arrived meanwhile in one
transaction, a dispatcher claims the devices of several events in one); these call them with one
request, as the code would for a request that came alone.
"""
from __future__ import annotations

from collections.abc import Sequence

from shared.db import run_transaction
from shared.deliveries import Claims, DeliveryLedger
from shared.subscriptions import NewSubscription, SubscribeRequest, SubscribeResult, SubscriptionStore


def subscribe(store: SubscriptionStore, user_id: str, new: NewSubscription) -> SubscribeResult:
    """Create, refresh or move ``user_id``'s subscription, as subscribe does."""
    [result] = store.subscribe_many([SubscribeRequest(user_id, new)])
    if isinstance(result, Exception):
        raise result
    assert result is not None  # only a refusing ``admit`` leaves a request unwritten
    return result


def claim(ledger: DeliveryLedger, event_key: str, subscription_ids: Sequence[int]) -> Claims:
    """Claim the event's devices that are not done or in flight elsewhere, as a dispatcher does."""
    return run_transaction(
        ledger.engine, lambda connection: ledger.claim_many_in(connection, [(event_key, subscription_ids)])[0]
    )
