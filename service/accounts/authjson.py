"""Reading a Codex CLI ``auth.json``: its three tokens and the identity they belong to.

The id_token is read, not verified: it came from the user's own machine, and the upstream
verifies every token we forward. Identity is the ChatGPT account id plus the email
(case-insensitive), because several people in one workspace share an account id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, Any

import msgspec

from service.core.bodies import NOT_BLANK

AUTH_CLAIM = "https://api.openai.com/auth"
PLAN_TYPES = frozenset({"free", "plus", "pro", "team", "business", "enterprise", "edu"})


class AuthJsonError(ValueError):
    """The document is not a usable auth.json; the message says why (never a token)."""


# Not blank: ``parse`` strips each token and refuses an empty one.
_Token = Annotated[str, msgspec.Meta(pattern=NOT_BLANK)]


class AuthJsonTokens(msgspec.Struct):
    id_token: _Token
    access_token: _Token
    refresh_token: _Token
    account_id: str | msgspec.UnsetType = msgspec.UNSET


class AuthJsonDocument(msgspec.Struct):
    """What /openapi.json says an auth.json is: the Codex CLI's ``~/.codex/auth.json`` (other
    fields are allowed). ``parse`` reads the file itself, more leniently (camelCase names too),
    and also needs the id_token to be a JWT naming the account and an email."""

    tokens: AuthJsonTokens


class ParsedAuth(msgspec.Struct, frozen=True, kw_only=True):
    chatgpt_account_id: str
    email: str
    plan_type: str | None
    access_token: str
    refresh_token: str
    id_token: str
    # Expiry of the access token (epoch seconds) when it is a JWT with ``exp``.
    access_expires_at: float | None

    @property
    def account_key(self) -> str:
        """Our stable id for the identity: the same file always maps to the same account."""
        return identity_id(self.chatgpt_account_id, self.email)


def identity_id(chatgpt_account_id: str, email: str) -> str:
    digest = hashlib.sha256(f"{chatgpt_account_id}\n{email.strip().lower()}".encode()).hexdigest()
    return f"acc_{digest[:24]}"


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        raise AuthJsonError("is not a JWT")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = msgspec.json.decode(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise AuthJsonError("has an unreadable payload") from None
    if not isinstance(claims, dict):
        raise AuthJsonError("has an unreadable payload")
    return claims


def _token(tokens: dict[str, Any], snake: str, camel: str) -> str:
    value = tokens.get(snake, tokens.get(camel))
    if not isinstance(value, str) or not value.strip():
        raise AuthJsonError(f"tokens.{snake} is missing")
    return value.strip()


def parse(raw: bytes) -> ParsedAuth:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthJsonError("is not UTF-8") from None
    try:
        doc = msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise AuthJsonError("is not JSON") from None
    if not isinstance(doc, dict):
        raise AuthJsonError("is not a JSON object")
    tokens = doc.get("tokens")
    if not isinstance(tokens, dict):
        raise AuthJsonError("has no tokens object")
    id_token = _token(tokens, "id_token", "idToken")
    access_token = _token(tokens, "access_token", "accessToken")
    refresh_token = _token(tokens, "refresh_token", "refreshToken")

    try:
        claims = jwt_claims(id_token)
    except AuthJsonError as exc:
        raise AuthJsonError(f"tokens.id_token {exc}") from None
    auth = claims.get(AUTH_CLAIM)
    auth = auth if isinstance(auth, dict) else {}
    account_id = tokens.get("account_id", tokens.get("accountId")) or auth.get("chatgpt_account_id")
    if not isinstance(account_id, str) or not account_id.strip():
        raise AuthJsonError("names no ChatGPT account id")
    email = claims.get("email")
    if not isinstance(email, str) or "@" not in email:
        raise AuthJsonError("tokens.id_token carries no email")
    plan = auth.get("chatgpt_plan_type")

    expires_at: float | None = None
    try:
        exp = jwt_claims(access_token).get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) else None
    except AuthJsonError:
        pass  # an opaque access token: refreshed after the upstream refuses it

    return ParsedAuth(
        chatgpt_account_id=account_id.strip(),
        email=email.strip().lower(),
        plan_type=plan if isinstance(plan, str) and plan in PLAN_TYPES else None,
        access_token=access_token,
        refresh_token=refresh_token,
        id_token=id_token,
        access_expires_at=expires_at,
    )
