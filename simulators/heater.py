"""Sample heater: first-order thermal lag toward the setpoint with a ramp-rate limit and a noisy sensor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["HeaterModel"]


@dataclass
class HeaterModel:
    """State and physics of a furnace around the sample.

    The true temperature follows ``dT/dt = clip((setpoint - T) / tau, -r, +r)``: a first-order lag with
    time constant ``tau`` whose rate is limited to ``r`` (the controller's ramp limit). :meth:`advance`
    integrates this *exactly*, so the result does not depend on how the time is split into steps.

    Attributes
    ----------
    ambient_K
        Room temperature and the initial state (K).
    time_constant_s
        Thermal time constant ``tau`` (s).
    max_ramp_K_per_s
        Largest ``|dT/dt|`` (K/s).
    noise_K
        Standard deviation of the sensor noise (K).
    max_K
        Highest allowed setpoint (K).
    temperature_K
        True sample temperature (state, K); defaults to ``ambient_K``.
    setpoint_K
        Current setpoint (state, K); defaults to ``ambient_K``.
    """

    ambient_K: float = 293.15
    time_constant_s: float = 20.0
    max_ramp_K_per_s: float = 5.0
    noise_K: float = 0.05
    max_K: float = 1273.0
    temperature_K: float | None = None
    setpoint_K: float | None = None

    def __post_init__(self) -> None:
        for name in ("ambient_K", "time_constant_s", "max_ramp_K_per_s", "max_K"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if not (math.isfinite(self.noise_K) and self.noise_K >= 0):
            raise ValueError(f"noise_K must be a non-negative finite number, got {self.noise_K}")
        if self.max_K <= self.ambient_K:
            raise ValueError(f"max_K ({self.max_K}) must be above ambient_K ({self.ambient_K})")
        if self.temperature_K is None:
            self.temperature_K = float(self.ambient_K)
        if self.setpoint_K is None:
            self.setpoint_K = float(self.ambient_K)
        self._check_setpoint(self.setpoint_K)

    @property
    def min_setpoint_K(self) -> float:
        """Lowest allowed setpoint (K): 50 K below ambient (the furnace has only modest cooling)."""
        return self.ambient_K - 50.0

    def _check_setpoint(self, setpoint_K: float) -> None:
        if not (math.isfinite(setpoint_K) and self.min_setpoint_K <= setpoint_K <= self.max_K):
            raise ValueError(
                f"setpoint_K must be within [{self.min_setpoint_K}, {self.max_K}] K, got {setpoint_K}"
            )

    def set_setpoint(self, setpoint_K: float) -> None:
        """Change the setpoint (K); raises ``ValueError`` outside ``[ambient_K - 50, max_K]``."""
        setpoint_K = float(setpoint_K)
        self._check_setpoint(setpoint_K)
        self.setpoint_K = setpoint_K

    def advance(self, dt_s: float) -> None:
        """Let ``dt_s`` seconds pass (exact solution of the rate-limited first-order lag)."""
        if not (math.isfinite(dt_s) and dt_s >= 0):
            raise ValueError(f"dt_s must be a non-negative finite number, got {dt_s}")
        tau, rate = self.time_constant_s, self.max_ramp_K_per_s
        error = self.setpoint_K - self.temperature_K
        sign = math.copysign(1.0, error)
        # While |error| > rate * tau the lag would exceed the ramp limit: the temperature ramps linearly.
        ramp_band = rate * tau
        if abs(error) > ramp_band:
            t_ramp = (abs(error) - ramp_band) / rate
            if dt_s <= t_ramp:
                self.temperature_K += sign * rate * dt_s
                return
            dt_s -= t_ramp
            error = sign * ramp_band
        # Inside the band the lag is exponential and its rate |error|/tau never exceeds the limit.
        self.temperature_K = self.setpoint_K - error * math.exp(-dt_s / tau)

    def disturb(self, delta_K: float) -> None:
        """Add ``delta_K`` to the true temperature at once (a disturbance: a door opened, a gas burst)."""
        delta_K = float(delta_K)
        if not math.isfinite(delta_K):
            raise ValueError(f"delta_K must be finite, got {delta_K}")
        self.temperature_K = float(self.temperature_K) + delta_K

    def measure(self, rng: np.random.Generator) -> float:
        """Sensor reading: true temperature plus Gaussian noise of ``noise_K`` (K)."""
        return float(self.temperature_K + rng.normal(0.0, self.noise_K))
