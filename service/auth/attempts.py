"""Failed-attempt limits for passwords, bootstrap tokens and TOTP codes.

At most 10 failures per client address per 15 minutes and 100 per hour overall. A slot is
reserved atomically before the secret is checked and given back on success, so a burst of
concurrent guesses cannot overshoot the limit on any number of replicas.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from service.errors import RateLimited, ServiceError
from service.redis_store import Store

PER_CLIENT = (10, 15 * 60)
OVERALL = (100, 60 * 60)


async def checked(
    store: Store, client_ip: str, check: Callable[[], Awaitable[bool]], failure: ServiceError
) -> None:
    """Run ``check`` under the limits; raise ``failure`` if it says no, 429 if over the limit."""
    wait = await store.begin_attempt(client_ip, [PER_CLIENT, OVERALL])
    if wait:
        raise RateLimited(wait)
    if not await check():
        raise failure
    await store.refund_attempt(client_ip)
