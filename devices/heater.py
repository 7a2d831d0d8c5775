"""The simulated sample furnace as a settable ophyd device.

``set(temperature_K)`` changes the world's heater setpoint and returns a status that finishes only
when the *measured* temperature has stayed within ``tolerance_K`` of the setpoint for ``settle_s``
simulated seconds (an in-situ scan must not start while the sample is still drifting). A
background thread polls the world's thermocouple on the simulated clock; the status has a
timeout derived from the ramp rate and thermal time constant.

The measured signals (``readback``, ``power_W``) are *monitored* as their EPICS counterparts are:
while anything subscribes to their value (a suspender, a live plot), a thread reads the world once
per simulated second (at most every ``5 ms`` of wall time) and posts each reading to the
subscribers, so a temperature that leaves its band between two reads of the plan is still seen.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device
from ophyd.signal import SignalRO
from ophyd.status import DeviceStatus

from corrflow.devices.settling import SettlingStatusMixin, TemperatureSetpointMixin

from corrflow.devices.clock import SimClock
from corrflow.devices.signals import ConfigSignal, ReadbackSignal, finite, positive_finite
from corrflow.simulators.world import SimulatedWorld

__all__ = ["Heater"]

# Thermocouple polls per simulated second while settling, and the shortest wall-clock poll
# interval (so a large time_scale does not spin a core).
_POLLS_PER_SIMULATED_S = 1.0
_MIN_POLL_WALL_S = 0.001
# Settling takes a few thermal time constants after the ramp; the timeout allows this many.
_SETTLE_TIME_CONSTANTS = 10.0
# Monitor updates of the measured signals per simulated second, and the shortest wall-clock interval
# between two (the IOC posts at a fixed wall rate; in simulated time a disturbance relaxes within
# a few time constants, i.e. tens of milliseconds of wall time at the default time_scale).
_MONITOR_PER_SIMULATED_S = 1.0
_MIN_MONITOR_WALL_S = 0.005


def _non_negative_finite(value: Any) -> None:
    finite(value)
    if value < 0:
        raise ValueError(f"expected a value >= 0, got {value!r}")


class _Measured(SignalRO):
    """A read-only signal whose value is computed by its parent device at each ``get()``.

    Monitored like a Channel Access readback: while it has value subscribers, a daemon thread
    measures on the parent's simulated clock and runs their callbacks with each new value.
    """

    def __init__(self, *args: Any, measure: str, units: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._measure_name = measure
        self._units = units
        self._monitor_lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    def get(self, **kwargs: Any) -> float:
        self._readback = getattr(self.parent, self._measure_name)()
        self._metadata["timestamp"] = time.time()
        return self._readback

    def subscribe(self, callback: Any, event_type: str | None = None, run: bool = True) -> int:
        cid = super().subscribe(callback, event_type=event_type, run=run)
        if (event_type or self._default_sub) == self.SUB_VALUE:
            self._start_monitor()
        return cid

    def _has_value_subscribers(self) -> bool:
        return bool(self._callbacks[self.SUB_VALUE])

    def _start_monitor(self) -> None:
        with self._monitor_lock:
            if self._monitor is not None and self._monitor.is_alive():
                return
            self._monitor = threading.Thread(target=self._post_readings, name=f"{self.name}-monitor", daemon=True)
            self._monitor.start()

    def _post_readings(self) -> None:
        # Ends by itself once the last value subscriber is gone (unsubscribe / clear_sub).
        clock: SimClock = self.parent._clock
        period_wall_s = max(_MIN_MONITOR_WALL_S, clock.wall_s(1.0 / _MONITOR_PER_SIMULATED_S))
        while True:
            time.sleep(period_wall_s)
            with self._monitor_lock:
                if not self._has_value_subscribers():
                    self._monitor = None
                    return
            old = self._readback
            value = self.get()
            self._run_subs(sub_type=self.SUB_VALUE, old_value=old, value=value, timestamp=self._metadata["timestamp"])

    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()
        description[self.name]["units"] = self._units
        return description


class Heater(SettlingStatusMixin, TemperatureSetpointMixin, Device):
    """Sample furnace: setpoint, measured temperature, ramp rate, power, settle criterion.

    Parameters
    ----------
    name
        Device name; the measured temperature's data key is the heater's name.
    world
        The simulated world whose heater model and thermocouple this device drives.
    clock
        Simulated clock (default: the world's).

    Notes
    -----
    Components: ``readback`` (hinted, measured temperature, K), ``setpoint`` (normal, K),
    ``power_W`` (normal, heating power the controller applies), ``ramp_rate_K_per_s``,
    ``time_constant_s`` (config, from the furnace model), ``heat_capacity_J_per_K``,
    ``tolerance_K``, ``settle_s`` (config; the settle criterion of ``set``).
    """

    readback = Cpt(_Measured, measure="_measure_temperature_K", units="K", kind="hinted")
    setpoint = Cpt(ReadbackSignal, value=0.0, kind="normal", units="K")
    power_W = Cpt(_Measured, measure="_heating_power_W", units="W", kind="normal")
    ramp_rate_K_per_s = Cpt(ReadbackSignal, value=0.0, kind="config", units="K/s")
    time_constant_s = Cpt(ReadbackSignal, value=0.0, kind="config", units="s")
    heat_capacity_J_per_K = Cpt(ConfigSignal, value=2.0, kind="config", units="J/K", check=positive_finite)
    tolerance_K = Cpt(ConfigSignal, value=1.0, kind="config", units="K", check=positive_finite)
    settle_s = Cpt(ConfigSignal, value=30.0, kind="config", units="s", check=_non_negative_finite)

    def __init__(
        self, prefix: str = "", *, name: str, world: SimulatedWorld, clock: SimClock | None = None, **kwargs: Any
    ) -> None:
        super().__init__(prefix=prefix, name=name, **kwargs)
        self._world = world
        self._clock = clock if clock is not None else SimClock.of_world(world)
        self.readback.name = self.name
        model = world.heater
        self.setpoint.put(float(model.setpoint_K), internal=True)
        self.ramp_rate_K_per_s.put(float(model.max_ramp_K_per_s), internal=True)
        self.time_constant_s.put(float(model.time_constant_s), internal=True)
        self._init_settling()

    # -- measurements ------------------------------------------------------------------------
    def _measure_temperature_K(self) -> float:
        return self._world.measure_temperature_K()

    def _heating_power_W(self) -> float:
        # Power that drives the first-order furnace along its (rate-limited) trajectory:
        # C dT/dt = P - C (T - T_ambient) / tau.
        model = self._world.heater
        temperature_K = self._world.sample_temperature_K()
        tau, rate = model.time_constant_s, model.max_ramp_K_per_s
        dT_dt = min(max((model.setpoint_K - temperature_K) / tau, -rate), rate)
        return self.heat_capacity_J_per_K.get() * (dT_dt + (temperature_K - model.ambient_K) / tau)

    def now_s(self) -> float:
        """The time base of ``settle_s``: simulated seconds (the world's clock)."""
        return self._clock.now_s()

    @property
    def limits(self) -> tuple[float, float]:
        """Allowed setpoints (K)."""
        model = self._world.heater
        return (float(model.min_setpoint_K), float(model.max_K))

    # -- control -------------------------------------------------------------------------------
    def set(self, temperature_K: float) -> DeviceStatus:
        """Change the setpoint; the status finishes once the temperature has settled.

        Settled means: every reading within ``tolerance_K`` of the setpoint for ``settle_s``
        simulated seconds. A new ``set`` or ``stop`` fails the pending status.

        Raises
        ------
        ValueError
            ``temperature_K`` is not a number or outside :attr:`limits`; the setpoint is unchanged.
        """
        self.check_value(temperature_K)
        target_K = float(temperature_K)
        tolerance_K = float(self.tolerance_K.get())
        settle_s = float(self.settle_s.get())
        model = self._world.heater
        expected_s = (
            abs(target_K - self._world.sample_temperature_K()) / model.max_ramp_K_per_s
            + _SETTLE_TIME_CONSTANTS * model.time_constant_s
            + settle_s
        )
        self._cancel_pending()
        status = DeviceStatus(self, timeout=self._clock.timeout_s(expected_s))
        self._world.set_heater_setpoint(target_K)
        self.setpoint.put(target_K, internal=True)
        self._start_settling(status, self._wait_until_settled, target_K, tolerance_K, settle_s)
        return status

    def stop(self, *, success: bool = False) -> None:
        """Stop waiting for the temperature to settle; the furnace keeps its setpoint."""
        self._cancel_pending(success=success)
        super().stop(success=success)

    def _wait_until_settled(
        self,
        target_K: float,
        tolerance_K: float,
        settle_s: float,
        interrupt: threading.Event,
        status: DeviceStatus,
    ) -> None:
        clock = self._clock
        poll_wall_s = max(_MIN_POLL_WALL_S, clock.wall_s(1.0 / _POLLS_PER_SIMULATED_S))
        within_since_s: float | None = None
        while not status.done:
            temperature_K = self._world.measure_temperature_K()
            now_s = clock.now_s()
            if math.fabs(temperature_K - target_K) <= tolerance_K:
                if within_since_s is None:
                    within_since_s = now_s
                if now_s - within_since_s >= settle_s:
                    break
            else:
                within_since_s = None
            if interrupt.wait(poll_wall_s):
                return  # a new set() or stop() finished this status already
        self._finish_if_pending(status)
