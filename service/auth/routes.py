"""``/api/dashboard-auth/*``: first-run setup, login, TOTP, logout, password change.

These routes sit outside the gate's session requirement and check the session they need
themselves: none, a TOTP-pending one (``/totp/verify``) or a full one.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.auth import sessions, totp
from service.auth.attempts import checked
from service.auth.credentials import Credentials
from service.clients import Address, client_address
from service.errors import (
    InvalidBootstrapToken,
    InvalidCredentials,
    InvalidTotpCode,
    InvalidTotpConfig,
    PasswordAlreadyConfigured,
    RateLimited,
    Unauthorized,
)
from service.http import drain_empty_body, json_response, read_json
from service.records import SessionRecord
from service.routing import Endpoint
from service.schemas import (
    PasswordChange,
    PasswordLogin,
    PasswordSetup,
    SessionView,
    TotpCodeBody,
    TotpSetupView,
)
from service.settings import read_settings
from service.state import Services, services

PREFIX = "/api/dashboard-auth"

_setup_decoder = msgspec.json.Decoder(PasswordSetup)
_login_decoder = msgspec.json.Decoder(PasswordLogin)
_change_decoder = msgspec.json.Decoder(PasswordChange)
_code_decoder = msgspec.json.Decoder(TotpCodeBody)


def _credentials(svc: Services) -> Credentials:
    return Credentials(svc.store, svc.box, svc.config.bootstrap_token)


async def _session_view(svc: Services, session: SessionRecord | None) -> SessionView:
    creds = _credentials(svc)
    settings = await read_settings(svc.store, svc.live)
    configured = await creds.password_configured()
    return SessionView(
        authenticated=session is not None and not session.totp_pending,
        password_configured=configured,
        totp_configured=settings.totp_configured,
        totp_required_on_login=settings.totp_required_on_login,
        totp_pending=session is not None and session.totp_pending,
        bootstrap_required=not configured,
    )


async def _require(request: Request, *, pending: bool = False) -> SessionRecord:
    """The caller's session: a full one, or (``pending``) one still owing the TOTP step."""
    svc = services(request)
    session = await sessions.resolve(svc.store, svc.config, request)
    if session is None or session.totp_pending != pending:
        raise Unauthorized()
    return session


async def _login_response(request: Request, *, totp_pending: bool) -> Response:
    """End the caller's old session, if any, and hand out a brand-new token."""
    svc = services(request)
    await sessions.end(svc.store, request)
    token = await sessions.start(svc.store, svc.config, totp_pending=totp_pending)
    session = await svc.store.touch_session(
        sessions.token_hash(token), svc.config.session_idle_seconds
    )
    response = json_response(await _session_view(svc, session))
    sessions.set_cookie(response, token, svc.config, request)
    return response


def _ip(request: Request) -> Address | None:
    return client_address(request, services(request).config.trusted_proxy_cidrs)


async def get_session(request: Request) -> Response:
    svc = services(request)
    return json_response(
        await _session_view(svc, await sessions.resolve(svc.store, svc.config, request))
    )


async def password_setup(request: Request) -> Response:
    body = await read_json(request, _setup_decoder)
    svc = services(request)
    creds = _credentials(svc)
    if await creds.password_configured():
        raise PasswordAlreadyConfigured()
    await checked(
        svc.store,
        _ip(request),
        lambda: creds.check_bootstrap_token(body.bootstrap_token),
        InvalidBootstrapToken(),
    )
    if not await creds.setup_password(body.password):
        raise PasswordAlreadyConfigured()
    return await _login_response(request, totp_pending=False)


async def password_login(request: Request) -> Response:
    body = await read_json(request, _login_decoder)
    svc = services(request)
    creds = _credentials(svc)
    await checked(
        svc.store, _ip(request), lambda: creds.verify_password(body.password), InvalidCredentials()
    )
    # The stored record, not the local copy: a requirement switched on a moment ago elsewhere
    # must already apply.
    settings = await read_settings(svc.store, svc.live)
    pending = settings.totp_required_on_login and settings.totp_configured
    return await _login_response(request, totp_pending=pending)


async def password_change(request: Request) -> Response:
    session = await _require(request)
    body = await read_json(request, _change_decoder)
    svc = services(request)
    creds = _credentials(svc)
    await checked(
        svc.store,
        _ip(request),
        lambda: creds.verify_password(body.current_password),
        InvalidCredentials(),
    )
    token = sessions.cookie_token(request) or ""
    await creds.set_password(body.new_password, keep_session=sessions.token_hash(token))
    return json_response(await _session_view(svc, session))


async def logout(request: Request) -> Response:
    await drain_empty_body(request)
    svc = services(request)
    await sessions.end(svc.store, request)
    response = json_response(await _session_view(svc, None))
    sessions.clear_cookie(response, svc.config, request)
    return response


async def totp_setup_start(request: Request) -> Response:
    await drain_empty_body(request)
    await _require(request)
    svc = services(request)
    if (await read_settings(svc.store, svc.live)).totp_configured:
        raise InvalidTotpConfig("TOTP is already configured; disable it before setting it up again")
    secret = await _credentials(svc).start_totp_setup()
    uri = totp.provisioning_uri(secret)
    return json_response(
        TotpSetupView(secret=secret, otpauth_uri=uri, qr_svg_data_uri=totp.qr_svg_data_uri(uri))
    )


async def totp_setup_confirm(request: Request) -> Response:
    session = await _require(request)
    body = await read_json(request, _code_decoder)
    svc = services(request)
    creds = _credentials(svc)
    await checked(
        svc.store,
        _ip(request),
        lambda: creds.confirm_totp_setup(svc.live, body.code),
        InvalidTotpCode(),
    )
    return json_response(await _session_view(svc, session))


async def totp_verify(request: Request) -> Response:
    await _require(request, pending=True)
    body = await read_json(request, _code_decoder)
    svc = services(request)
    creds = _credentials(svc)
    await checked(svc.store, _ip(request), lambda: creds.verify_totp(body.code), InvalidTotpCode())
    return await _login_response(request, totp_pending=False)


async def totp_disable(request: Request) -> Response:
    session = await _require(request)
    body = await read_json(request, _code_decoder)
    svc = services(request)
    creds = _credentials(svc)
    await checked(svc.store, _ip(request), lambda: creds.verify_totp(body.code), InvalidTotpCode())
    await creds.remove_totp(svc.live)
    return json_response(await _session_view(svc, session))


ENDPOINTS = [
    Endpoint(
        "GET",
        f"{PREFIX}/session",
        get_session,
        "Session and set-up state",
        "auth",
        response=SessionView,
        auth="none",
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/password/setup",
        password_setup,
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
        password_login,
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
        password_change,
        "Change the password; ends every other session",
        "auth",
        request=PasswordChange,
        response=SessionView,
        errors=(InvalidCredentials, RateLimited),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/logout",
        logout,
        "End this session",
        "auth",
        response=SessionView,
        auth="none",
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/totp/setup/start",
        totp_setup_start,
        "Start TOTP enrolment: secret, otpauth URI, QR code",
        "auth",
        response=TotpSetupView,
        errors=(InvalidTotpConfig,),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/totp/setup/confirm",
        totp_setup_confirm,
        "Confirm TOTP enrolment with a code",
        "auth",
        request=TotpCodeBody,
        response=SessionView,
        errors=(InvalidTotpCode, RateLimited),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/totp/verify",
        totp_verify,
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
        totp_disable,
        "Turn TOTP off with a code",
        "auth",
        request=TotpCodeBody,
        response=SessionView,
        errors=(InvalidTotpCode, RateLimited),
    ),
]
