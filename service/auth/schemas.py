"""Request and response bodies of ``/api/dashboard-auth/*``."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from service.core.bodies import RequestBody, ResponseBody

Password = Annotated[str, Meta(min_length=8, max_length=1024)]
TotpCode = Annotated[str, Meta(min_length=1, max_length=16)]
Token = Annotated[str, Meta(min_length=1, max_length=1024)]


class SessionView(ResponseBody):
    authenticated: bool
    password_configured: bool
    totp_configured: bool
    totp_required_on_login: bool
    totp_pending: bool
    bootstrap_required: bool


class PasswordSetup(RequestBody):
    password: Password
    bootstrap_token: Token


class PasswordLogin(RequestBody):
    password: Annotated[str, Meta(max_length=1024)]


class PasswordChange(RequestBody):
    current_password: Annotated[str, Meta(max_length=1024)]
    new_password: Password


class TotpCodeBody(RequestBody):
    code: TotpCode


class TotpSetupView(ResponseBody):
    secret: str
    otpauth_uri: str
    qr_svg_data_uri: str
