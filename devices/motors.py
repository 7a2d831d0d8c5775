"""A simulated motor axis that moves in simulated time, shaped like ophyd's ``EpicsMotor``.

The axis has the user-facing components of a motor record (``readback``, ``setpoint``,
``velocity``, soft limits, engineering unit) and the positioner behaviour the RunEngine relies
on: ``set()`` returns at once with a :class:`~ophyd.status.MoveStatus` that has a timeout; the
motion runs on a background thread at ``velocity`` (units per *simulated* second); ``stop()``
halts it where it is; a target outside the soft limits raises :class:`~ophyd.utils.LimitError`
(a ``ValueError``) before anything moves.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, Kind
from ophyd.positioner import PositionerBase
from ophyd.status import MoveStatus
from ophyd.utils import LimitError

from corrflow.devices.clock import SimClock
from corrflow.devices.signals import ConfigSignal, ReadbackSignal, finite, positive_finite

__all__ = ["SimMotor", "LimitError", "clock_of"]

# Readback updates per wall-clock second while moving: enough for live plots, cheap on 2 cores.
_UPDATES_PER_WALL_S = 200.0


def clock_of(device: Device | None, clock: SimClock | None) -> SimClock:
    """The clock a simulated sub-device runs on: its own, or the nearest parent's ``clock``.

    Components of a declarative ophyd ``Device`` are built from class-level arguments, so the
    parent device (which got the clock from its factory) passes it down by owning ``clock``.
    """
    if clock is not None:
        return clock
    parent = device
    while parent is not None:
        found = getattr(parent, "clock", None)
        if isinstance(found, SimClock):
            return found
        parent = getattr(parent, "parent", None)
    raise TypeError("a simulated device needs clock=SimClock(...) or a parent device with a `clock`")


class SimMotor(Device, PositionerBase):
    """A simulated motor axis with soft limits, velocity and timed, stoppable motion.

    Parameters
    ----------
    prefix
        Unused (kept for ophyd's ``Device`` signature, so EPICS motors can replace this class).
    name
        Device name; the readback's data key is the motor's name (as with ``EpicsMotor``).
    egu
        Engineering unit of positions, e.g. ``"um"`` or ``"deg"``.
    limits
        Soft limits ``(low, high)`` in ``egu``; moves outside them are refused before moving.
    velocity
        Speed in ``egu`` per simulated second (> 0).
    init_pos
        Starting position in ``egu`` (must be inside the limits).
    clock
        Simulated clock; if omitted, the parent device's ``clock`` is used.
    **kwargs
        Passed to :class:`ophyd.Device` (``parent``, ``kind``, ...).

    Notes
    -----
    Components: ``readback`` (hinted, the position), ``setpoint`` (normal, the last target),
    ``velocity``, ``low_limit_travel``, ``high_limit_travel``, ``motor_egu`` (config),
    ``motor_is_moving`` (omitted).
    """

    readback = Cpt(ReadbackSignal, value=0.0, kind="hinted")
    setpoint = Cpt(ReadbackSignal, value=0.0, kind="normal")
    velocity = Cpt(ConfigSignal, value=1.0, kind="config", check=positive_finite)
    low_limit_travel = Cpt(ConfigSignal, value=0.0, kind="config", check=finite)
    high_limit_travel = Cpt(ConfigSignal, value=0.0, kind="config", check=finite)
    motor_egu = Cpt(ConfigSignal, value="", kind="config")
    motor_is_moving = Cpt(ReadbackSignal, value=0, kind="omitted")

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        egu: str,
        limits: tuple[float, float],
        velocity: float,
        init_pos: float = 0.0,
        clock: SimClock | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(prefix=prefix, name=name, **kwargs)
        low, high = (float(limit) for limit in limits)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"{name}: limits must be finite with low < high, got {limits!r}")
        self._clock = clock_of(self.parent, clock)
        # The motor's name is the data key of its position, as for EpicsMotor.
        self.readback.name = self.name
        self.low_limit_travel.put(low)
        self.high_limit_travel.put(high)
        self.velocity.put(float(velocity))
        self.motor_egu.put(egu)
        for signal in (self.readback, self.setpoint):
            signal._units = egu
        self._motion_lock = threading.Lock()
        self._interrupt: threading.Event | None = None
        # (t0_s, start, target, velocity) of the latest move, in simulated time: the readback is
        # only sampled a few hundred times per wall second, the profile gives the exact position.
        self._profile: tuple[float, float, float, float] | None = None
        self.check_value(init_pos)
        self.setpoint.put(float(init_pos), internal=True)
        self.readback.put(float(init_pos), internal=True)

    # -- PositionerBase interface -----------------------------------------------------------
    @property
    def egu(self) -> str:
        return self.motor_egu.get()

    @property
    def limits(self) -> tuple[float, float]:
        return (self.low_limit_travel.get(), self.high_limit_travel.get())

    @property
    def clock(self) -> SimClock:
        return self._clock

    def check_value(self, pos: Any) -> None:
        """Refuse non-numbers and positions outside the soft limits (``LimitError``)."""
        try:
            finite(pos)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        low, high = self.limits
        if not low <= pos <= high:
            raise LimitError(f"{self.name}: position {pos} {self.egu} is outside the limits [{low}, {high}]")

    @property
    def hints(self) -> dict[str, list[str]]:
        # Device.hints (first in the MRO) ignores the axis' own kind: an axis declared "normal"
        # in its stage must not hint its readback (PositionerBase's rule).
        if Kind.hinted & ~Kind.normal & self.kind:
            return super().hints
        return {"fields": []}

    def locate(self) -> dict[str, float]:
        """Bluesky ``Locatable``: the last target and the current position."""
        return {"setpoint": self.setpoint.get(), "readback": self.readback.get()}

    def move(self, position: float, wait: bool = False, **kwargs: Any) -> MoveStatus:
        """Start a move to ``position`` and return its status at once (``wait`` is not supported).

        Raises
        ------
        LimitError
            ``position`` is outside the soft limits; nothing moves.
        ValueError
            ``position`` is not a finite number; nothing moves.
        """
        if wait:
            # A blocking move would stall the RunEngine's event loop; plans wait on the status.
            raise ValueError(f"{self.name}: move(wait=True) is not supported; wait on the returned status")
        self.check_value(position)
        target = float(position)
        start = self.position
        velocity = self.velocity.get()
        duration_s = abs(target - start) / velocity
        if kwargs.get("timeout") is None:  # PositionerBase.set passes timeout=None explicitly
            kwargs["timeout"] = self._clock.timeout_s(duration_s)
        self._halt_motion()  # a new target replaces a move in progress (its status fails)
        status = super().move(target, **kwargs)
        interrupt = threading.Event()
        with self._motion_lock:
            self._interrupt = interrupt
            self._moving = True
            self._profile = (self._clock.now_s(), start, target, velocity)
        self.setpoint.put(target, internal=True)
        self.motor_is_moving.put(1, internal=True)
        self._run_subs(sub_type=self.SUB_START, timestamp=time.time())
        threading.Thread(
            target=self._run_motion,
            args=(start, target, velocity, interrupt),
            name=f"{self.name}-motion",
            daemon=True,
        ).start()
        return status

    def stop(self, *, success: bool = False) -> None:
        """Halt the motion where it is; the pending move status finishes (failed unless ``success``)."""
        self._halt_motion()
        # Device.stop comes first in the MRO and only stops sub-devices; the positioner's
        # stop is what finishes the pending move status.
        PositionerBase.stop(self, success=success)

    # -- exact trajectory ---------------------------------------------------------------------
    def _position_at_locked(self, time_s: float) -> float:
        if self._profile is None:
            return float(self.readback.get())
        t0, start, target, velocity = self._profile
        travelled = max(0.0, time_s - t0) * velocity
        if travelled >= abs(target - start):
            return target
        return start + math.copysign(travelled, target - start)

    def position_at(self, time_s: float) -> float:
        """Exact position (``egu``) at simulated time ``time_s`` along the latest move.

        The ``readback`` signal is sampled a few hundred times per *wall* second; a detector
        exposing while this axis moves asks for the position at the exposure's own time instead.
        """
        with self._motion_lock:
            return self._position_at_locked(time_s)

    def time_passing(self, position: float, *, after_s: float = -math.inf) -> float | None:
        """Simulated time at which the latest move passes ``position``.

        ``None`` if that move does not pass it or began before simulated time ``after_s``.
        """
        with self._motion_lock:
            if self._profile is None:
                return None
            t0, start, target, velocity = self._profile
        if t0 < after_s:
            return None
        low, high = min(start, target), max(start, target)
        if start == target or not low <= position <= high:
            return None
        return t0 + abs(position - start) / velocity

    # -- motion -----------------------------------------------------------------------------
    def _halt_motion(self) -> None:
        with self._motion_lock:
            if self._interrupt is not None:
                self._interrupt.set()
                self._interrupt = None
                # Stopped where it is now: the profile becomes a standstill there.
                here = self._position_at_locked(self._clock.now_s())
                self._profile = (self._clock.now_s(), here, here, 1.0)
            self._moving = False
        self.motor_is_moving.put(0, internal=True)

    def _run_motion(self, start: float, target: float, velocity: float, interrupt: threading.Event) -> None:
        clock = self._clock
        t0 = clock.now_s()
        duration_s = abs(target - start) / velocity
        direction = math.copysign(1.0, target - start)
        step_wall_s = 1.0 / _UPDATES_PER_WALL_S
        while True:
            elapsed_s = clock.now_s() - t0
            if elapsed_s >= duration_s:
                break
            self.readback.put(start + direction * velocity * elapsed_s, internal=True)
            remaining_wall_s = clock.wall_s(duration_s - elapsed_s)
            if interrupt.wait(min(step_wall_s, remaining_wall_s)):
                return  # stop() reported the end of this move already
        with self._motion_lock:
            if interrupt.is_set():
                return
            self._interrupt = None
            self._moving = False
        # Outside the lock: subscribers of the readback may call stop() or move().
        self.readback.put(target, internal=True)
        self.motor_is_moving.put(0, internal=True)
        self._done_moving(success=True, timestamp=time.time(), value=target)

    @readback.sub_value
    def _readback_changed(self, value: float | None = None, **kwargs: Any) -> None:
        # Keeps PositionerBase.position and its SUB_READBACK subscribers in step with the signal.
        self._set_position(value)
