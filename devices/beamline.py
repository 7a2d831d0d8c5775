"""Device factory of the tomography beamline (one module per instrument; nothing is built at import).

:func:`build_beamline` turns the settings into devices: in ``"sim"`` mode simulated ophyd devices
driven by a :class:`~corrflow.simulators.world.SimulatedWorld`; the ``"epics"`` mode (the same
device interfaces over Channel Access) is not implemented yet and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from corrflow.devices.clock import SimClock
from corrflow.devices.detectors import XrayDetector
from corrflow.devices.heater import Heater
from corrflow.devices.shutter import Shutter
from corrflow.devices.stage import SampleStage
from corrflow.settings import Settings
from corrflow.simulators.world import SimulatedWorld

__all__ = ["Beamline", "build_beamline", "SIMULATED_FACILITY"]

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
        The devices.
    data_dir
        Where the detector writes its HDF5 files.
    """

    name: str
    facility: str
    frame: str
    stage: SampleStage
    detector: XrayDetector
    shutter: Shutter
    heater: Heater
    data_dir: Path

    def devices(self) -> tuple[SampleStage, XrayDetector, Shutter, Heater]:
        """All devices, e.g. to hand to a queue server or a RunEngine's ``stop``."""
        return (self.stage, self.detector, self.shutter, self.heater)


def build_beamline(settings: Settings, world: SimulatedWorld, *, data_dir: Path | str | None = None) -> Beamline:
    """Build the beamline's devices from the settings.

    Parameters
    ----------
    settings
        Validated settings; ``settings.beamline.mode`` picks simulated or EPICS devices.
    world
        The simulated world the simulated devices act on (sample, heater, clock).
    data_dir
        Directory for detector files; default ``settings.beamline_storage``. Created when the
        detector is first staged, not here.

    Raises
    ------
    NotImplementedError
        ``settings.beamline.mode == "epics"`` (EPICS devices come with issue #3).
    """
    if settings.beamline.mode == "epics":
        raise NotImplementedError(
            f"beamline mode 'epics' (prefix {settings.beamline.epics_prefix!r}) is not implemented yet: "
            "EPICS devices come with issue #3; use beamline.mode='sim'"
        )
    if not isinstance(world, SimulatedWorld):
        raise TypeError(f"world must be a SimulatedWorld for simulated devices, got {type(world).__name__}")
    directory = Path(data_dir) if data_dir is not None else settings.beamline_storage
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
