"""The record of who runs the embedded redis-server (``redis.json`` in the data dir): where it
listens, and which process owns it (see ``embedded_redis``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Owner = Literal["serve", "admin"]


@dataclass(frozen=True)
class Record:
    socket: str
    owner: str | None  # None: written by a codex-lb that did not record it
    owner_pid: int | None


def read_record(path: Path) -> Record | None:
    try:
        record = json.loads(path.read_text())
        owner_pid = record.get("owner_pid")
        return Record(
            socket=str(record["unix"]),
            owner=None if record.get("owner") is None else str(record["owner"]),
            owner_pid=None if owner_pid is None else int(owner_pid),
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        # Not written yet, being replaced, or naming a TCP port (an older codex-lb): never used.
        return None


def write_record(path: Path, address: str, pid: int, owner: Owner) -> None:
    record = {"pid": pid, "unix": address, "owner": owner, "owner_pid": os.getpid()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)  # readers see the old record or the new one, never half of one
