"""The protections on the production path: the acquisition flows' own RunEngine, on the simulated
EPICS facility (Channel Access on loopback), catalogued in Tiled.

Nothing here installs a suspender by hand: ``flows.acquire.run_tomography`` is called as the chain,
the demo and the queue call it, with the settings' protections.
"""

from __future__ import annotations

import threading
import time

import epics
import numpy as np
import pytest

from corrflow.catalog.tiled import open_catalog
from corrflow.config.settings import load_settings
from corrflow.devices.beamline import build_beamline
from corrflow.flows.acquire import run_tomography
from corrflow.flows.models import DEFAULT_SAMPLE
from corrflow.formats.nexus import read_nxtomo
from corrflow.plans.interruptions import EpicsDisconnectedError
from corrflow.plans.requests import TomoScanRequest

pytest_plugins = ["epics_fixtures"]

SCAN = TomoScanRequest(num_projections=30, exposure_s=0.01, num_darks=1, num_flats=1)
SAMPLE = DEFAULT_SAMPLE.model_copy(update={"name": "protected-01"})


@pytest.fixture
def settings(sim_facility, tmp_path):
    return load_settings(
        data_root=tmp_path,
        beamline={
            "mode": "epics",
            "epics_prefix": sim_facility.beamline_prefix,
            "protections": {"beam_suspend_below_mA": 100.0, "beam_resume_above_mA": 190.0, "beam_settle_s": 0.5},
        },
    )


def _dump_beam(sim_facility, seconds: float) -> None:
    epics.caput(f"{sim_facility.prefix_of('source')}sim:DumpFor", seconds, wait=True)


def _beam_back_after(sim_facility, *, above_mA: float) -> dict[str, float]:
    """Watch the ring current from a thread; record when it is first back above ``above_mA``."""
    seen: dict[str, float] = {}
    pv = f"{sim_facility.prefix_of('source')}RingCurrent_RBV"

    def watch() -> None:
        lost = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            current = epics.caget(pv, timeout=2.0)
            if current is not None and current < above_mA:
                lost = True
            elif lost and current is not None:
                seen["time"] = time.time()
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def _projections_all_lit(settings, result) -> np.ndarray:
    scan = read_nxtomo(result.nxtomo.local_path(settings))
    projections = scan.data[scan.image_key == 0].astype(np.float64)
    darks = scan.data[scan.image_key == 2].astype(np.float64)
    flats = scan.data[scan.image_key == 1].astype(np.float64)
    # Beam on: each projection carries a good part of the flat's signal above the dark (the sample
    # absorbs part of it); without beam a frame is a dark frame.
    signal = (projections - darks.mean(axis=0)).mean(axis=(1, 2)) / (flats - darks.mean(axis=0)).mean()
    return signal


def _interruptions(run) -> list[tuple[float, str]]:
    stream = {doc["uid"] for name, doc in run.documents() if name == "descriptor" and doc["name"] == "interruptions"}
    return [(doc["time"], str(doc["data"]["interruption"])) for name, doc in run.documents() if name == "event" and doc["descriptor"] in stream]


@pytest.mark.slow  # the beam stays off for 3 s by design
@pytest.mark.fault("beam dump")
def test_a_beam_dump_mid_scan_suspends_the_production_run_and_no_frame_is_kept_without_beam(settings, sim_facility, fault_figures):
    watcher = build_beamline(settings)  # its own Channel Access view, to see when the scan is a third done
    fired = {}

    def dump_at_a_third() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and watcher.stage.rotation.position < 60.0:
            time.sleep(0.01)
        fired["time"] = time.time()
        fired["back"] = _beam_back_after(sim_facility, above_mA=190.0)
        _dump_beam(sim_facility, 3.0)

    threading.Thread(target=dump_at_a_third, daemon=True).start()
    result = run_tomography(settings, SAMPLE, SCAN)
    assert "time" in fired
    with open_catalog(settings) as catalog:
        run = catalog.runs[result.run_uid]
        assert run.metadata["stop"]["exit_status"] == "success"
        assert run.metadata["stop"]["num_events"]["primary"] >= SCAN.num_projections
        reasons = list(np.asarray(run["interruptions"]["interruption"].read()))
        assert any("ring current below 100.0 mA" in str(reason) for reason in reasons), reasons
        assert len(run["primary"]["sample_stage_rotation"].read()) == SCAN.num_projections
        interruptions = _interruptions(run)
        primary = {doc["uid"] for name, doc in run.documents() if name == "descriptor" and doc["name"] == "primary"}
        frame_times = sorted(doc["time"] for name, doc in run.documents() if name == "event" and doc["descriptor"] in primary)
        # Each kept projection's own exposure, as the camera IOC recorded it with the frame.
        currents = np.asarray(run["primary"]["xray_detector_ring_current"].read())
        camera_angles = np.asarray(run["primary"]["xray_detector_rotation_angle"].read())
    assert currents.shape == (SCAN.num_projections,) and currents.min() >= 100.0, currents.round(1).tolist()
    np.testing.assert_allclose(camera_angles, np.arange(SCAN.num_projections) * 180.0 / SCAN.num_projections, atol=1e-3)
    fault_figures["lowest ring current of a kept frame (mA)"] = round(float(currents.min()), 1)
    signal = _projections_all_lit(settings, result)
    assert signal.shape == (SCAN.num_projections,)
    fault_figures["frames kept without beam"] = int((signal <= 0.2).sum())
    suspended = [t for t, what in interruptions if what not in ("pause", "resume")]  # the suspender's justification
    if suspended:
        fault_figures["beam loss -> suspended (s)"] = round(suspended[0] - fired["time"], 2)
    back = fired["back"].get("time")
    after = [t for t in frame_times if back is not None and t > back]
    if after:  # the suspender waits beam_settle_s (0.5 s) once the beam is back
        fault_figures["beam back -> next frame (s)"] = round(after[0] - back, 2)
    assert signal.min() > 0.2, f"a projection was kept without beam: {signal.round(3).tolist()}"


@pytest.mark.slow  # the beam stays off for 10 s by design
@pytest.mark.fault("pre-tripped suspender")
def test_a_tripped_beam_suspender_holds_the_scan_before_its_first_motion(settings, sim_facility, fault_figures):
    back = _beam_back_after(sim_facility, above_mA=190.0)
    # Longer than connecting the devices and opening the catalog, so the scan would start in the dark.
    _dump_beam(sim_facility, 10.0)
    result = run_tomography(settings, SAMPLE, SCAN)
    with open_catalog(settings) as catalog:
        run = catalog.runs[result.run_uid]
        assert run.metadata["stop"]["exit_status"] == "success"
        started = run.metadata["start"]["time"]
    assert "time" in back
    # The run (and with it the first motion: the preflight only reads) began after the beam was back.
    assert started > back["time"]
    fault_figures["beam back -> run started (s)"] = round(started - back["time"], 2)
    fault_figures["frames kept without beam"] = int((_projections_all_lit(settings, result) <= 0.2).sum())
    assert _projections_all_lit(settings, result).min() > 0.2


@pytest.mark.fault("IOC killed")
def test_a_killed_detector_ioc_fails_the_production_run_with_a_reason_naming_its_pvs(settings, sim_facility, fault_figures):
    slow_scan = TomoScanRequest(num_projections=60, exposure_s=0.05, num_darks=1, num_flats=1)
    watcher = build_beamline(settings)
    killed: dict[str, float] = {}

    def kill_mid_scan() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and watcher.stage.rotation.position < 30.0:
            time.sleep(0.01)
        sim_facility.kill("xray-detector")
        killed["time"] = time.time()

    threading.Thread(target=kill_mid_scan, daemon=True).start()
    try:
        with pytest.raises(EpicsDisconnectedError, match="EPICS disconnect"):
            run_tomography(settings, SAMPLE, slow_scan)
    finally:
        sim_facility.restart("xray-detector")
    detector_prefix = sim_facility.prefix_of("xray-detector")
    with open_catalog(settings) as catalog:
        (uid,) = list(catalog.runs)
        stop = catalog.runs[uid].metadata["stop"]
    assert stop["exit_status"] == "fail"
    assert "EPICS disconnect" in stop["reason"] and detector_prefix in stop["reason"]
    fault_figures["IOC killed -> run failed (s)"] = round(stop["time"] - killed["time"], 2)
    deadline = time.monotonic() + 15
    while not watcher.detector.connected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watcher.detector.connected


@pytest.mark.slow  # the move's time-out is its travel time twice plus 10 s, by design
@pytest.mark.fault("motor that never finishes")
def test_a_rotation_that_never_finishes_its_move_fails_the_production_run_naming_the_axis(settings, sim_facility, fault_figures):
    """The rotation stalls (its amplifier trips: DMOV stays 0) from before the scan: darks and flats
    are taken, the first move to a projection angle never finishes and the run fails on its
    time-out, naming the axis (the stage's way home stalls too and times out as well). The stall
    is lifted once the acquisition has given up."""
    stall_pv = f"{sim_facility.prefix_of('stage')}rot:sim:Stall"
    assert epics.caput(stall_pv, 1, wait=True, timeout=10)
    stalled_at = time.time()
    try:
        with pytest.raises(Exception, match="sample_stage_rotation") as raised:
            run_tomography(settings, SAMPLE, SCAN)
    finally:
        epics.caput(stall_pv, 0, wait=True, timeout=10)
    with open_catalog(settings) as catalog:
        (uid,) = list(catalog.runs)
        stop = catalog.runs[uid].metadata["stop"]
    assert stop["exit_status"] == "fail", stop
    assert "sample_stage_rotation" in stop["reason"]
    assert stop["num_events"].get("primary", 0) == 0
    assert not list(settings.beamline_storage.rglob("*_nxtomo.nxs")), "nothing exported from a failed run"
    fault_figures["stall -> run failed (s)"] = round(stop["time"] - stalled_at, 1)
    fault_figures["error"] = type(raised.value).__name__
