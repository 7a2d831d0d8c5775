"""Device factory of the scanning electron microscope (one module per instrument; nothing built at import).

``settings.microscope.mode`` picks simulated devices on a
:class:`~corrflow.simulators.world.SimulatedWorld` (``"sim"``) or EPICS devices under
``settings.microscope.epics_prefix`` (``"epics"``: ``<M>stage:x``/``y`` motor records and the
``<M>det:`` areaDetector camera).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from corrflow.devices.beamline import connect_devices
from corrflow.devices.clock import SimClock
from corrflow.devices.epics_base import CONNECTION_TIMEOUT_S
from corrflow.devices.epics_detector import EpicsMicroscopeDetector
from corrflow.devices.epics_stage import EpicsMicroscopeStage
from corrflow.devices.microscope import MicroscopeDetector
from corrflow.devices.stage import MicroscopeStage
from corrflow.config.settings import Settings
from corrflow.simulators.world import SimulatedWorld

__all__ = ["Microscope", "build_microscope", "SIMULATED_MICROSCOPY_FACILITY"]

SIMULATED_MICROSCOPY_FACILITY = "corrflow-sim-microscopy-centre"


@dataclass(frozen=True)
class Microscope:
    """The devices of the electron microscope, and what identifies it in metadata.

    Attributes
    ----------
    name
        Instrument name (``settings.microscope.name``).
    facility
        Facility name.
    frame
        Name of the stage frame of reference (``settings.microscope.frame``).
    stage, detector
        The devices (simulated or EPICS, same interfaces).
    data_dir
        Where the detector writes its HDF5 files.
    mode
        ``"sim"`` or ``"epics"``.
    """

    name: str
    facility: str
    frame: str
    stage: MicroscopeStage | EpicsMicroscopeStage
    detector: MicroscopeDetector | EpicsMicroscopeDetector
    data_dir: Path
    mode: str = "sim"

    def devices(self) -> tuple[MicroscopeStage | EpicsMicroscopeStage, MicroscopeDetector | EpicsMicroscopeDetector]:
        """All devices."""
        return (self.stage, self.detector)


def build_microscope(
    settings: Settings,
    world: SimulatedWorld | None = None,
    *,
    data_dir: Path | str | None = None,
    connection_timeout_s: float = CONNECTION_TIMEOUT_S,
) -> Microscope:
    """Build the microscope's devices from the settings.

    Parameters
    ----------
    settings
        Validated settings; ``settings.microscope.mode`` picks simulated or EPICS devices.
    world
        The simulated world (the same sample the beamline imaged); required in ``"sim"`` mode,
        ignored in ``"epics"`` mode.
    data_dir
        Directory for detector files; default ``settings.microscope_storage``.
    connection_timeout_s
        EPICS mode: how long to wait for every PV to connect.

    Raises
    ------
    TimeoutError
        EPICS mode: PVs did not connect (the message names them).
    TypeError
        ``"sim"`` mode without a ``SimulatedWorld``.
    """
    directory = Path(data_dir) if data_dir is not None else settings.microscope_storage
    if settings.microscope.mode == "epics":
        prefix = settings.microscope.epics_prefix
        epics_stage = EpicsMicroscopeStage(f"{prefix}stage:", name="microscope_stage")
        epics_detector = EpicsMicroscopeDetector(f"{prefix}det:", name="microscope_detector", data_dir=directory)
        connect_devices([epics_stage, epics_detector], timeout_s=connection_timeout_s)
        return Microscope(
            name=settings.microscope.name,
            facility=f"epics:{prefix}",
            frame=settings.microscope.frame,
            stage=epics_stage,
            detector=epics_detector,
            data_dir=directory.absolute(),
            mode="epics",
        )
    if not isinstance(world, SimulatedWorld):
        raise TypeError(f"world must be a SimulatedWorld for simulated devices, got {type(world).__name__}")
    clock = SimClock.of_world(world)
    stage = MicroscopeStage(name="microscope_stage", clock=clock)
    detector = MicroscopeDetector(name="microscope_detector", world=world, stage=stage, data_dir=directory, clock=clock)
    return Microscope(
        name=settings.microscope.name,
        facility=SIMULATED_MICROSCOPY_FACILITY,
        frame=settings.microscope.frame,
        stage=stage,
        detector=detector,
        data_dir=directory.absolute(),
    )
