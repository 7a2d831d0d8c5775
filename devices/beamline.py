"""Device factory of the tomography beamline (one module per instrument; nothing is built at import).

:func:`build_beamline` turns the settings into devices. One setting, ``settings.beamline.mode``,
picks the implementation of the same device interfaces:

- ``"sim"``: simulated ophyd devices driven in-process by a
  :class:`~corrflow.simulators.world.SimulatedWorld`;
- ``"epics"``: ophyd EPICS devices over Channel Access under ``settings.beamline.epics_prefix``
  (``<P>stage:`` motor records, ``<P>det:`` areaDetector camera + HDF5 plugin, ``<P>tc:`` furnace
  controller, ``<P>src:`` shutter and ring current), e.g. the simulated facility served by
  :mod:`corrflow.simulators.ioc` (``corrflow sim up``) or a real beamline with those PVs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ophyd import Device

from corrflow.devices.clock import SimClock
from corrflow.devices.detectors import XrayDetector
from corrflow.devices.epics_base import CONNECTION_TIMEOUT_S
from corrflow.devices.epics_detector import EpicsXrayDetector
from corrflow.devices.epics_heater import EpicsHeater
from corrflow.devices.epics_source import BeamMonitor, EpicsShutter
from corrflow.devices.epics_stage import EpicsSampleStage
from corrflow.devices.heater import Heater
from corrflow.devices.shutter import Shutter
from corrflow.devices.stage import SampleStage
from corrflow.config.settings import Settings
from corrflow.simulators.world import SimulatedWorld

__all__ = ["Beamline", "build_beamline", "connect_devices", "SIMULATED_FACILITY"]

SIMULATED_FACILITY = "corrflow-sim-synchrotron"


@dataclass(frozen=True)
class Beamline:
    """The devices of the tomography beamline, and what identifies it in metadata.

    Attributes
    ----------
    name
        Instrument name (``settings.beamline.name``).
    facility
        Facility name.
    frame
        Name of the sample frame of reference (``settings.beamline.frame``).
    stage, detector, shutter, heater
        The devices (simulated or EPICS, same interfaces).
    data_dir
        Where the detector writes its HDF5 files.
    beam
        Ring-current monitor (EPICS mode; ``None`` for the simulated source of constant flux).
    mode
        ``"sim"`` or ``"epics"``.
    """

    name: str
    facility: str
    frame: str
    stage: SampleStage | EpicsSampleStage
    detector: XrayDetector | EpicsXrayDetector
    shutter: Shutter | EpicsShutter
    heater: Heater | EpicsHeater
    data_dir: Path
    beam: BeamMonitor | None = None
    mode: str = "sim"

    def devices(self) -> tuple[Any, ...]:
        """All devices, e.g. to hand to a queue server or a RunEngine's ``stop``."""
        devices: tuple[Any, ...] = (self.stage, self.detector, self.shutter, self.heater)
        return devices + ((self.beam,) if self.beam is not None else ())


def connect_devices(devices: tuple[Device, ...] | list[Device], *, timeout_s: float) -> None:
    """Wait until every signal of ``devices`` is connected.

    Raises
    ------
    TimeoutError
        Naming every device and PV that did not connect within ``timeout_s``.
    """
    problems = []
    for device in devices:
        try:
            device.wait_for_connection(all_signals=True, timeout=timeout_s)
        except TimeoutError as exc:
            problems.append(f"{device.name}: {exc}")
            timeout_s = 0.1  # the others had the same time to connect meanwhile
    if problems:
        raise TimeoutError("EPICS devices did not connect:\n" + "\n".join(problems))


def build_beamline(
    settings: Settings,
    world: SimulatedWorld | None = None,
    *,
    data_dir: Path | str | None = None,
    connection_timeout_s: float = CONNECTION_TIMEOUT_S,
) -> Beamline:
    """Build the beamline's devices from the settings.

    Parameters
    ----------
    settings
        Validated settings; ``settings.beamline.mode`` picks simulated or EPICS devices.
    world
        The simulated world the simulated devices act on (sample, heater, clock); required in
        ``"sim"`` mode, ignored in ``"epics"`` mode (the IOCs hold the physics).
    data_dir
        Directory for detector files (on the IOC host in EPICS mode); default
        ``settings.beamline_storage``. Created when the detector is first staged, not here.
    connection_timeout_s
        EPICS mode: how long to wait for every PV to connect.

    Raises
    ------
    TimeoutError
        EPICS mode: PVs did not connect (the message names them).
    TypeError
        ``"sim"`` mode without a ``SimulatedWorld``.
    """
    directory = Path(data_dir) if data_dir is not None else settings.beamline_storage
    if settings.beamline.mode == "epics":
        return _build_epics_beamline(settings, directory, connection_timeout_s)
    if not isinstance(world, SimulatedWorld):
        raise TypeError(f"world must be a SimulatedWorld for simulated devices, got {type(world).__name__}")
    clock = SimClock.of_world(world)
    stage = SampleStage(name="sample_stage", clock=clock)
    shutter = Shutter(name="shutter", clock=clock)
    detector = XrayDetector(
        name="xray_detector", world=world, stage=stage, shutter=shutter, data_dir=directory, clock=clock
    )
    heater = Heater(name="heater", world=world, clock=clock)
    return Beamline(
        name=settings.beamline.name,
        facility=SIMULATED_FACILITY,
        frame=settings.beamline.frame,
        stage=stage,
        detector=detector,
        shutter=shutter,
        heater=heater,
        data_dir=directory.absolute(),
    )


def _build_epics_beamline(settings: Settings, directory: Path, connection_timeout_s: float) -> Beamline:
    prefix = settings.beamline.epics_prefix
    stage = EpicsSampleStage(f"{prefix}stage:", name="sample_stage")
    shutter = EpicsShutter(f"{prefix}src:shutter:", name="shutter")
    detector = EpicsXrayDetector(f"{prefix}det:", name="xray_detector", data_dir=directory)
    heater = EpicsHeater(f"{prefix}tc:", name="heater")
    beam = BeamMonitor(f"{prefix}src:", name="beam")
    connect_devices([stage, shutter, detector, heater, beam], timeout_s=connection_timeout_s)
    return Beamline(
        name=settings.beamline.name,
        facility=f"epics:{prefix}",
        frame=settings.beamline.frame,
        stage=stage,
        detector=detector,
        shutter=shutter,
        heater=heater,
        data_dir=directory.absolute(),
        beam=beam,
        mode="epics",
    )
