"""The dashboard's files as served (no browser): security headers on them and only on them,
caching, the page weight, the wheel shipping them, and the colour contrast of the style sheet."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx

from service.ui.routes import CONTENT_SECURITY_POLICY, STATIC, UiRoutes

ROOT = Path(__file__).resolve().parent.parent
WEIGHT_LIMIT = 200 * 1024


async def test_the_page_and_its_files_are_served_with_security_headers(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/ui/main.js">' in r.text
    for path in UiRoutes().assets:
        r = await client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-frame-options"] == "DENY"
    assert (await client.get("/ui/main.js")).headers["content-type"].startswith("text/javascript")
    assert (await client.get("/ui/app.css")).headers["content-type"].startswith("text/css")


def test_the_policy_allows_only_this_origin() -> None:
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    # The TOTP QR code comes as an SVG data URI (CONTRACT §3): images only.
    assert directives["img-src"] == "'self' data:"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


def test_no_inline_script_or_style_in_the_files() -> None:
    page = (STATIC / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page) == []
    assert "<style" not in page
    for path in STATIC.iterdir():
        # (An SVG's namespace is a name, not a request.)
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert re.search(r"\sstyle=", text) is None, path.name
        assert re.search(r"\son[a-z]+=", text) is None, path.name
        # Nothing from another origin: no CDN, no external font.
        assert re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text) == [], path.name
        # Secrets stay out of the browser's storage.
        assert re.search(r"(localStorage|sessionStorage)\s*[.\[]", text) is None, path.name


async def test_api_and_proxy_routes_carry_no_page_headers(client: httpx.AsyncClient) -> None:
    for path in ("/api/dashboard-auth/session", "/health/live", "/v1/models", "/openapi.json"):
        r = await client.get(path)
        assert "content-security-policy" not in r.headers, path
        assert "x-frame-options" not in r.headers, path


async def test_files_are_revalidated_and_unknown_files_are_not_found(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/ui/main.js")
    assert r.headers["cache-control"] == "no-cache"
    again = await client.get("/ui/main.js", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    head = await client.head("/")
    assert head.status_code == 200
    missing = await client.get("/ui/nothing.js")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert (await client.get("/index.html")).status_code == 404


def test_the_first_page_weighs_under_200_kib() -> None:
    """Everything the page can load (it preloads every module): the browser test sums what a
    real load fetched; this one fails fast on a file that grew."""
    page = (STATIC / "index.html").read_text()
    referenced = set(re.findall(r'(?:href|src)="/ui/([^"]+)"', page))
    files = {p.name for p in STATIC.iterdir()} - {"index.html"}
    # Every module is preloaded, and every file is referenced from the page.
    assert referenced == files
    total = sum(p.stat().st_size for p in STATIC.iterdir())
    assert total < WEIGHT_LIMIT, f"{total} bytes"


def test_the_wheel_ships_the_files() -> None:
    """setuptools' package-data takes every file of service/ui/static into the wheel (checked
    here on the configuration; `pip wheel .` and a look inside show the same)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["service.ui"]
    for path in STATIC.iterdir():
        relative = path.relative_to(ROOT / "service" / "ui").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


# --- colour contrast (WCAG 2.x) ------------------------------------------------------------------

# (foreground, background, minimum): 4.5 for text, 3 for borders, bars and the focus ring.
PAIRS = [
    ("--fg", "--bg", 4.5),
    ("--muted", "--bg", 4.5),
    ("--fg", "--panel", 4.5),
    ("--muted", "--panel", 4.5),
    ("--accent", "--bg", 4.5),  # links, quiet buttons
    ("--accent", "--panel", 4.5),
    ("--accent-fg", "--accent", 4.5),
    ("--danger-fg", "--danger", 4.5),
    ("--ok-fg", "--ok-bg", 4.5),
    ("--warn-fg", "--warn-bg", 4.5),
    ("--err-fg", "--err-bg", 4.5),
    ("--top-fg", "--top-bg", 4.5),
    ("--border", "--bg", 3.0),
    ("--focus", "--bg", 3.0),
    ("--focus", "--panel", 3.0),
    ("--bar-fill", "--bar-track", 3.0),
    ("--bar-high", "--bar-track", 3.0),
]


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_contrast_formula() -> None:
    assert round(contrast("#000000", "#ffffff"), 1) == 21.0
    assert round(contrast("#777777", "#ffffff"), 2) == 4.48


def test_colours_pass_wcag_aa() -> None:
    css = (STATIC / "app.css").read_text()
    colours = dict(re.findall(r"(--[a-z-]+):\s*(#[0-9a-f]{6});", css))
    assert len(colours) >= 18
    ratios = {(fg, bg): contrast(colours[fg], colours[bg]) for fg, bg, _ in PAIRS}
    low = {pair: round(ratios[pair], 2) for *pair, need in PAIRS if ratios[tuple(pair)] < need}
    assert low == {}, low
    # The figures, for the record (pytest -s): tests/test_ui_static.py prints them.
    for (fg, bg), ratio in ratios.items():
        print(f"{fg} on {bg}: {ratio:.2f}:1")
    # Every colour the style sheet uses is one of the checked custom properties.
    outside = re.findall(r"#[0-9a-fA-F]{3,6}\b", re.sub(r"--[a-z-]+:\s*#[0-9a-f]{6};", "", css))
    assert set(outside) <= {"#ffffff"}, outside  # the QR code's white quiet zone
