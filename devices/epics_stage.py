"""Sample stages of motor records over Channel Access (same axes as :mod:`corrflow.devices.stage`).

PVs: ``<prefix>x``, ``y``, ``z`` (um), ``rot``, ``tip``, ``tilt`` (deg) for the beamline stage
(prefix ``<beamline prefix>stage:``); ``<prefix>x``, ``y`` for the microscope stage (prefix
``<microscope prefix>stage:``). Axis names, frames and kinds are those of the simulated stages,
so plans and documents do not depend on the mode.
"""

from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import Device

from corrflow.devices.epics_base import EpicsAxis

__all__ = ["EpicsMicroscopeStage", "EpicsSampleStage"]


class EpicsSampleStage(Device):
    """Tomography sample stage of motor records: x, y, z (um), rotation, tip, tilt (deg).

    Parameters
    ----------
    prefix
        Prefix of the motor records, e.g. ``"BL:TOMO:stage:"``.
    name
        Device name; axes are named ``{name}_x``, ``{name}_rotation``, ...

    Notes
    -----
    Frame and conventions as :class:`corrflow.devices.stage.SampleStage`. Each axis is an
    :class:`~corrflow.devices.epics_base.EpicsAxis` (soft limits ``.HLM``/``.LLM``, velocity
    ``.VELO``, ``stop()``).
    """

    x = Cpt(EpicsAxis, "x", kind="normal")
    y = Cpt(EpicsAxis, "y", kind="normal")
    z = Cpt(EpicsAxis, "z", kind="normal")
    rotation = Cpt(EpicsAxis, "rot", kind="hinted")
    tip = Cpt(EpicsAxis, "tip", kind="normal")
    tilt = Cpt(EpicsAxis, "tilt", kind="normal")


class EpicsMicroscopeStage(Device):
    """Microscope stage of motor records: x, y (um) in the ``microscope_stage`` frame."""

    x = Cpt(EpicsAxis, "x", kind="hinted")
    y = Cpt(EpicsAxis, "y", kind="hinted")
