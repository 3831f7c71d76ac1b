"""The dashboard's own files, served at ``/`` (the page) and ``/ui/<name>`` (its modules, style
sheet and icon), read once from the package: nothing is built or fetched at run time.

These routes are not API routes: they are left out of the endpoint table and so of
/openapi.json (tests/test_openapi.py names them as the one exception). Only these responses
carry the browser-facing security headers below; the API and proxy routes are untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

STATIC = Path(__file__).resolve().parent / "static"
PAGE = "index.html"
ASSET_PREFIX = "/ui/"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# Only our own files: no inline script or style, no other origin. ``data:`` images are the
# TOTP QR code, which the API sends as an SVG data URI (CONTRACT §3).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidated on every load (a 304 when unchanged), so an upgrade is seen at once.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets(folder: Path = STATIC) -> dict[str, Asset]:
    """Every file of ``folder`` by the path it is served at."""
    assets: dict[str, Asset] = {}
    for path in sorted(folder.iterdir()):
        media_type = MEDIA_TYPES.get(path.suffix)
        if not path.is_file() or media_type is None:
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        url = "/" if path.name == PAGE else ASSET_PREFIX + path.name
        assets[url] = Asset(body, media_type, etag)
    if "/" not in assets:
        raise RuntimeError(f"the dashboard page {PAGE} is missing from {folder}")
    return assets


class UiRoutes:
    def __init__(self, assets: dict[str, Asset] | None = None) -> None:
        self.assets = load_assets() if assets is None else assets

    async def serve(self, request: Request) -> Response:
        asset = self.assets[request.url.path]
        headers = {**SECURITY_HEADERS, "ETag": asset.etag}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    def routes(self) -> list[Route]:
        """One route per file (GET, and HEAD with it); any other path stays a 404."""
        return [Route(path, self.serve, methods=["GET"]) for path in self.assets]
