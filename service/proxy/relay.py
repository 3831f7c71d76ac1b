"""One proxied request's way to an upstream answer: pick an account, send, fail over.

An account that answers 429, 5xx or not at all, before anything reached the client, cools down
(until the upstream's ``resets_at``, else a doubling backoff; shared with every process by the
learner) and the request goes to another account, at most ``MAX_ACCOUNTS`` of them. A 401 gets
the account's token refreshed once and the request sent again on it. Any other answer, good or
bad, is the upstream's answer to the client and is passed on as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp

from service.accounts.domain import AccountState
from service.accounts.live import LiveAccounts
from service.accounts.tokens import ReauthRequired, RefreshFailed, TokenManager, Tokens, open_tokens
from service.core.errors import (
    NoAccounts,
    NotReady,
    ServiceError,
    StoreUnavailable,
    UpstreamUnavailable,
    UsageLimitReached,
)
from service.core.secret_box import EncryptionKeyError, SecretBox
from service.proxy import metrics, ratelimits
from service.proxy.balancer import (
    Choice,
    Pin,
    Policy,
    needs_turn,
    pick,
    pin_decides,
    saturated,
)
from service.proxy.candidates import PoolView
from service.proxy.draws import EvenDraws
from service.proxy.learning import Learner
from service.proxy.reservations import RESERVE_BELOW, Reservations
from service.proxy.routing_state import Pinned, RoutingState
from service.proxy.trace import current_trace
from service.proxy.upstream import make_session, request_headers
from service.settings.live import LiveSettings

log = logging.getLogger(__name__)

MAX_ACCOUNTS = 3
# When every account is limited and none says when it recovers, the 429 still needs a time.
UNKNOWN_RESET_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What goes upstream: method, path under the upstream base, body, the client's headers,
    and the thread id for sticky routing (None: not a thread)."""

    method: str
    path: str
    body: bytes
    headers: Iterable[tuple[bytes, bytes]]
    thread_id: str | None = None


@dataclass
class Answer:
    """The upstream's answer, status and headers read, body not yet; the caller must
    ``release`` it once done."""

    response: aiohttp.ClientResponse
    account_id: str
    pinned: bool
    attempts: int
    # When the request that got this answer was sent (``time.perf_counter``), for its timings.
    sent_at: float

    def release(self) -> None:
        self.response.release()


class Relay:
    def __init__(
        self,
        upstream_base_url: str,
        accounts: LiveAccounts,
        view: PoolView,
        settings: LiveSettings,
        routing: RoutingState,
        learner: Learner,
        tokens: TokenManager,
        box: SecretBox,
        reservations: Reservations,
    ):
        # Made when the process starts serving (aiohttp wants a running loop): ``start``.
        self.session: aiohttp.ClientSession | None = None
        self.base = upstream_base_url
        self.accounts = accounts
        self.view = view
        self.settings = settings
        self.routing = routing
        self.learner = learner
        self.tokens = tokens
        self.box = box
        self.reservations = reservations
        # usage_weighted's draws: uniform, and spread evenly over successive picks.
        self.draws = EvenDraws()
        # When each request still waiting for its answer was sent, by account: those sent after
        # the account's last known usage are spending units that usage does not count yet.
        self.inflight: dict[str, list[float]] = {}
        # Opened tokens by account, for the tokens version they were opened at: opening is a
        # decryption, not something to do on every request.
        self._opened: dict[str, tuple[int, Tokens]] = {}

    async def start(self) -> None:
        self.session = make_session()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _policy(self) -> tuple[Policy, int]:
        """How to route, from the live settings, and their version."""
        record = self.settings.current
        if record is None:
            raise NotReady("codex-lb is not ready to serve requests")
        policy = Policy(
            record.routing_strategy,
            record.prefer_earlier_reset_accounts,
            record.sticky_threads_enabled,
        )
        return policy, record.version

    async def _choose(
        self,
        policy: Policy,
        thread_id: str | None,
        pinned_to: Pinned | None,
        failed: frozenset[str],
        spoken: set[str],
    ) -> tuple[Choice, str] | None:
        """The next account to try, and the unit reserved for it ("" if none was needed);
        ``spoken`` gathers those passed over because their last units are spoken for."""
        pool = self.view.current(time.time())
        pin = (
            None
            if thread_id is None or pinned_to is None
            else Pin(thread_id, pinned_to.account_id, pinned_to.detour)
        )
        turn = 0
        if needs_turn(policy) and not pin_decides(pool, policy, pin, failed):
            turn = await self.routing.next_turn()
            pool = self.view.current(time.time())  # the await may have let news in
        skip = failed
        while True:
            choice = pick(pool, policy, pin, turn=turn, rand=self.draws, exclude=skip)
            if choice is None:
                return None
            account_id = choice.account_id
            if not saturated(pool, account_id, self._inflight(choice)):
                units = pool.by_id[account_id].remaining_units
                if units is None or units > RESERVE_BELOW:
                    return choice, ""
                # Its last units: take one where every process sees it.
                known_at = self.view.states.get(account_id).usage_at
                unit = await self.reservations.take(account_id, units, known_at)
                if unit is not None:
                    return choice, unit
            # Its last units are already spoken for by requests on their way: another account
            # (a pin is skipped, not moved, like a limited one).
            spoken.add(account_id)
            skip = skip | {account_id}

    def _inflight(self, choice: Choice) -> int:
        """Requests on their way to the account that its last known usage cannot count: sent
        after that usage was learned. (The upstream counts a request when it arrives, so the
        ones sent earlier are already in the percent it reported.)"""
        sent = self.inflight.get(choice.account_id)
        if not sent:
            return 0
        known_at = self.view.states.get(choice.account_id).usage_at
        return sum(1 for at in sent if at > known_at)

    def _refusal(self, spoken: set[str]) -> ServiceError:
        """Why no account could be picked: every serving account held back by its usage
        limit, or with its last units already spoken for by requests under way (429 with the
        earliest reset), or none at all (503, which clients retry)."""
        now = time.time()
        pool = self.view.current(now)
        if pool.all_limited():
            return UsageLimitReached(pool.recovers_at() or now + UNKNOWN_RESET_SECONDS)
        serving = {c.account_id for c in pool.eligible.members}
        if not spoken or not serving <= spoken:
            return NoAccounts()
        # Each gets units back when its window resets (the short one, if known).
        resets = [
            at
            for i in spoken
            if (c := pool.by_id.get(i)) is not None
            and (at := c.primary.reset_at or c.secondary.reset_at) is not None
            and at > now
        ]
        resets += [c.available_at for c in pool.candidates if c.usage_limited and c.available_at]
        return UsageLimitReached(min(resets, default=now + UNKNOWN_RESET_SECONDS))

    async def open(self, out: Outgoing) -> Answer:
        policy, version = self._policy()
        sticky = policy.sticky_threads_enabled and out.thread_id is not None
        pinned_to = await self.routing.pinned(out.thread_id) if sticky and out.thread_id else None
        failed: set[str] = set()
        spoken: set[str] = set()
        broken = 0  # accounts whose upstream failed (5xx) or did not answer
        limits: list[float] = []  # accounts that answered 429: when each recovers
        trace = current_trace()
        if trace is not None:
            trace.settings_version = version
        for attempt in range(1, MAX_ACCOUNTS + 1):
            chosen = await self._choose(policy, out.thread_id, pinned_to, frozenset(failed), spoken)
            if chosen is None:
                break
            choice, unit = chosen
            if trace is not None:
                trace.attempts = attempt
            account = self.accounts.accounts.get(choice.account_id)
            if account is None:  # deleted between the pick and now
                self.reservations.give_back(choice.account_id, unit)
                failed.add(choice.account_id)
                metrics.failover("account_gone")
                continue
            failed.add(account.id)
            metrics.selected(account.id, policy.routing_strategy)
            sent_at = time.perf_counter()
            try:
                response = await self._send(account, out)
            except ReauthRequired as exc:
                # Marked for re-import by the token manager: it leaves the pool by itself.
                log.warning("account %s skipped: %s", account.id, exc)
                metrics.failover("reauth_required")
                continue
            except RefreshFailed as exc:
                # The auth server is not answering: try this account again later.
                log.warning("account %s skipped: %s", account.id, exc)
                self.learner.failed(account.id, time.time(), None)
                metrics.failover("refresh_failed")
                metrics.cooldown("refresh_failed")
                continue
            except StoreUnavailable:
                # Its token needs a refresh, and a refresh needs Redis (the refresh token is
                # single-use: only one process may spend it). Other accounts' tokens still
                # serve while Redis is away.
                log.warning("account %s skipped: its token refresh needs Redis", account.id)
                continue
            except EncryptionKeyError:
                log.error("account %s skipped: its tokens do not open with this key", account.id)
                self.learner.failed(account.id, time.time(), None)
                continue
            finally:
                # The answer's usage (learned below) counts the request from now on.
                self.reservations.give_back(account.id, unit)
            now = time.time()
            if response is None:
                broken += 1
                self.learner.failed(account.id, now, None)
                metrics.failover("unreachable")
                metrics.cooldown("unreachable")
                continue
            metrics.upstream_first_byte(time.perf_counter() - sent_at)
            self._learn_headers(account.id, response, now)
            if response.status == 429 or response.status >= 500:
                resets_at = None
                if response.status == 429:
                    resets_at = ratelimits.limit_resets_at(await _read_quietly(response), now)
                response.release()
                limited = response.status == 429
                cooldown = self.learner.failed(account.id, now, resets_at, limited=limited)
                if limited:
                    limits.append(cooldown.until or now + UNKNOWN_RESET_SECONDS)
                else:
                    broken += 1
                cause = "rate_limited" if limited else "upstream_error"
                metrics.failover(cause)
                metrics.cooldown(cause)
                log.info(
                    "account %s answered %s (upstream x-request-id %s); cooling down",
                    account.id,
                    response.status,
                    response.headers.get("x-request-id", "-"),
                )
                continue
            if response.status == 401:
                # Refreshed and sent again in _send already: this account cannot serve now.
                response.release()
                metrics.failover("unauthorized")
                continue
            self.learner.served(account.id, now)
            if sticky and out.thread_id is not None:
                metrics.sticky(hit=choice.pinned, had_pin=pinned_to is not None, moved=choice.repin)
                if choice.repin:
                    self.routing.pin(out.thread_id, account.id, replace=pinned_to is not None)
                elif choice.detour and pinned_to is not None:
                    self.routing.pin(
                        out.thread_id, pinned_to.account_id, replace=True, detour=account.id
                    )
            if trace is not None:
                trace.account_id, trace.thread_sticky = account.id, choice.pinned
                trace.upstream_request_id = response.headers.get("x-request-id")
            return Answer(response, account.id, choice.pinned, attempt, sent_at)
        if broken:
            raise UpstreamUnavailable()
        if limits:
            recovers = self.view.current(time.time()).recovers_at()
            raise UsageLimitReached(min([*limits, recovers] if recovers else limits))
        raise self._refusal(spoken)

    async def _send(self, account: AccountState, out: Outgoing) -> aiohttp.ClientResponse | None:
        """The upstream's answer on ``account`` (a 401 refreshes the token and tries once more),
        or None when it could not be reached. Raises ``ReauthRequired`` or ``RefreshFailed``
        when the account's tokens cannot be had."""
        version, tokens = await self._tokens(account)
        response = await self._request(account, tokens, out)
        if response is not None and response.status == 401:
            response.release()
            tokens = await self.tokens.refresh(account.id, version)
            self._opened[account.id] = (account.tokens_version, tokens)
            response = await self._request(account, tokens, out)
        return response

    async def _tokens(self, account: AccountState) -> tuple[int, Tokens]:
        opened = self._opened.get(account.id)
        if opened is None or opened[0] != account.tokens_version:
            tokens = open_tokens(self.box, account.sealed_tokens)
            opened = (account.tokens_version, tokens)
            self._opened[account.id] = opened
        version, tokens = opened
        if tokens.expiring(time.time()):
            tokens = await self.tokens.refresh(account.id, version)
            self._opened[account.id] = (version, tokens)
        return version, tokens

    async def _request(
        self, account: AccountState, tokens: Tokens, out: Outgoing
    ) -> aiohttp.ClientResponse | None:
        headers = request_headers(out.headers, tokens.access_token, account.chatgpt_account_id)
        if self.session is None:
            raise NotReady("codex-lb is not ready to serve requests")
        sent_at = time.time()
        waiting = self.inflight.setdefault(account.id, [])
        waiting.append(sent_at)
        try:
            return await self.session.request(
                out.method, self.base + out.path, data=out.body or None, headers=headers
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("account %s: the upstream could not be reached (%s)", account.id, exc)
            return None
        finally:
            waiting.remove(sent_at)
            if not waiting:
                self.inflight.pop(account.id, None)

    def _learn_headers(self, account_id: str, response: aiohttp.ClientResponse, now: float) -> None:
        usage = ratelimits.from_headers(response.headers, now)
        if usage is not None:
            self.learner.usage(account_id, usage, now)

    def learn_event(self, account_id: str, data: bytes) -> None:
        """A ``codex.rate_limits`` event from the middle of a stream."""
        now = time.time()
        usage = ratelimits.from_event(data, now)
        if usage is not None:
            self.learner.usage(account_id, usage, now)


async def _read_quietly(response: aiohttp.ClientResponse) -> bytes:
    try:
        return await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return b""
