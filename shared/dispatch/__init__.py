"""The dispatcher behind ``dispatch-fcm``, ``dispatch-apns`` and ``dispatch-webpush``.

Each receives every ``notification.requested.v1`` event (the broker fans it out), serves only its
own provider's subscriptions of the event's users, and answers so that the broker redelivers the
event exactly when some device still needs it:

- 202, empty: done (every device delivered, dead, or refused for good);
- 200 with a ``subscription.invalid.v1`` reply event: done, and these tokens are dead (when no
  ``K_SINK`` is bound; with one, the report is posted there and the answer is 202);
- 429 or 503 with Retry-After: some sends were transient, or in flight in another invocation;
  the redelivered event skips the devices already served (see :mod:`shared.deliveries`);
- 400/422: the event is malformed and retrying will not help.

The same dispatcher also accepts today's Echo request, ``POST /v1/message/{fcm,apns}``, so an Echo
install can point its push service URL here.

Where each part lives:

- :mod:`.admission`: the HTTP side: load shedding, reading and routing a request, its log line;
- :mod:`.dispatcher`: the core: claims against the delivery ledger, the privacy delay's queue,
  recording outcomes; it holds the collaborators below;
- :mod:`.limits`: per-event-type limits and their refunds;
- :mod:`.sending`: the send loop, with its deadline, handing each outcome to be recorded as it comes;
- :mod:`.report`: what an event came to (:class:`DispatchReport`);
- :mod:`.flush`: the flush of delayed and kept wake-ups on a tick;
- :mod:`.echo`: Echo's request;
- :mod:`.dead_tokens`: the answer, with the dead-token reply or its post to ``K_SINK``.

Its settings are :class:`shared.settings.DispatchSettings`, read once at start-up.

Every module logs as ``shared.dispatch``, the one logger operators filter on.
"""
from shared.dispatch.dispatcher import Dispatcher
from shared.dispatch.report import DispatchReport

__all__ = ["DispatchReport", "Dispatcher"]
