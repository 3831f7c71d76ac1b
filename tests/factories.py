"""Builders for test data: unsigned JWTs and Codex CLI auth.json documents."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from tests import leaks

AUTH_CLAIM = "https://api.openai.com/auth"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def jwt(claims: dict[str, Any]) -> str:
    """A JWT-shaped token (header.payload.signature); codex-lb never verifies it locally."""
    return f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.c2lnbmF0dXJl"


def auth_json(
    *,
    account_id: str = "acct-1",
    email: str = "user@example.com",
    plan: str = "plus",
    access_exp: float | None = None,
    refresh_token: str = "rt-secret-1",
    tag: str = "1",
    camel: bool = False,
    account_id_in_tokens: bool = True,
) -> dict[str, Any]:
    exp = time.time() + 3600 if access_exp is None else access_exp
    id_token = jwt(
        {
            "email": email,
            "exp": int(time.time()) + 3600,
            AUTH_CLAIM: {
                "chatgpt_account_id": account_id,
                "chatgpt_plan_type": plan,
                "chatgpt_user_id": f"user-{tag}",
            },
        }
    )
    access_token = jwt({"exp": int(exp), "sub": f"access-{tag}", "secret": f"at-secret-{tag}"})
    leaks.register(access_token, "access token")
    leaks.register(id_token, "id token")
    leaks.register(refresh_token, "refresh token")
    if camel:
        tokens: dict[str, Any] = {
            "idToken": id_token,
            "accessToken": access_token,
            "refreshToken": refresh_token,
        }
        if account_id_in_tokens:
            tokens["accountId"] = account_id
    else:
        tokens = {
            "id_token": id_token,
            "access_token": access_token,
            "refresh_token": refresh_token,
        }
        if account_id_in_tokens:
            tokens["account_id"] = account_id
    return {"OPENAI_API_KEY": None, "tokens": tokens, "last_refresh": "2026-11-20T10:00:00Z"}
