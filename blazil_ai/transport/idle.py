"""Idle strategies, after Aeron's: spin a little, then yield, then park with a growing sleep."""

from __future__ import annotations

import os
import time


class BackoffIdleStrategy:
    """Call ``idle(work_count)`` after each duty cycle; nothing spins at 100% while there is no work."""

    def __init__(self, max_spins: int = 10, max_yields: int = 20, min_park_s: float = 1e-6,
                 max_park_s: float = 1e-3) -> None:
        self.max_spins = max_spins
        self.max_yields = max_yields
        self.min_park_s = min_park_s
        self.max_park_s = max_park_s
        self.reset()

    def reset(self) -> None:
        """Start backing off from the beginning (after work was done)."""
        self._spins = 0
        self._yields = 0
        self._park = self.min_park_s

    def idle(self, work_count: int = 0) -> None:
        """Back off one step if the last duty cycle did nothing; reset if it did work."""
        if work_count > 0:
            self.reset()
            return
        if self._spins < self.max_spins:
            self._spins += 1
        elif self._yields < self.max_yields:
            self._yields += 1
            os.sched_yield()
        else:
            time.sleep(self._park)
            self._park = min(self._park * 2, self.max_park_s)
