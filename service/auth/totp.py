"""RFC 6238 codes (30 s steps, 6 digits, ±1 step) and the enrolment QR code."""

from __future__ import annotations

import base64
import hmac
import io
import time

import pyotp
import segno

ISSUER = "codex-lb"
ACCOUNT = "admin"
STEP_SECONDS = 30
WINDOW = 1


def new_secret() -> str:
    return pyotp.random_base32()


def provisioning_uri(secret: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=ACCOUNT, issuer_name=ISSUER)


def qr_svg_data_uri(uri: str) -> str:
    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="svg", scale=4, xmldecl=False)
    return "data:image/svg+xml;base64," + base64.b64encode(out.getvalue()).decode()


def matching_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step ``code`` belongs to (within ±1 step of now), or None.

    The caller must still claim that step atomically, so a code is accepted only once.
    """
    code = code.strip().replace(" ", "")
    if len(code) != 6 or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret)
    now = time.time() if now is None else now
    current = int(now // STEP_SECONDS)
    found = None
    for step in range(current - WINDOW, current + WINDOW + 1):
        # Compare every candidate (no early exit) so timing does not reveal which one matched.
        if hmac.compare_digest(totp.generate_otp(step), code):
            found = step
    return found
