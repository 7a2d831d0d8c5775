"""The simulated facility's processes: loopback-only environment, write counting, kill and restart, CLI."""

from __future__ import annotations

import re
import time

import epics
import pytest
import typer
from typer.testing import CliRunner

from corrflow.cli.sim import sim_app
from corrflow.operations.sim_facility import IOC_NAMES, SimFacility

pytest_plugins = ["epics_fixtures"]


def test_every_address_is_loopback_and_every_ioc_has_its_own_port(sim_facility):
    env = sim_facility.client_environment()
    assert env["EPICS_CA_AUTO_ADDR_LIST"] == "NO"
    addresses = env["EPICS_CA_ADDR_LIST"].split()
    assert all(address.startswith("127.0.0.1:") for address in addresses)
    ports = [int(address.split(":")[1]) for address in addresses]
    assert len(set(ports)) == len(IOC_NAMES) and sim_facility.repeater_port not in ports
    assert env["EPICS_CAS_INTF_ADDR_LIST"] == env["EPICS_CAS_BEACON_ADDR_LIST"] == "127.0.0.1"
    assert all(sim_facility.is_running(name) for name in IOC_NAMES)


def test_put_counter_counts_client_writes_only(sim_facility):
    stage = sim_facility.prefix_of("stage")
    before = sim_facility.put_counts(["stage"])["stage"]
    time.sleep(0.3)  # the IOC's own updates (none here) and reads do not count
    epics.caget(f"{stage}x.RBV")
    assert sim_facility.put_counts(["stage"])["stage"] == before
    epics.caput(f"{stage}tip.VELO", 1.0, wait=True)
    assert sim_facility.put_counts(["stage"])["stage"] == before + 1
    assert epics.caget(f"{stage}sim:LastPut", as_string=True) == f"{stage}tip.VELO"
    # A refused write counts too: the counter sees every request that reached the IOC.
    epics.caput(f"{stage}tip.VAL", 99.0, wait=True, timeout=2)
    assert sim_facility.put_counts(["stage"])["stage"] == before + 2
    assert epics.caget(f"{stage}tip.VAL") == 0.0 and epics.caget(f"{stage}tip.RBV") == 0.0


def test_a_killed_ioc_is_restarted_on_the_same_port(sim_facility):
    port = sim_facility.ports["heater"]
    pid = sim_facility.pid("heater")
    sim_facility.kill("heater")
    assert not sim_facility.is_running("heater")
    sim_facility.restart("heater")
    assert sim_facility.is_running("heater") and sim_facility.pid("heater") != pid
    assert sim_facility.ports["heater"] == port
    pv = f"{sim_facility.prefix_of('heater')}Temperature_RBV"
    deadline = time.monotonic() + 15
    value = None
    while value is None and time.monotonic() < deadline:
        value = epics.caget(pv, timeout=0.5)
    assert value == pytest.approx(293.15, abs=1.0)


def test_facility_refuses_bad_prefixes_and_names():
    with pytest.raises(ValueError, match="beamline_prefix"):
        SimFacility(beamline_prefix="", microscope_prefix="M:")
    with pytest.raises(ValueError, match="differ"):
        SimFacility(beamline_prefix="A:", microscope_prefix="A:")
    with pytest.raises(ValueError, match="unknown IOC"):
        SimFacility(beamline_prefix="A:", microscope_prefix="B:").start(["nonsense"])


def test_sim_up_prints_a_loopback_environment_and_stops(tmp_path):
    app = typer.Typer()
    app.add_typer(sim_app, name="sim")
    env_file = tmp_path / "sim.env"
    result = CliRunner().invoke(
        app,
        ["sim", "up", "--prefix", "CFCLI:", "--only", "stage", "--duration-s", "0.5", "--env-file", str(env_file), "--log-dir", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    exports = dict(re.findall(r"^export (\w+)=(.*)$", result.stdout, flags=re.M))
    assert exports["EPICS_CA_AUTO_ADDR_LIST"] == "NO"
    assert all(a.startswith("127.0.0.1:") for a in exports["EPICS_CA_ADDR_LIST"].strip("'").split())
    assert exports["CORRFLOW_BEAMLINE__MODE"] == "epics" and exports["CORRFLOW_BEAMLINE__EPICS_PREFIX"] == "CFCLI:BL:"
    assert env_file.read_text().count("export ") == len(exports)
    assert "CFCLI:BL:stage:" in result.stdout
    bad = CliRunner().invoke(app, ["sim", "up", "--only", "nonsense"])
    assert bad.exit_code == 2
