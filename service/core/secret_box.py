"""Encryption of secrets kept in Redis (TOTP seed, bootstrap token, later account tokens).

Fernet is authenticated encryption: a value tampered with, or sealed under another key, fails
to open instead of decrypting to garbage. Every replica must use the same key; a fingerprint
of it stored in Redis lets a process with the wrong key refuse to start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from service.config import Config

log = logging.getLogger(__name__)

KEY_FILE_NAME = "encryption.key"


class EncryptionKeyError(RuntimeError):
    """The encryption key is missing, malformed, or not the deployment's."""


class SecretBox:
    def __init__(self, key: bytes):
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError):
            raise EncryptionKeyError(
                "encryption key is not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from None
        self.fingerprint = hmac.new(
            key, b"codex-lb key fingerprint v1", hashlib.sha256
        ).hexdigest()[:32]

    def seal(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode())

    def open(self, sealed: bytes) -> str:
        try:
            return self._fernet.decrypt(sealed).decode()
        except InvalidToken:
            raise EncryptionKeyError(
                "a stored secret cannot be decrypted with this encryption key"
            ) from None


def load_key(config: Config) -> bytes:
    """The key from the environment, its file, or one generated once into the data dir."""
    if config.encryption_key:
        return config.encryption_key.encode()
    if config.encryption_key_file:
        try:
            return config.encryption_key_file.read_bytes().strip()
        except OSError as exc:
            raise EncryptionKeyError(
                f"cannot read CODEX_LB_ENCRYPTION_KEY_FILE: {exc.strerror}"
            ) from None
    return _generated_key(config.data_dir / KEY_FILE_NAME)


def _generated_key(path: Path) -> bytes:
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Write aside, then link into place: link fails if the file exists, so of several workers
    # starting at once exactly one key wins and nobody ever reads a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(Fernet.generate_key())
    try:
        os.link(tmp, path)
        log.info("generated a new encryption key in %s", path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()
