"""The shared HTTP client for the upstream's control routes (models, usage, token refresh).

One client per process, made when the app is wired, with explicit timeouts and limits. It never
keeps cookies: the same client serves every account, and one account's cookies must not
travel with another's requests.
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

import service

USER_AGENT = f"codex-lb/{service.__version__}"


def make_client() -> httpx.AsyncClient:
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(
        timeout=httpx.Timeout(30.0, connect=10.0),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        cookies=httpx.Cookies(jar),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
    )


def account_headers(access_token: str, chatgpt_account_id: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {access_token}",
        "chatgpt-account-id": chatgpt_account_id,
        "Accept": "application/json",
    }
