"""The draws behind usage_weighted's random choice: each uniform on [0, 1), spread evenly.

Independent draws (``random.random``) give each account its weight's share only on average:
over the few dozen picks in which a pool hands out its conversation threads, the smallest
account got half its share now and then, and a window that ended with units unspent was capacity
lost (``scripts/bench pool``). An additive recurrence by the golden ratio from a random start
(a low-discrepancy sequence) gives every draw the same uniform chance, so each pick is still a
random choice weighted by remaining capacity (CONTRACT §7), while any run of N successive draws
puts each share within about one pick of N times its weight.
"""

from __future__ import annotations

import random

# The golden ratio's fractional part: successive multiples fall in the largest gap left.
_STEP = (5**0.5 - 1) / 2


class EvenDraws:
    """A callable like ``random.random``; one per process (its start is random, so processes
    do not draw alike)."""

    __slots__ = ("_at",)

    def __init__(self, start: float | None = None) -> None:
        self._at = random.random() if start is None else start % 1.0

    def __call__(self) -> float:
        self._at = (self._at + _STEP) % 1.0
        return self._at
