"""Building blocks of corrflow's EPICS devices: signals and a motor axis whose statuses all time out.

ophyd's EPICS signals wait forever by default on a write (``write_timeout=None``) and
``EpicsMotor.move`` has no timeout unless given one: a stuck or dead IOC would hang a plan.
Here every writable signal gets :data:`WRITE_TIMEOUT_S` and every move a timeout derived from
its distance and velocity, and ``stop()`` fails the pending move (as the simulated motor does).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ophyd import Component as Cpt
from ophyd import EpicsMotor, EpicsSignal, EpicsSignalRO, Kind
from ophyd.positioner import PositionerBase
from ophyd.signal import EpicsSignalBase
from ophyd.status import MoveStatus
from ophyd.utils import DisconnectedError, LimitError

from corrflow.devices.signals import finite

__all__ = [
    "CONNECTION_TIMEOUT_S",
    "EpicsAxis",
    "EpicsSignalWithRBV",
    "WRITE_TIMEOUT_S",
    "Readback",
    "Setting",
    "Command",
    "ensure_connected",
    "put_and_wait",
    "set_all",
    "wait_for_value",
]

WRITE_TIMEOUT_S = 10.0
"""Longest wait for a write (readback match or put completion) of a setting, s."""
CONNECTION_TIMEOUT_S = 5.0
"""Longest wait for a device to connect when it is built, s."""
MOVE_TIMEOUT_MARGIN_S = 10.0
"""Added to twice the expected travel time of a move, s: a loaded machine is slow, a dead IOC is not."""


class EpicsSignalWithRBV(EpicsSignal):
    """A setting ``NAME`` read back from ``NAME_RBV`` (the areaDetector / asyn convention)."""

    def __init__(self, prefix: str, **kwargs: Any) -> None:
        super().__init__(prefix + "_RBV", write_pv=prefix, **kwargs)


def Setting(suffix: str, *, kind: str = "config", **kwargs: Any) -> Cpt:
    """A ``NAME`` / ``NAME_RBV`` pair: ``set()`` returns once the readback holds the value (or times out)."""
    return Cpt(EpicsSignalWithRBV, suffix, kind=kind, write_timeout=WRITE_TIMEOUT_S, **kwargs)


def Command(suffix: str, *, kind: str = "omitted", **kwargs: Any) -> Cpt:
    """A write-only command PV (``set()`` uses put completion when ``put_complete=True``)."""
    return Cpt(EpicsSignal, suffix, kind=kind, write_timeout=WRITE_TIMEOUT_S, **kwargs)


def Readback(suffix: str, *, kind: str = "omitted", **kwargs: Any) -> Cpt:
    """A read-only PV."""
    return Cpt(EpicsSignalRO, suffix, kind=kind, **kwargs)


def ensure_connected(signals: Iterable[EpicsSignalBase], what: str) -> None:
    """Raise :class:`DisconnectedError` at once (no connection wait) if one of ``signals`` is down."""
    down = [signal.pvname for signal in signals if not signal.connected]
    if down:
        raise DisconnectedError(f"{what}: not connected: {', '.join(down)}")


def set_all(pairs: Iterable[tuple[Any, Any]], *, timeout_s: float = WRITE_TIMEOUT_S) -> None:
    """Start ``signal.set(value)`` for every pair, then wait for all (each within ``timeout_s``)."""
    statuses = [(signal, value, signal.set(value, timeout=timeout_s)) for signal, value in pairs]
    for signal, value, status in statuses:
        try:
            status.wait(timeout=timeout_s + 1.0)
        except (TimeoutError, RuntimeError, ValueError) as exc:
            raise RuntimeError(f"{signal.name}: could not set {value!r}: {exc}") from exc


def put_and_wait(signal: EpicsSignal, value: Any, *, timeout_s: float) -> None:
    """Write with put completion and block until the IOC reports the write processed.

    pyepics calls the completion callback whether the IOC accepted the write or not: callers
    check the outcome on the IOC's status PVs afterwards.

    Raises
    ------
    TimeoutError
        No completion within ``timeout_s``.
    """
    done = threading.Event()
    signal.put(value, use_complete=True, callback=lambda *args, **kwargs: done.set(), timeout=timeout_s)
    if not done.wait(timeout_s):
        raise TimeoutError(f"{signal.pvname}: no put completion within {timeout_s} s")


def wait_for_value(signal: EpicsSignalBase, accept: Callable[[Any], bool], *, timeout_s: float, poll_s: float = 0.02) -> Any:
    """Poll ``signal`` (fresh reads) until ``accept(value)``; return the value or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = signal.get(use_monitor=False)
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{signal.pvname}: value {value!r} not accepted within {timeout_s} s")
        time.sleep(poll_s)


class EpicsAxis(EpicsMotor):
    """An EPICS motor record axis whose moves always time out and whose ``stop`` fails the move.

    Same components as ophyd's ``EpicsMotor`` (``user_readback``, ``user_setpoint``,
    ``velocity``, ``high_limit_travel``, ``low_limit_travel``, ``motor_stop``, ...), so it drives
    any motor record. Differences:

    - ``move()`` returns at once (``wait=True`` is refused, as for the simulated motor) with a
      status whose timeout is twice the travel time at ``.VELO`` plus :data:`MOVE_TIMEOUT_MARGIN_S`;
    - ``limits`` are the record's ``.LLM``/``.HLM`` fields (monitored), not the control limits
      of ``.VAL`` that ``EpicsMotor`` reads once and refreshes only from a limit *change* it sees;
    - ``check_value`` refuses non-finite or non-numeric targets besides the soft limits;
    - ``stop()`` writes ``.STOP`` and fails the pending move status (``EpicsMotor`` lets it
      finish as a success when ``.DMOV`` returns to 1);
    - a move waits until the previous one has ended (``.DMOV`` = 1): ``EpicsMotor`` would report a
      move started during a stop as finished when the stopped one ends;
    - an axis declared ``normal`` in its stage does not hint its readback.
    """

    @property
    def limits(self) -> tuple[float, float]:
        return (float(self.low_limit_travel.get()), float(self.high_limit_travel.get()))

    def check_value(self, pos: Any) -> None:
        try:
            finite(pos)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        low, high = self.limits
        if low < high and not low <= pos <= high:
            raise LimitError(f"{self.name}: position {pos} {self.egu} is outside the limits [{low}, {high}]")

    def move(self, position: float, wait: bool = False, *, timeout: float | None = None, moved_cb: Callable[..., Any] | None = None, **kwargs: Any) -> MoveStatus:
        if wait:
            raise ValueError(f"{self.name}: move(wait=True) is not supported; wait on the returned status")
        self.check_value(position)
        if timeout is None:
            velocity = float(self.velocity.get())
            distance = abs(float(position) - float(self.position))
            travel_s = distance / velocity if velocity > 0 else math.inf
            timeout = 2.0 * travel_s + MOVE_TIMEOUT_MARGIN_S
        self._wait_for_previous_move_to_end()
        # EpicsMotor.move without its second limit check against possibly stale control limits.
        self._started_moving = False
        status = PositionerBase.move(self, position, timeout=timeout, moved_cb=moved_cb, **kwargs)
        self.user_setpoint.put(position, wait=False, force=True)
        return status

    def _wait_for_previous_move_to_end(self, *, timeout_s: float = WRITE_TIMEOUT_S) -> None:
        """A stopped (or timed-out) move reports ``.DMOV`` = 1 a moment after the stop: a new move
        started before that would take the old move's end for its own and report success at once,
        wherever the motor is. Wait for it, and refuse to move a motor that does not stop."""
        deadline = time.monotonic() + timeout_s
        while self._moving:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: still moving {timeout_s} s after its previous move was stopped")
            time.sleep(0.005)

    def stop(self, *, success: bool = False) -> None:
        """Write ``.STOP`` and finish the pending move (failed unless ``success``)."""
        self.motor_stop.put(1, wait=False)
        PositionerBase.stop(self, success=success)

    @property
    def hints(self) -> dict[str, list[str]]:
        if Kind.hinted & ~Kind.normal & self.kind:
            return super().hints
        return {"fields": []}

    def locate(self) -> dict[str, float]:
        """Bluesky ``Locatable``: the last target and the current position."""
        return {"setpoint": float(self.user_setpoint.get()), "readback": float(self.user_readback.get())}

