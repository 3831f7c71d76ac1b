"""Failed-attempt limits for passwords, bootstrap tokens and TOTP codes.

At most 10 failures per client address per 15 minutes and 100 per hour overall. A slot is
reserved atomically before the secret is checked and given back on success, so a burst of
concurrent guesses cannot overshoot the limit on any number of replicas.

A caller without a client address (a trusted proxy that sent no usable ``X-Forwarded-For``) gets
no guess at all: giving all of them one shared bucket would let one attacker lock everybody out,
and giving each none would let them guess without limit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from service.auth import metrics
from service.auth.store import AuthStore
from service.core.errors import RateLimited, ServiceError
from service.core.peers import Address

log = logging.getLogger(__name__)

PER_CLIENT = (10, 15 * 60)
OVERALL = (100, 60 * 60)
NO_CLIENT_ADDRESS = (
    "Refused: the trusted proxy in front of codex-lb sent no usable X-Forwarded-For, so this "
    "client's address is unknown"
)


async def checked(
    store: AuthStore,
    client: Address | None,
    check: Callable[[], Awaitable[bool]],
    failure: ServiceError,
) -> None:
    """Run ``check`` under the limits; raise ``failure`` if it says no, 429 if over the limit."""
    if client is None:
        log.warning(
            "refused a credential check from a trusted proxy without a usable X-Forwarded-For"
        )
        metrics.login_failed(failure.code)
        raise type(failure)(NO_CLIENT_ADDRESS)
    client_ip = str(client)
    wait = await store.begin_attempt(client_ip, [PER_CLIENT, OVERALL])
    if wait:
        metrics.login_failed(RateLimited.code)
        raise RateLimited(wait)
    if not await check():
        metrics.login_failed(failure.code)
        raise failure
    await store.refund_attempt(client_ip)
