"""Reading server-sent events out of bytes that pass through unchanged.

The proxy forwards the upstream's bytes as they arrive and looks only at the few events it
learns from (``codex.rate_limits``, ``response.completed``...), found by their ``event:`` line:
a chunk that names none of them is not split or decoded at all. Events are separated by a
blank line (the upstream writes ``\\n``; ``\\r\\n`` is read too).
"""

from __future__ import annotations

from collections.abc import Iterable

# A partial event longer than this is not kept for reading (the bytes still pass through).
MAX_EVENT_BYTES = 8 * 1024 * 1024


def _normalise(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n") if b"\r" in data else data


def parse_event(block: bytes) -> tuple[str, bytes]:
    """One event's name (``message`` if it has none) and its data lines joined."""
    name = "message"
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    return name, b"\n".join(data)


class _Events:
    """The complete events of a byte stream, a chunk at a time: what arrives after the last
    blank line is kept until the rest of its event comes."""

    def __init__(self) -> None:
        self._carry = b""

    def _complete(self, chunk: bytes) -> bytes:
        """The complete events this chunk finishes (without their last separator), or b""."""
        data = _normalise(self._carry + chunk if self._carry else chunk)
        end = data.rfind(b"\n\n")
        if end < 0:
            self._carry = data if len(data) <= MAX_EVENT_BYTES else b""
            return b""
        self._carry = data[end + 2 :]
        return data[:end]


class EventReader(_Events):
    """Every event in a byte stream, in order (the chat translation reads them all)."""

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        done = self._complete(chunk)
        return [parse_event(block) for block in done.split(b"\n\n") if block.strip()]

    def close(self) -> list[tuple[str, bytes]]:
        rest, self._carry = self._carry, b""
        return [parse_event(rest)] if rest.strip() else []


class EventTap(_Events):
    """Only the named events of a byte stream: the rest is skipped with one substring search."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self._markers = tuple(f"event: {n}".encode() for n in names)
        self._names = frozenset(names)

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        done = self._complete(chunk)
        found: list[tuple[int, str, bytes]] = []
        for marker in self._markers:
            at = done.find(marker)
            while at >= 0:
                # The event starts at its ``event:`` line (the upstream writes it first) and
                # runs to the blank line after it.
                stop = done.find(b"\n\n", at)
                block = done[at:] if stop < 0 else done[at:stop]
                name, body = parse_event(block)
                if name in self._names:
                    found.append((at, name, body))
                at = -1 if stop < 0 else done.find(marker, stop)
        if len(found) > 1:
            found.sort()  # in stream order
        return [(name, body) for _, name, body in found]
