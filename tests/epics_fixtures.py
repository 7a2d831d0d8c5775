"""pytest fixtures that serve the simulated facility as caproto IOC subprocesses, on loopback.

Use it from a test module with ``pytest_plugins = ["epics_fixtures"]``.

At import, before any Channel Access channel exists in the test process, this module picks free
ports for a CA repeater and for every IOC and a random PV prefix, and exports the client
environment (``EPICS_CA_AUTO_ADDR_LIST=NO``, ``EPICS_CA_ADDR_LIST`` of ``127.0.0.1:<port>``
entries, ``EPICS_CA_REPEATER_PORT``): the CA library of a process reads its address list once,
when its first channel is created, so the list must be right from the start and the same for
the whole session. Nothing leaves 127.0.0.1.

Fixtures
--------
sim_facility (session)
    A started :class:`~corrflow.operations.sim_facility.SimFacility` (stage 20x nominal speed, furnace 50x
    real time). A test that kills or reconfigures an IOC restores it (``restart``) before it ends.
epics_settings
    corrflow settings in EPICS mode pointing at the facility, data under a fresh ``tmp_path``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from corrflow.config.settings import Settings, SimulationSettings, load_settings
from corrflow.operations.sim_facility import IOC_NAMES, SimFacility, free_port

__all__ = ["BEAMLINE_PREFIX", "HEATER_TIME_SCALE", "MICROSCOPE_PREFIX", "SPEED", "epics_settings", "sim_facility"]

_SESSION = uuid.uuid4().hex[:8].upper()
BEAMLINE_PREFIX = f"CFT{_SESSION}:BL:"
MICROSCOPE_PREFIX = f"CFT{_SESSION}:SEM:"
SPEED = 20.0
HEATER_TIME_SCALE = 50.0

_PORTS = {name: free_port() for name in IOC_NAMES}
_REPEATER_PORT = free_port()


def _facility(log_dir: Path | None = None) -> SimFacility:
    return SimFacility(
        beamline_prefix=BEAMLINE_PREFIX,
        microscope_prefix=MICROSCOPE_PREFIX,
        simulation=SimulationSettings(),
        speed=SPEED,
        heater_time_scale=HEATER_TIME_SCALE,
        ports=_PORTS,
        repeater_port=_REPEATER_PORT,
        log_dir=log_dir,
    )


# Before any channel is created in this process (see the module docstring).
os.environ.update(_facility().client_environment())


@pytest.fixture(scope="session")
def sim_facility(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFacility]:
    """The simulated facility's IOCs, started once per session and stopped at its end."""
    facility = _facility(log_dir=tmp_path_factory.mktemp("ioc-logs"))
    try:
        facility.start(timeout_s=90.0)
        yield facility
    finally:
        facility.close()


@pytest.fixture
def epics_settings(sim_facility: SimFacility, tmp_path: Path) -> Settings:
    """Settings whose beamline and microscope are the facility's EPICS devices."""
    return load_settings(
        data_root=tmp_path,
        beamline={"mode": "epics", "epics_prefix": sim_facility.beamline_prefix},
        microscope={"mode": "epics", "epics_prefix": sim_facility.microscope_prefix},
    )
