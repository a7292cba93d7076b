"""How long to wait before trying the API server again: exponential backoff with jitter.

Every agent of a cluster loses the API server at the same moment (an upgrade, a control-plane
outage), and if they all retry on the same schedule they all come back at the same moment too.
Decorrelated jitter (the AWS Architecture Blog's "Exponential Backoff And Jitter") spreads them:
each wait is drawn between the base and three times the previous wait, capped. It never drops
below the base, so a server that fails instantly (connection refused) is not hammered.
"""

from __future__ import annotations

import random


class Backoff:
    """Waits that grow from `base` toward `cap` while failures repeat; `reset` after a success.

    Args:
        base: the shortest wait, and the first one's lower bound, in seconds.
        cap: the longest wait, in seconds.
        rng: the random source (a seeded one makes waits reproducible in tests).
    """

    def __init__(self, *, base: float = 0.2, cap: float = 30.0, rng: random.Random | None = None) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base}, cap={cap}")
        self.base = base
        self.cap = cap
        self._rng = rng or random.Random()
        self._last = base
        self.failures = 0

    def next(self) -> float:
        """The wait before the next attempt, in seconds; each call counts one more failure."""
        self.failures += 1
        self._last = min(self.cap, self._rng.uniform(self.base, self._last * 3))
        return self._last

    def reset(self) -> None:
        """Forgets the failures: the next wait starts from the base again."""
        self._last = self.base
        self.failures = 0
