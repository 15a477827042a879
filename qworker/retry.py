"""Retry timing: exponential backoff with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before the next attempt: ``base_s * 2**(attempt-1)``, capped at ``max_s``.

    Half the delay is fixed and half is random ("equal jitter"), so tasks that
    failed together do not all come back at the same instant, and none comes
    back sooner than half its nominal delay.
    """

    base_s: float = 1.0
    max_s: float = 300.0

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        nominal = min(self.max_s, self.base_s * 2 ** max(0, attempt - 1))
        uniform = (rng or random).uniform
        return nominal / 2 + uniform(0.0, nominal / 2)
