"""Beam signals over Channel Access: the shutter and the ring current.

PVs (prefix ``<beamline prefix>src:``): ``shutter:Cmd`` (Close/Open), ``shutter:State_RBV``
(closed/open), ``shutter:ActuationTime_RBV`` (s), ``RingCurrent_RBV`` (mA).
"""

from __future__ import annotations

from typing import Any

from ophyd import Device
from ophyd.status import SubscriptionStatus

from corrflow.devices.epics_base import Command, Readback, ensure_connected
from corrflow.devices.shutter import SHUTTER_STATES, ShutterState

__all__ = ["BeamMonitor", "EpicsShutter"]

_TIMEOUT_MARGIN_S = 5.0


class EpicsShutter(Device):
    """The beamline shutter: ``set("open")`` / ``set("closed")``, done when the state says so.

    Parameters
    ----------
    prefix
        e.g. ``"BL:TOMO:src:shutter:"``.
    name
        Device name; the state's data key is the shutter's name (as the simulated shutter).

    Notes
    -----
    Components: ``state`` (normal, ``"open"``/``"closed"``), ``actuation_time_s`` (config, s),
    ``cmd`` (omitted).
    """

    cmd = Command("Cmd", string=True)
    state = Readback("State_RBV", kind="normal", string=True, auto_monitor=True)
    actuation_time_s = Readback("ActuationTime_RBV", kind="config")

    def __init__(self, prefix: str = "", *, name: str, **kwargs: Any) -> None:
        super().__init__(prefix=prefix, name=name, **kwargs)
        self.state.name = self.name

    @property
    def is_open(self) -> bool:
        """True when the shutter is fully open."""
        return self.state.get() == "open"

    def set(self, value: ShutterState) -> SubscriptionStatus:
        """Command the shutter; the status finishes when ``State_RBV`` reaches ``value``.

        Raises
        ------
        ValueError
            ``value`` is not ``"open"`` or ``"closed"`` (nothing is written).
        """
        if value not in SHUTTER_STATES:
            raise ValueError(f"{self.name}: value must be one of {SHUTTER_STATES}, got {value!r}")
        ensure_connected([self.cmd, self.state], self.name)
        timeout_s = 2.0 * float(self.actuation_time_s.get()) + _TIMEOUT_MARGIN_S
        target = value
        # run=True: a shutter already in the requested state finishes at once.
        status = SubscriptionStatus(
            self.state, lambda value=None, **kwargs: value == target, timeout=timeout_s, run=True
        )
        self.cmd.put("Open" if value == "open" else "Close", wait=False)
        return status


class BeamMonitor(Device):
    """Storage-ring current (mA), monitored: the signal beam suspenders watch.

    Parameters
    ----------
    prefix
        e.g. ``"BL:TOMO:src:"``.
    name
        Device name; the current's data key is ``{name}_current_mA``.
    """

    current_mA = Readback("RingCurrent_RBV", kind="hinted", auto_monitor=True)
