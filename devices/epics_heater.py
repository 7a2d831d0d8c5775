"""The furnace temperature controller over Channel Access (same interface as :class:`~corrflow.devices.heater.Heater`).

PVs (prefix ``<beamline prefix>tc:``): ``Setpoint``/``Setpoint_RBV`` (K, its control limits are
the allowed range), ``Temperature_RBV`` (K), ``RampRate``/``RampRate_RBV`` (K/s),
``TimeConstant_RBV`` (s), ``Power_RBV`` (W).

``set(temperature_K)`` writes the setpoint and returns a status that finishes only when the
measured temperature has stayed within ``tolerance_K`` of it for ``settle_s`` seconds (wall
clock); the settle criterion lives in the client (``tolerance_K`` and ``settle_s`` are soft
configuration signals recorded with the run), as at beamlines whose controllers only regulate.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device
from ophyd.status import DeviceStatus

from corrflow.devices.settling import SettlingStatusMixin, TemperatureSetpointMixin

from corrflow.devices.epics_base import Readback, Setting, ensure_connected
from corrflow.devices.signals import ConfigSignal, finite, positive_finite

__all__ = ["EpicsHeater"]

_POLL_S = 0.05
# Settling takes a few time constants after the ramp; the timeout allows this many.
_SETTLE_TIME_CONSTANTS = 10.0
_TIMEOUT_MARGIN_S = 10.0


def _non_negative_finite(value: Any) -> None:
    finite(value)
    if value < 0:
        raise ValueError(f"expected a value >= 0, got {value!r}")


class EpicsHeater(SettlingStatusMixin, TemperatureSetpointMixin, Device):
    """Sample furnace over EPICS: setpoint, measured temperature, ramp rate, power, settle criterion.

    Parameters
    ----------
    prefix
        e.g. ``"BL:TOMO:tc:"``.
    name
        Device name; the measured temperature's data key is the heater's name.

    Notes
    -----
    Components: ``readback`` (hinted, K), ``setpoint`` (normal, K), ``power_W`` (normal, W),
    ``ramp_rate_K_per_s``, ``time_constant_s`` (config), ``tolerance_K``, ``settle_s`` (config,
    soft: the settle criterion of ``set``; ``settle_s`` in wall-clock seconds).
    """

    readback = Readback("Temperature_RBV", kind="hinted", auto_monitor=True)
    setpoint = Setting("Setpoint", kind="normal", limits=True)
    power_W = Readback("Power_RBV", kind="normal")
    ramp_rate_K_per_s = Setting("RampRate", kind="config")
    time_constant_s = Readback("TimeConstant_RBV", kind="config")
    tolerance_K = Cpt(ConfigSignal, value=1.0, kind="config", units="K", check=positive_finite)
    settle_s = Cpt(ConfigSignal, value=30.0, kind="config", units="s", check=_non_negative_finite)

    def __init__(self, prefix: str = "", *, name: str, **kwargs: Any) -> None:
        super().__init__(prefix=prefix, name=name, **kwargs)
        self.readback.name = self.name
        self._init_settling()

    def now_s(self) -> float:
        """The time base of ``settle_s``: wall-clock seconds (``time.monotonic``)."""
        return time.monotonic()

    @property
    def limits(self) -> tuple[float, float]:
        """Allowed setpoints (K): the control limits of ``Setpoint``."""
        low, high = self.setpoint.limits
        return (float(low), float(high))

    def set(self, temperature_K: float) -> DeviceStatus:
        """Write the setpoint; the status finishes once the temperature has settled.

        Settled: every reading within ``tolerance_K`` of the setpoint for ``settle_s`` seconds.
        A new ``set`` or ``stop`` fails the pending status. The timeout allows the ramp at
        ``RampRate``, ten time constants and the settle time, twice, plus a margin.

        Raises
        ------
        ValueError
            ``temperature_K`` is not a number or outside :attr:`limits` (nothing is written).
        """
        self.check_value(temperature_K)
        ensure_connected([self.setpoint, self.readback], self.name)
        target_K = float(temperature_K)
        tolerance_K = float(self.tolerance_K.get())
        settle_s = float(self.settle_s.get())
        ramp = float(self.ramp_rate_K_per_s.get())
        tau = float(self.time_constant_s.get())
        expected_s = abs(target_K - float(self.readback.get())) / ramp + _SETTLE_TIME_CONSTANTS * tau + settle_s
        self._cancel_pending()
        status = DeviceStatus(self, timeout=2.0 * expected_s + _TIMEOUT_MARGIN_S)
        self.setpoint.put(target_K, wait=False)
        self._start_settling(status, self._wait_until_settled, target_K, tolerance_K, settle_s)
        return status

    def stop(self, *, success: bool = False) -> None:
        """Stop waiting for the temperature to settle; the controller keeps its setpoint."""
        self._cancel_pending(success=success)
        super().stop(success=success)

    def _wait_until_settled(
        self, target_K: float, tolerance_K: float, settle_s: float, interrupt: threading.Event, status: DeviceStatus
    ) -> None:
        within_since: float | None = None
        while not status.done:
            temperature_K = self.readback.get()
            now = time.monotonic()
            if temperature_K is not None and math.fabs(float(temperature_K) - target_K) <= tolerance_K:
                if within_since is None:
                    within_since = now
                if now - within_since >= settle_s:
                    break
            else:
                within_since = None
            if interrupt.wait(_POLL_S):
                return  # a new set() or stop() finished this status already
        self._finish_if_pending(status)
