"""The dashboard's credentials: password, TOTP seed, first-run bootstrap token.

Shared by the HTTP routes and the ``codex-lb admin`` commands. Secrets are stored sealed
(``SecretBox``) or hashed, never in the clear.
"""

from __future__ import annotations

import hmac
import logging
import secrets

import msgspec

from service.auth import passwords, totp
from service.auth.store import AuthStore
from service.core.secret_box import EncryptionKeyError, SecretBox
from service.settings.domain import Edit, write_settings
from service.settings.live import LiveSettings
from service.settings.store import SettingsRecord, SettingsStore

log = logging.getLogger(__name__)

TOTP_SETUP_SECONDS = 600


class Credentials:
    def __init__(
        self,
        store: AuthStore,
        settings: SettingsStore,
        box: SecretBox,
        env_bootstrap_token: str | None,
    ):
        self.store = store
        self.settings = settings
        self.box = box
        self.env_bootstrap_token = env_bootstrap_token

    # --- password -----------------------------------------------------------------------------

    async def password_hash(self) -> str | None:
        value = (await self.store.auth_fields()).get("password_hash")
        return value.decode() if value else None

    async def password_configured(self) -> bool:
        return await self.password_hash() is not None

    async def verify_password(self, password: str) -> bool:
        return await passwords.verify_password(await self.password_hash(), password)

    async def setup_password(self, password: str) -> bool:
        """First run only: False if a password exists already (checked atomically)."""
        if not await self.store.set_password_if_absent(await passwords.hash_password(password)):
            return False
        await self.store.delete(self.store.keys.bootstrap)
        return True

    async def set_password(self, password: str, *, keep_session: str = "") -> int:
        """Set or reset the password and end every session but ``keep_session`` (a token hash).

        Returns how many sessions were ended.
        """
        await self.store.set_auth_field(
            "password_hash", (await passwords.hash_password(password)).encode()
        )
        await self.store.delete(self.store.keys.bootstrap)
        return await self.store.revoke_sessions(keep_session)

    # --- first-run bootstrap token ------------------------------------------------------------

    async def ensure_bootstrap_token(self) -> bool:
        """Until a password exists, make sure the deployment has one bootstrap token.

        Generated once for the whole deployment (SET NX); only the process that made it logs
        it, once. An operator-supplied token is never printed or logged (CONTRACT §3). True if
        this call generated the token.
        """
        if self.env_bootstrap_token or await self.password_configured():
            return False
        token = secrets.token_urlsafe(24)
        if not await self.store.set(self.store.keys.bootstrap, self.box.seal(token), nx=True):
            return False
        log.warning("first run: dashboard bootstrap token is %s", token)
        return True

    async def bootstrap_token(self) -> str | None:
        if self.env_bootstrap_token:
            return self.env_bootstrap_token
        sealed = await self.store.get(self.store.keys.bootstrap)
        return None if sealed is None else self.box.open(sealed)

    async def check_bootstrap_token(self, candidate: str) -> bool:
        expected = await self.bootstrap_token()
        return expected is not None and hmac.compare_digest(expected.encode(), candidate.encode())

    # --- TOTP ---------------------------------------------------------------------------------

    async def start_totp_setup(self) -> str:
        secret = totp.new_secret()
        await self.store.set(
            self.store.keys.totp_pending, self.box.seal(secret), ex=TOTP_SETUP_SECONDS
        )
        return secret

    async def _claim(self, secret: str | None, code: str) -> bool:
        """True if ``code`` is valid for ``secret`` and its time step was never used before."""
        if secret is None:
            return False
        step = totp.matching_step(secret, code)
        return step is not None and await self.store.use_totp_step(step)

    async def confirm_totp_setup(self, live: LiveSettings, code: str) -> bool:
        sealed = await self.store.get(self.store.keys.totp_pending)
        secret = None if sealed is None else self.box.open(sealed)
        if not await self._claim(secret, code):
            return False
        assert secret is not None
        # One atomic step with the settings: never a secret without totp_configured, nor the
        # reverse (CONTRACT §4: a failure in between could lock the admin out).
        await write_settings(
            self.settings, live, _totp(configured=True), totp_secret=self.box.seal(secret)
        )
        return True

    async def totp_secret(self) -> str | None:
        sealed = (await self.store.auth_fields()).get("totp_secret")
        return None if sealed is None else self.box.open(sealed)

    async def verify_totp(self, code: str) -> bool:
        return await self._claim(await self.totp_secret(), code)

    async def remove_totp(self, live: LiveSettings) -> SettingsRecord:
        """TOTP off and not required (disable with a code, or ``admin reset-totp``), in one
        atomic step with the settings."""
        return await write_settings(self.settings, live, _totp(configured=False), totp_secret=None)

    # --- the encryption key -------------------------------------------------------------------

    async def check_key_fingerprint(self) -> None:
        """Refuse a key that is not the deployment's: its secrets would not open."""
        await self.store.set(
            self.store.keys.key_fingerprint, self.box.fingerprint.encode(), nx=True
        )
        stored = await self.store.get(self.store.keys.key_fingerprint)
        if stored is not None and stored.decode() != self.box.fingerprint:
            raise EncryptionKeyError(
                "CODEX_LB_ENCRYPTION_KEY does not match the key this deployment's data was "
                "encrypted with; every replica must use the same key"
            )


def _totp(*, configured: bool) -> Edit:
    def change(current: SettingsRecord) -> SettingsRecord:
        if configured:
            return msgspec.structs.replace(current, totp_configured=True)
        return msgspec.structs.replace(current, totp_configured=False, totp_required_on_login=False)

    return change
