"""Device factory of the scanning electron microscope (one module per instrument; nothing built at import)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from corrflow.devices.clock import SimClock
from corrflow.devices.microscope import MicroscopeDetector
from corrflow.devices.stage import MicroscopeStage
from corrflow.settings import Settings
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
        The devices.
    data_dir
        Where the detector writes its HDF5 files.
    """

    name: str
    facility: str
    frame: str
    stage: MicroscopeStage
    detector: MicroscopeDetector
    data_dir: Path

    def devices(self) -> tuple[MicroscopeStage, MicroscopeDetector]:
        """All devices."""
        return (self.stage, self.detector)


def build_microscope(
    settings: Settings, world: SimulatedWorld, *, data_dir: Path | str | None = None
) -> Microscope:
    """Build the microscope's devices from the settings.

    Parameters
    ----------
    settings
        Validated settings; ``settings.microscope.mode`` picks simulated or EPICS devices.
    world
        The simulated world (the same sample the beamline imaged).
    data_dir
        Directory for detector files; default ``settings.microscope_storage``.

    Raises
    ------
    NotImplementedError
        ``settings.microscope.mode == "epics"`` (EPICS devices come with issue #3).
    """
    if settings.microscope.mode == "epics":
        raise NotImplementedError(
            f"microscope mode 'epics' (prefix {settings.microscope.epics_prefix!r}) is not implemented yet: "
            "EPICS devices come with issue #3; use microscope.mode='sim'"
        )
    if not isinstance(world, SimulatedWorld):
        raise TypeError(f"world must be a SimulatedWorld for simulated devices, got {type(world).__name__}")
    directory = Path(data_dir) if data_dir is not None else settings.microscope_storage
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
