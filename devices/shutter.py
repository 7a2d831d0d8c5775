"""A simulated beam shutter: ``set("open")`` / ``set("closed")``, taking simulated time to actuate.

The X-ray detector asks the shutter whether beam reaches the sample; with the shutter closed it
records dark frames (detector offset and read noise only).
"""

from __future__ import annotations

import threading
from typing import Any, Literal

from ophyd import Component as Cpt
from ophyd import Device
from ophyd.status import DeviceStatus

from corrflow.devices.clock import SimClock
from corrflow.devices.signals import ConfigSignal, ReadbackSignal, positive_finite

__all__ = ["Shutter", "ShutterState", "SHUTTER_STATES"]

ShutterState = Literal["open", "closed"]
SHUTTER_STATES: tuple[ShutterState, ...] = ("open", "closed")


class Shutter(Device):
    """A beam shutter that opens and closes in ``actuation_time_s`` simulated seconds.

    Parameters
    ----------
    name
        Device name; the state's data key is the shutter's name.
    clock
        Simulated clock.

    Notes
    -----
    Components: ``state`` (normal, ``"open"`` or ``"closed"``, written only by the device) and
    ``actuation_time_s`` (config, simulated seconds). The shutter starts closed: no beam on
    the sample until a plan asks for it.
    """

    state = Cpt(ReadbackSignal, value="closed", kind="normal")
    actuation_time_s = Cpt(ConfigSignal, value=0.05, kind="config", units="s", check=positive_finite)

    def __init__(self, prefix: str = "", *, name: str, clock: SimClock, **kwargs: Any) -> None:
        super().__init__(prefix=prefix, name=name, **kwargs)
        self.state.name = self.name
        self._clock = clock

    @property
    def is_open(self) -> bool:
        """True when the shutter is fully open (beam on the sample)."""
        return self.state.get() == "open"

    def set(self, value: ShutterState) -> DeviceStatus:
        """Start opening or closing; the status finishes when the blade has moved.

        Raises
        ------
        ValueError
            ``value`` is not ``"open"`` or ``"closed"``.
        """
        if value not in SHUTTER_STATES:
            raise ValueError(f"{self.name}: value must be one of {SHUTTER_STATES}, got {value!r}")
        actuation_s = self.actuation_time_s.get()
        status = DeviceStatus(self, timeout=self._clock.timeout_s(actuation_s))
        if self.state.get() == value:
            status.set_finished()
            return status

        def actuate() -> None:
            # Between the two positions the beam is partly blocked; report "closed" until fully open
            # so no frame taken meanwhile is mistaken for a flat.
            if value == "closed":
                self.state.put("closed", internal=True)
            self._clock.sleep(actuation_s)
            self.state.put(value, internal=True)
            status.set_finished()

        threading.Thread(target=actuate, name=f"{self.name}-actuate", daemon=True).start()
        return status
