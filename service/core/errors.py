"""Errors the service answers with, and the two envelopes they travel in.

    ServiceError                 status, code and message as class attributes
    ├── InvalidJSON              400
    ├── InvalidTotpConfig        400
    ├── InvalidTotpCode          400
    ├── Unauthorized             401 (and TotpRequired, InvalidCredentials, ...)
    ├── CsrfRejected             403
    ├── NotFound                 404
    ├── MethodNotAllowed         405 (carries Allow)
    ├── SettingsConflict         409
    ├── PayloadTooLarge          413
    ├── UnsupportedMediaType     415
    ├── ValidationFailed         422
    ├── RateLimited              429 (carries Retry-After)
    ├── UsageLimitReached        429 (proxy: every account limited; carries resets_at)
    ├── UpstreamError            502 (and UpstreamUnavailable)
    ├── NoAccounts               503
    ├── StoreUnavailable         503
    ├── StoreError               500 (Redis refused a command; the cause is logged)
    └── NotReady                 503

Routes raise them; one handler table in ``app`` turns them into responses, so no handler
needs a try/except of its own.
"""

from __future__ import annotations

import time

import msgspec
from starlette.responses import Response

_encoder = msgspec.json.Encoder()

# Proxy routes answer in the OpenAI envelope (so OpenAI SDKs and the Codex CLI can show the
# error); everything else in the dashboard one. /openapi.json documents each route by this too.
PROXY_PREFIXES = ("/v1/", "/backend-api/")


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    message: str = "Internal error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = headers or {}


class InvalidJSON(ServiceError):
    status, code, message = 400, "invalid_json", "Request body is not valid JSON"


class InvalidTotpConfig(ServiceError):
    status, code = 400, "invalid_totp_config"
    message = "Cannot enable TOTP requirement without configuring it first"


class InvalidTotpCode(ServiceError):
    status, code, message = 400, "invalid_totp_code", "Invalid or already used TOTP code"


class InvalidAuthJson(ServiceError):
    status, code, message = 400, "invalid_auth_json", "Invalid auth.json"


class Unauthorized(ServiceError):
    status, code, message = 401, "unauthorized", "Missing or invalid dashboard session"


class TotpRequired(ServiceError):
    status, code, message = 401, "totp_required", "TOTP verification required"


class InvalidCredentials(ServiceError):
    status, code, message = 401, "invalid_credentials", "Invalid credentials"


class InvalidBootstrapToken(ServiceError):
    status, code, message = 401, "invalid_bootstrap_token", "Invalid bootstrap token"


class CsrfRejected(ServiceError):
    status, code, message = 403, "csrf_rejected", "Cross-origin request refused"


class NotFound(ServiceError):
    status, code, message = 404, "not_found", "Not found"


class MethodNotAllowed(ServiceError):
    status, code, message = 405, "method_not_allowed", "Method not allowed"

    def __init__(self, allow: str):
        # RFC 9110: a 405 says which methods the resource does support.
        super().__init__(headers={"Allow": allow})


class SettingsConflict(ServiceError):
    status, code = 409, "settings_conflict"
    message = "Settings were changed by someone else; reload and retry"


class PasswordAlreadyConfigured(ServiceError):
    status, code, message = 409, "password_already_configured", "Password is already configured"


class PayloadTooLarge(ServiceError):
    status, code, message = 413, "payload_too_large", "Request body is too large"


class UnsupportedMediaType(ServiceError):
    status, code, message = 415, "unsupported_media_type", "Content-Type must be application/json"


class ValidationFailed(ServiceError):
    status, code, message = 422, "validation_error", "Invalid request body"


class RateLimited(ServiceError):
    status, code, message = 429, "rate_limited", "Too many failed attempts; try again later"

    def __init__(self, retry_after: int):
        super().__init__(headers={"Retry-After": str(max(1, retry_after))})


class StoreUnavailable(ServiceError):
    status, code, message = 503, "store_unavailable", "Storage is unavailable; nothing was written"


class StoreError(ServiceError):
    """Redis refused a command (a script error, a key of the wrong type). Not a 503: Redis
    does not roll back a failed script, so we cannot say that nothing was written."""


class NoAccounts(ServiceError):
    status, code, message = 503, "no_accounts", "No account can serve this request"


class UpstreamError(ServiceError):
    status, code, message = 502, "upstream_error", "The upstream answered with an error"


class UpstreamUnavailable(UpstreamError):
    code, message = "upstream_unavailable", "The upstream could not be reached"


class UsageLimitReached(ServiceError):
    """Every account is rate-limited. The Codex CLI shows "usage limit" only for this shape:
    ``error.type`` and ``error.code`` both ``usage_limit_reached``, with a real ``resets_at``."""

    status, code = 429, "usage_limit_reached"
    message = "Every account in the pool has reached its usage limit"

    def __init__(self, resets_at: float):
        self.resets_at = int(resets_at)
        super().__init__(headers={"Retry-After": str(max(1, round(resets_at - time.time())))})


class InvalidApiKey(ServiceError):
    status, code, message = 401, "invalid_api_key", "Invalid or missing API key"

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotReady(ServiceError):
    status, code, message = 503, "not_ready", "Service is not ready"


class _DashboardError(msgspec.Struct):
    code: str
    message: str


class DashboardErrorEnvelope(msgspec.Struct):
    """``{"error": {"code", "message"}}`` for ``/api/*`` and ``/health/*``."""

    error: _DashboardError


class _OpenAIError(msgspec.Struct):
    message: str
    type: str
    code: str
    param: str | None = None


class _OpenAILimitError(_OpenAIError, kw_only=True):
    """``usage_limit_reached`` carries when the limit lifts, as the upstream's own 429 does."""

    resets_at: int
    resets_in_seconds: int


class OpenAIErrorEnvelope(msgspec.Struct):
    """The OpenAI shape for proxy routes, so SDKs and the Codex CLI can show it."""

    error: _OpenAIError  # or its _OpenAILimitError (encoded with its own fields)


def dashboard_error_response(exc: ServiceError) -> Response:
    body = DashboardErrorEnvelope(_DashboardError(code=exc.code, message=exc.message))
    headers = {"Cache-Control": "no-store", **exc.headers}
    return Response(
        _encoder.encode(body), exc.status, headers=headers, media_type="application/json"
    )


def openai_error_response(exc: ServiceError, *, error_type: str | None = None) -> Response:
    default_type = "invalid_request_error" if exc.status < 500 else "server_error"
    kind = error_type or default_type
    error: _OpenAIError
    if isinstance(exc, UsageLimitReached):
        error = _OpenAILimitError(
            message=exc.message,
            type=exc.code,
            code=exc.code,
            resets_at=exc.resets_at,
            resets_in_seconds=max(0, exc.resets_at - int(time.time())),
        )
    else:
        error = _OpenAIError(message=exc.message, type=kind, code=exc.code)
    body = _encoder.encode(OpenAIErrorEnvelope(error))
    return Response(body, exc.status, headers=exc.headers, media_type="application/json")


def is_proxy_path(path: str) -> bool:
    return path.startswith(PROXY_PREFIXES)


def error_response(path: str, exc: ServiceError) -> Response:
    """``exc`` in the envelope of the route family ``path`` belongs to."""
    if is_proxy_path(path):
        return openai_error_response(exc)
    return dashboard_error_response(exc)
