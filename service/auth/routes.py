"""``/api/dashboard-auth/*``: first-run setup, login, TOTP, logout, password change.

These routes sit outside the gate's session requirement and check the session they need
themselves: none, a TOTP-pending one (``/totp/verify``) or a full one.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.auth import totp
from service.auth.attempts import checked
from service.auth.credentials import Credentials
from service.auth.schemas import (
    PasswordChange,
    PasswordLogin,
    PasswordSetup,
    SessionView,
    TotpCodeBody,
    TotpSetupView,
)
from service.auth.sessions import Sessions, cookie_token, token_hash
from service.auth.store import AuthStore, SessionRecord
from service.config import Config
from service.core.bodies import drain_empty_body, json_response, read_json
from service.core.endpoints import Endpoint
from service.core.errors import (
    InvalidBootstrapToken,
    InvalidCredentials,
    InvalidTotpCode,
    InvalidTotpConfig,
    PasswordAlreadyConfigured,
    RateLimited,
    Unauthorized,
)
from service.core.peers import Address, client_address
from service.settings.domain import read_settings
from service.settings.live import LiveSettings
from service.settings.store import SettingsStore

PREFIX = "/api/dashboard-auth"

_setup_decoder = msgspec.json.Decoder(PasswordSetup)
_login_decoder = msgspec.json.Decoder(PasswordLogin)
_change_decoder = msgspec.json.Decoder(PasswordChange)
_code_decoder = msgspec.json.Decoder(TotpCodeBody)


@dataclass(frozen=True)
class AuthRoutes:
    store: AuthStore
    sessions: Sessions
    creds: Credentials
    settings_store: SettingsStore
    settings: LiveSettings
    config: Config

    async def _session_view(self, session: SessionRecord | None) -> SessionView:
        settings = await read_settings(self.settings_store, self.settings)
        configured = await self.creds.password_configured()
        return SessionView(
            authenticated=session is not None and not session.totp_pending,
            password_configured=configured,
            totp_configured=settings.totp_configured,
            totp_required_on_login=settings.totp_required_on_login,
            totp_pending=session is not None and session.totp_pending,
            bootstrap_required=not configured,
        )

    async def _require(self, request: Request, *, pending: bool = False) -> SessionRecord:
        """The caller's session: a full one, or (``pending``) one still owing the TOTP step."""
        session = await self.sessions.resolve(request)
        if session is None or session.totp_pending != pending:
            raise Unauthorized()
        return session

    async def _login_response(self, request: Request, *, totp_pending: bool) -> Response:
        """End the caller's old session, if any, and hand out a brand-new token."""
        await self.sessions.end(request)
        token = await self.sessions.start(totp_pending=totp_pending)
        session = await self.sessions.touch(token)
        response = json_response(await self._session_view(session))
        self.sessions.set_cookie(response, token, request)
        return response

    def _ip(self, request: Request) -> Address | None:
        return client_address(request, self.config.trusted_proxy_cidrs)

    async def get_session(self, request: Request) -> Response:
        return json_response(await self._session_view(await self.sessions.resolve(request)))

    async def password_setup(self, request: Request) -> Response:
        body = await read_json(request, _setup_decoder)
        creds = self.creds
        if await creds.password_configured():
            raise PasswordAlreadyConfigured()
        await checked(
            self.store,
            self._ip(request),
            lambda: creds.check_bootstrap_token(body.bootstrap_token),
            InvalidBootstrapToken(),
        )
        if not await creds.setup_password(body.password):
            raise PasswordAlreadyConfigured()
        return await self._login_response(request, totp_pending=False)

    async def password_login(self, request: Request) -> Response:
        body = await read_json(request, _login_decoder)
        creds = self.creds
        await checked(
            self.store,
            self._ip(request),
            lambda: creds.verify_password(body.password),
            InvalidCredentials(),
        )
        # The stored record, not the local copy: a requirement switched on a moment ago
        # elsewhere must already apply.
        settings = await read_settings(self.settings_store, self.settings)
        pending = settings.totp_required_on_login and settings.totp_configured
        return await self._login_response(request, totp_pending=pending)

    async def password_change(self, request: Request) -> Response:
        session = await self._require(request)
        body = await read_json(request, _change_decoder)
        creds = self.creds
        await checked(
            self.store,
            self._ip(request),
            lambda: creds.verify_password(body.current_password),
            InvalidCredentials(),
        )
        token = cookie_token(request) or ""
        await creds.set_password(body.new_password, keep_session=token_hash(token))
        return json_response(await self._session_view(session))

    async def logout(self, request: Request) -> Response:
        await drain_empty_body(request)
        await self.sessions.end(request)
        response = json_response(await self._session_view(None))
        self.sessions.clear_cookie(response, request)
        return response

    async def totp_setup_start(self, request: Request) -> Response:
        await drain_empty_body(request)
        await self._require(request)
        if (await read_settings(self.settings_store, self.settings)).totp_configured:
            raise InvalidTotpConfig(
                "TOTP is already configured; disable it before setting it up again"
            )
        secret = await self.creds.start_totp_setup()
        uri = totp.provisioning_uri(secret)
        return json_response(
            TotpSetupView(secret=secret, otpauth_uri=uri, qr_svg_data_uri=totp.qr_svg_data_uri(uri))
        )

    async def totp_setup_confirm(self, request: Request) -> Response:
        session = await self._require(request)
        body = await read_json(request, _code_decoder)
        creds, live = self.creds, self.settings
        await checked(
            self.store,
            self._ip(request),
            lambda: creds.confirm_totp_setup(live, body.code),
            InvalidTotpCode(),
        )
        return json_response(await self._session_view(session))

    async def totp_verify(self, request: Request) -> Response:
        await self._require(request, pending=True)
        body = await read_json(request, _code_decoder)
        creds = self.creds
        await checked(
            self.store, self._ip(request), lambda: creds.verify_totp(body.code), InvalidTotpCode()
        )
        return await self._login_response(request, totp_pending=False)

    async def totp_disable(self, request: Request) -> Response:
        session = await self._require(request)
        body = await read_json(request, _code_decoder)
        creds = self.creds
        await checked(
            self.store, self._ip(request), lambda: creds.verify_totp(body.code), InvalidTotpCode()
        )
        await creds.remove_totp(self.settings)
        return json_response(await self._session_view(session))


ENDPOINTS = [
    Endpoint(
        "GET",
        f"{PREFIX}/session",
        AuthRoutes.get_session,
        "Session and set-up state",
        "auth",
        response=SessionView,
        auth="none",
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/password/setup",
        AuthRoutes.password_setup,
        "First run: set the password with the bootstrap token",
        "auth",
        request=PasswordSetup,
        response=SessionView,
        auth="none",
        errors=(InvalidBootstrapToken, RateLimited, PasswordAlreadyConfigured),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/password/login",
        AuthRoutes.password_login,
        "Log in with the password",
        "auth",
        request=PasswordLogin,
        response=SessionView,
        auth="none",
        errors=(InvalidCredentials, RateLimited),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/password/change",
        AuthRoutes.password_change,
        "Change the password; ends every other session",
        "auth",
        request=PasswordChange,
        response=SessionView,
        errors=(InvalidCredentials, RateLimited),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/logout",
        AuthRoutes.logout,
        "End this session",
        "auth",
        response=SessionView,
        auth="none",
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/totp/setup/start",
        AuthRoutes.totp_setup_start,
        "Start TOTP enrolment: secret, otpauth URI, QR code",
        "auth",
        response=TotpSetupView,
        errors=(InvalidTotpConfig,),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/totp/setup/confirm",
        AuthRoutes.totp_setup_confirm,
        "Confirm TOTP enrolment with a code",
        "auth",
        request=TotpCodeBody,
        response=SessionView,
        errors=(InvalidTotpCode, RateLimited),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/totp/verify",
        AuthRoutes.totp_verify,
        "Complete a TOTP-pending login",
        "auth",
        request=TotpCodeBody,
        response=SessionView,
        auth="pending",
        errors=(InvalidTotpCode, RateLimited),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/totp/disable",
        AuthRoutes.totp_disable,
        "Turn TOTP off with a code",
        "auth",
        request=TotpCodeBody,
        response=SessionView,
        errors=(InvalidTotpCode, RateLimited),
    ),
]
