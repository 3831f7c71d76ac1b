"""Account tokens: sealed at rest, opened on use, refreshed once per account deployment-wide.

Refresh tokens are single-use upstream: two processes refreshing one account at once would
lose it (``refresh_token_reused``). So a refresh takes a short Redis lease for the account;
whoever holds it exchanges the token and stores the result with a compare-and-set on the
account's ``tokens_version``. Everyone else, in this process (a lock) or another (the lease),
waits and then reads the tokens the winner stored.

The lease must last as long as the holder may still spend the token or store its successor,
or a second process would spend the token again, be refused, and kill an account the first
one has just refreshed. So while it exchanges and stores, the holder renews its lease in the
background every third of the lease's length; and the exchange itself is bounded well inside
one lease length, so the lease outlives it even if no renewal gets through. After a successful
exchange the old refresh token is spent, so storing the new tokens is retried for a bounded
time while the lease is ours. A refused token marks the account ``reauth_required`` only if
its ``tokens_version`` is still the one the exchange started from: if it moved, someone else
stored fresh tokens meanwhile, and those are returned instead. The lease is released only by
its owner (``release_lease`` checks), so a holder whose lease was lost frees nobody else's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import msgspec

from service.accounts.authjson import AuthJsonError, jwt_claims
from service.accounts.domain import AccountState
from service.accounts.store import AccountStore
from service.core.control_client import account_headers as _headers
from service.core.errors import StoreUnavailable
from service.core.leases import HeldLease, Leases
from service.core.secret_box import SecretBox

log = logging.getLogger(__name__)

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
SCOPE = "openid profile email"
REFRESH_MARGIN_SECONDS = 300.0
LEASE_SECONDS = 30.0
# The lease is renewed while an exchange runs, so the bound need not fit inside it: it only ends
# an exchange that is truly stuck. Giving up early would be worse than waiting: the upstream may
# still spend the single-use refresh token, and then nobody has the new one. (The shared
# client's own timeouts are per read, not per exchange: a trickling reply outlasts them.)
EXCHANGE_SECONDS = 120.0
WAIT_SECONDS = 20.0
STORE_RETRY_DELAYS = (0.05, 1.0)  # first and longest pause between attempts to store
# The upstream says the refresh token can never work again: only a re-import helps.
DEAD_GRANT_ERRORS = frozenset(
    {"invalid_grant", "refresh_token_reused", "refresh_token_expired", "refresh_token_invalidated"}
)


class Tokens(msgspec.Struct, kw_only=True, frozen=True):
    access_token: str
    refresh_token: str
    id_token: str
    access_expires_at: float | None = None
    refreshed_at: float | None = None

    def expiring(self, now: float | None = None) -> bool:
        if self.access_expires_at is None:
            return False
        now = time.time() if now is None else now
        return self.access_expires_at - now < REFRESH_MARGIN_SECONDS


class _OAuthReply(msgspec.Struct, kw_only=True):
    access_token: str
    refresh_token: str | None = None
    id_token: str | None = None
    expires_in: float | None = None


class _OAuthError(msgspec.Struct, kw_only=True):
    error: str | dict[str, object] | None = None


class ReauthRequired(Exception):
    """The account's refresh token is dead; the account was marked ``reauth_required``."""


class RefreshFailed(Exception):
    """A passing failure (network, upstream 5xx, lease wait timed out); try again later."""


class _DeadGrant(Exception):
    """The upstream refused the refresh token for good."""


_tokens_decoder = msgspec.json.Decoder(Tokens)
_reply_decoder = msgspec.json.Decoder(_OAuthReply)
_error_decoder = msgspec.json.Decoder(_OAuthError)


def seal(box: SecretBox, tokens: Tokens) -> bytes:
    return box.seal(msgspec.json.encode(tokens).decode())


def open_tokens(box: SecretBox, sealed: bytes) -> Tokens:
    return _tokens_decoder.decode(box.open(sealed))


def access_expiry(access_token: str) -> float | None:
    try:
        exp = jwt_claims(access_token).get("exp")
    except AuthJsonError:
        return None
    return float(exp) if isinstance(exp, int | float) else None


def account_headers(tokens: Tokens, account: AccountState) -> dict[str, str]:
    return _headers(tokens.access_token, account.chatgpt_account_id)


def _error_code(response: httpx.Response) -> str:
    try:
        error = _error_decoder.decode(response.content).error
    except msgspec.DecodeError:
        return ""
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return code if isinstance(code, str) else ""
    return error or ""


class TokenManager:
    def __init__(
        self,
        leases: Leases,
        accounts: AccountStore,
        box: SecretBox,
        http: httpx.AsyncClient,
        auth_base_url: str,
        *,
        lease_seconds: float = LEASE_SECONDS,
        exchange_seconds: float = EXCHANGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        """``lease_seconds`` is the refresh lease's length (renewed every third of it while
        held); ``exchange_seconds`` bounds one exchange with the OAuth server; ``clock`` is the
        wall clock that decides expiry."""
        self.leases = leases
        self.accounts = accounts
        self.box = box
        self.http = http
        self.token_url = f"{auth_base_url}/oauth/token"
        self.lease_seconds = lease_seconds
        self.exchange_seconds = exchange_seconds
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        # Exchanges under way, each in a task of its own: see ``_refresh``.
        self._inflight: set[asyncio.Task[tuple[int, Tokens]]] = set()

    async def get_as(self, account: AccountState, url: str) -> httpx.Response:
        """GET an upstream control route as ``account``: its token refreshed first if about to
        expire, and once more (then retried) if the upstream refuses it."""
        version, tokens = account.tokens_version, open_tokens(self.box, account.sealed_tokens)
        if tokens.expiring(self.clock()):
            version, tokens = await self._refresh(account.id, version)
        response = await self.http.get(url, headers=account_headers(tokens, account))
        if response.status_code == 401:
            version, tokens = await self._refresh(account.id, version)
            response = await self.http.get(url, headers=account_headers(tokens, account))
        return response

    async def _stored(self, account_id: str) -> tuple[int, Tokens]:
        fields = await self.accounts.get(account_id)
        if fields is None:
            raise ReauthRequired(f"account {account_id} no longer exists")
        if fields.get("status") == "reauth_required":
            raise ReauthRequired(f"account {account_id} needs to be imported again")
        return int(fields["tokens_version"]), open_tokens(self.box, fields["tokens"].encode())

    async def refresh(self, account_id: str, seen_version: int) -> Tokens:
        """Tokens newer than ``seen_version``: exchanged here, or by whoever got there first."""
        return (await self._refresh(account_id, seen_version))[1]

    async def _refresh(self, account_id: str, seen_version: int) -> tuple[int, Tokens]:
        lock = self._locks.setdefault(account_id, asyncio.Lock())
        async with lock:
            version, tokens = await self._stored(account_id)
            if version > seen_version:
                return version, tokens
            lease = HeldLease(self.leases, f"refresh:{account_id}", self.lease_seconds)
            deadline = time.monotonic() + WAIT_SECONDS
            while not await lease.acquire():
                # Another process is exchanging this account's token: wait for its result.
                await asyncio.sleep(0.05)
                version, tokens = await self._stored(account_id)
                if version > seen_version:
                    return version, tokens
                if time.monotonic() > deadline:
                    raise RefreshFailed("timed out waiting for another process's refresh")
            # Its own task, shielded from the caller: a caller cancelled mid-exchange (a client
            # gone, shutdown) must not abandon a refresh token the upstream may already have
            # spent before the new tokens are stored. ``drain`` waits for these at shutdown.
            task = asyncio.create_task(
                self._exchange_and_store(account_id, seen_version, lease),
                name=f"refresh {account_id}",
            )
            self._inflight.add(task)
            task.add_done_callback(self._finished)
            return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[tuple[int, Tokens]]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here, so a refresh whose caller is gone does not warn at exit; the
            # caller, if still there, gets the exception through the shield.
            log.debug("refresh task ended with %s", type(task.exception()).__name__)

    async def drain(self, seconds: float) -> None:
        """Let the exchanges under way finish storing their tokens (shutdown)."""
        if not self._inflight:
            return
        _, pending = await asyncio.wait(set(self._inflight), timeout=seconds)
        if pending:
            log.error("%s token refresh(es) still running at shutdown; abandoned", len(pending))

    async def _exchange_and_store(
        self, account_id: str, seen_version: int, lease: HeldLease
    ) -> tuple[int, Tokens]:
        try:
            version, tokens = await self._stored(account_id)
            if version > seen_version:
                return version, tokens
            try:
                fresh = await self._exchange(tokens)
            except _DeadGrant:
                return await self._refused(account_id, version)
            return await self._store_fresh(account_id, version, fresh, lease)
        finally:
            await lease.release()

    async def _refused(self, account_id: str, version: int) -> tuple[int, Tokens]:
        """The token we started from was refused: the account needs re-import, unless someone
        stored newer tokens meanwhile (then the refusal says only that they spent ours)."""
        marked = await self.accounts.update(
            account_id, {"status": "reauth_required"}, only_if=("tokens_version", str(version))
        )
        if marked < 0:
            raise ReauthRequired(f"account {account_id} no longer exists")
        if marked == 0:
            log.info("account %s: refresh token refused, but newer tokens were stored", account_id)
            return await self._stored(account_id)
        log.warning("account %s needs re-import: its refresh token was refused", account_id)
        raise ReauthRequired(f"account {account_id} needs to be imported again")

    async def _store_fresh(
        self, account_id: str, version: int, fresh: Tokens, lease: HeldLease
    ) -> tuple[int, Tokens]:
        """Store tokens just exchanged. The old refresh token is spent, so these are the
        account's only working ones: a passing store failure is retried for up to one lease
        length, and only while the lease is surely ours (no other process is exchanging)."""
        sealed = seal(self.box, fresh)
        give_up = time.monotonic() + self.lease_seconds
        delay, longest = STORE_RETRY_DELAYS
        while True:
            try:
                written = await self.accounts.update(
                    account_id,
                    {"tokens": sealed},
                    only_if=("tokens_version", str(version)),
                    increment="tokens_version",
                )
                break
            except StoreUnavailable:
                # Keep a margin: the lease may lapse between our check and the next attempt.
                stop = min(give_up, lease.held_until - self.lease_seconds / 10)
                now = time.monotonic()
                if now >= stop:
                    log.error(
                        "account %s: its token was refreshed but the new tokens could not be "
                        "stored; its old refresh token is spent, so it may need re-import",
                        account_id,
                    )
                    raise RefreshFailed("the refreshed tokens could not be stored") from None
                log.warning("account %s: storing refreshed tokens failed; retrying", account_id)
                await asyncio.sleep(min(delay, stop - now))
                delay = min(delay * 2, longest)
        if written == 0:
            # An attempt that failed on the way back may have written after all.
            stored_version, stored = await self._stored(account_id)
            if stored == fresh:
                written = stored_version
        if written <= 0:
            raise RefreshFailed("account changed while its token was refreshed")
        log.info("refreshed the access token of account %s", account_id)
        return version + 1, fresh

    async def _exchange(self, tokens: Tokens) -> Tokens:
        body = {
            "grant_type": "refresh_token",
            "client_id": CLIENT_ID,
            "refresh_token": tokens.refresh_token,
            "scope": SCOPE,
        }
        try:
            async with asyncio.timeout(self.exchange_seconds):
                response = await self.http.post(self.token_url, json=body)
        except TimeoutError:
            raise RefreshFailed(
                f"token refresh got no answer within {self.exchange_seconds:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise RefreshFailed(f"token refresh failed: {type(exc).__name__}") from None
        if response.status_code in (400, 401) and _error_code(response) in DEAD_GRANT_ERRORS:
            raise _DeadGrant()
        if response.status_code != 200:
            raise RefreshFailed(f"token refresh answered {response.status_code}")
        try:
            reply = _reply_decoder.decode(response.content)
        except msgspec.DecodeError:
            raise RefreshFailed("token refresh answered an unreadable body") from None
        now = self.clock()
        expires_at = access_expiry(reply.access_token)
        if expires_at is None and reply.expires_in is not None:
            expires_at = now + reply.expires_in
        return Tokens(
            access_token=reply.access_token,
            refresh_token=reply.refresh_token or tokens.refresh_token,
            id_token=reply.id_token or tokens.id_token,
            access_expires_at=expires_at,
            refreshed_at=now,
        )
