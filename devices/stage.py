"""Sample stages of the two instruments, declared once as ophyd devices of simulated axes.

Frames (see docs/GEOMETRY.md): the beamline ``SampleStage`` translates the sample in the lab frame
(x, y horizontal, the beam along +y, z up) and rotates it counter-clockwise seen from +z about
the vertical rotation axis; ``tip``/``tilt`` level the rotation axis (recorded, not simulated:
the simulated axis is aligned). The ``MicroscopeStage`` moves the sample under the beam of the
microscope in the ``microscope_stage`` frame.
"""

from __future__ import annotations

from typing import Any

from ophyd import Component as Cpt
from ophyd import Device

from corrflow.devices.clock import SimClock
from corrflow.devices.motors import SimMotor

__all__ = ["SampleStage", "MicroscopeStage"]


class _ClockedDevice(Device):
    """A device whose simulated sub-devices share one :class:`SimClock` (see ``clock_of``)."""

    def __init__(self, prefix: str = "", *, name: str, clock: SimClock, **kwargs: Any) -> None:
        # Set before Device.__init__ builds the components, which look the clock up on their parent.
        self.clock = clock
        super().__init__(prefix=prefix, name=name, **kwargs)


class SampleStage(_ClockedDevice):
    """Tomography sample stage: x, y, z translations (um), rotation, tip and tilt (deg).

    Parameters
    ----------
    name
        Device name; axes are named ``{name}_x``, ``{name}_rotation``, ...
    clock
        Simulated clock the axes move on.

    Notes
    -----
    The rotation is the hinted axis of a tomography scan; translations are read with every frame
    so the detector geometry of each frame is in the events.
    """

    x = Cpt(SimMotor, egu="um", limits=(-5000.0, 5000.0), velocity=1000.0, kind="normal")
    y = Cpt(SimMotor, egu="um", limits=(-5000.0, 5000.0), velocity=1000.0, kind="normal")
    z = Cpt(SimMotor, egu="um", limits=(-2000.0, 2000.0), velocity=500.0, kind="normal")
    rotation = Cpt(SimMotor, egu="deg", limits=(-360.0, 360.0), velocity=90.0, kind="hinted")
    tip = Cpt(SimMotor, egu="deg", limits=(-5.0, 5.0), velocity=1.0, kind="normal")
    tilt = Cpt(SimMotor, egu="deg", limits=(-5.0, 5.0), velocity=1.0, kind="normal")


class MicroscopeStage(_ClockedDevice):
    """Microscope stage: x, y translations (um) in the ``microscope_stage`` frame.

    Parameters
    ----------
    name
        Device name; axes are named ``{name}_x`` and ``{name}_y``.
    clock
        Simulated clock the axes move on.
    """

    x = Cpt(SimMotor, egu="um", limits=(-10000.0, 10000.0), velocity=2000.0, kind="hinted")
    y = Cpt(SimMotor, egu="um", limits=(-10000.0, 10000.0), velocity=2000.0, kind="hinted")
