"""Simulated time shared by the simulated devices.

Simulated devices take *simulated* seconds to move, expose or settle (the physics world runs
``time_scale`` simulated seconds per wall-clock second). Each device waits on background
threads only, so ``set()``/``trigger()`` never block the RunEngine; this module turns simulated
durations into wall-clock waits and into status timeouts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corrflow.simulators.world import SimulatedWorld

__all__ = ["SimClock"]


@dataclass(frozen=True)
class SimClock:
    """Simulated clock: ``now_s()`` in simulated seconds, advancing ``time_scale`` x wall time.

    Parameters
    ----------
    now_s
        Returns the current simulated time in seconds (e.g. ``SimulatedWorld.now_s``), so motion,
        exposures and heating of every device share the world's clock.
    time_scale
        Simulated seconds per wall-clock second (> 0); used to turn simulated durations into
        wall-clock sleeps and timeouts.
    timeout_margin_s
        Wall-clock seconds added to every status timeout: threads on a loaded machine start late,
        and a timeout must flag a stuck device, not a busy computer.
    """

    now_s: Callable[[], float]
    time_scale: float
    timeout_margin_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale!r}")
        if not self.timeout_margin_s >= 0:
            raise ValueError(f"timeout_margin_s must be >= 0, got {self.timeout_margin_s!r}")

    @classmethod
    def of_world(cls, world: SimulatedWorld, *, timeout_margin_s: float = 10.0) -> SimClock:
        """The clock of a :class:`~corrflow.simulators.world.SimulatedWorld` (shared by its devices)."""
        return cls(now_s=world.now_s, time_scale=world.time_scale, timeout_margin_s=timeout_margin_s)

    @classmethod
    def wall(cls, *, time_scale: float = 1.0, timeout_margin_s: float = 10.0) -> SimClock:
        """A clock of its own (not tied to a world): ``time_scale`` x ``time.monotonic()``."""
        origin = time.monotonic()
        return cls(
            now_s=lambda: (time.monotonic() - origin) * time_scale,
            time_scale=time_scale,
            timeout_margin_s=timeout_margin_s,
        )

    def wall_s(self, simulated_s: float) -> float:
        """Wall-clock seconds that ``simulated_s`` simulated seconds take."""
        return max(0.0, simulated_s) / self.time_scale

    def timeout_s(self, simulated_s: float) -> float:
        """Wall-clock status timeout for an operation expected to take ``simulated_s``."""
        return 2.0 * self.wall_s(simulated_s) + self.timeout_margin_s

    def sleep(self, simulated_s: float, *, interrupt: threading.Event | None = None) -> bool:
        """Wait ``simulated_s`` simulated seconds; returns True if ``interrupt`` was set meanwhile."""
        wait_s = self.wall_s(simulated_s)
        if interrupt is None:
            time.sleep(wait_s)
            return False
        return interrupt.wait(wait_s)
