"""Interruptions of runs on the EPICS devices: a beam dump, a furnace excursion, a killed IOC.

All over Channel Access against the simulated facility's IOCs (loopback only).
"""

from __future__ import annotations

import threading
import time

import bluesky.plans as bp
import bluesky.preprocessors as bpp
import epics
import h5py
import numpy as np
import pytest
from bluesky import RunEngine

from corrflow.devices.beamline import build_beamline
from corrflow.plans import tomo_scan
from corrflow.plans.interruptions import (
    ConnectionWatcher,
    EpicsDisconnectedError,
    SuspendTemperatureExcursion,
    beam_current_suspender,
    unique_events,
)

pytest_plugins = ["epics_fixtures"]

SAMPLE = {"name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}


class Recorder:
    """Collects documents with their arrival times and fires actions on chosen events."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict]] = []
        self.times: list[float] = []
        self.streams: dict[str, str] = {}
        self.actions: dict[tuple[str, int], callable] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, doc: dict) -> None:
        self.docs.append((name, doc))
        self.times.append(time.monotonic())
        if name == "descriptor":
            self.streams[doc["uid"]] = doc["name"]
        elif name == "event":
            stream = self.streams[doc["descriptor"]]
            self.counts[stream] = self.counts.get(stream, 0) + 1
            action = self.actions.pop((stream, self.counts[stream]), None)
            if action is not None:
                # Never block the RunEngine's callback: act from a thread.
                threading.Thread(target=action, daemon=True).start()

    def interruptions(self) -> list[tuple[float, str]]:
        return [
            (t, doc["data"]["interruption"])
            for (name, doc), t in zip(self.docs, self.times, strict=True)
            if name == "event" and self.streams[doc["descriptor"]] == "interruptions"
        ]

    def first_event_after(self, t: float, stream: str) -> float:
        return next(
            time_
            for (name, doc), time_ in zip(self.docs, self.times, strict=True)
            if name == "event" and time_ > t and self.streams[doc["descriptor"]] == stream
        )

    def stop(self) -> tuple[float, dict]:
        return next((t, doc) for (name, doc), t in zip(self.docs, self.times, strict=True) if name == "stop")


@pytest.fixture
def beamline(epics_settings):
    beamline = build_beamline(epics_settings)
    yield beamline
    for status in (beamline.stage.x.set(0.0), beamline.stage.rotation.set(0.0), beamline.shutter.set("closed")):
        status.wait(10)


def _run_engine() -> RunEngine:
    RE = RunEngine({}, context_managers=[])
    RE.record_interruptions = True
    return RE


@pytest.mark.slow  # the beam stays off for 5 s by design
def test_beam_dump_at_point_10_of_50_suspends_resumes_and_keeps_50_unique_events(beamline, sim_facility):
    RE = _run_engine()
    RE.install_suspender(
        beam_current_suspender(beamline.beam.current_mA, suspend_below_mA=100.0, resume_above_mA=190.0, sleep_s=0.5)
    )
    recorder = Recorder()
    dumped = {}

    def dump_beam() -> None:
        dumped["t"] = time.monotonic()
        epics.caput(f"{sim_facility.prefix_of('source')}sim:DumpFor", 5.0, wait=True)

    recorder.actions[("primary", 10)] = dump_beam
    started = time.monotonic()
    RE(tomo_scan(beamline, num_projections=50, exposure_s=0.01, num_darks=1, num_flats=1, sample=SAMPLE), recorder)
    wall_s = time.monotonic() - started
    docs = recorder.docs

    t_stop, stop = recorder.stop()
    assert stop["exit_status"] == "success"
    primary = unique_events(docs, stream="primary")
    assert [event["seq_num"] for event in primary] == list(range(1, 51))
    assert len(primary) == 50
    np.testing.assert_allclose([e["data"]["sample_stage_rotation"] for e in primary], np.arange(50) * 180.0 / 50, atol=1e-6)
    # The interruption is recorded in the run's "interruptions" stream, with its justification.
    interruptions = recorder.interruptions()
    assert len(interruptions) == 1
    suspend_t, suspend_reason = interruptions[0]
    assert "ring current below 100.0 mA" in suspend_reason
    assert suspend_t - dumped["t"] < 1.0  # suspended promptly
    resume_t = recorder.first_event_after(suspend_t, "primary")
    assert 5.0 <= resume_t - dumped["t"] < 8.0  # beam back after 5 s, plus the 0.5 s settle
    assert wall_s > 5.0
    # Every kept event's frame was taken with beam: the re-taken point replaced the one lost.
    resources = {d["uid"]: d for n, d in docs if n == "stream_resource"}
    datums = [d for n, d in docs if n == "stream_datum" and d["descriptor"] == primary[0]["descriptor"]]
    path = resources[datums[0]["stream_resource"]]["uri"].removeprefix("file://localhost")
    with h5py.File(path, "r", swmr=True) as f:
        current = f["/entry/instrument/NDAttributes/RingCurrent"][()]
        angles = f["/entry/instrument/NDAttributes/RotationAngle"][()]
    for event in primary:
        datum = [d for d in datums if d["seq_nums"]["start"] <= event["seq_num"] < d["seq_nums"]["stop"]][-1]
        index = datum["indices"]["start"] + event["seq_num"] - datum["seq_nums"]["start"]
        assert current[index] > 190.0
        assert angles[index] == pytest.approx(event["data"]["sample_stage_rotation"])


def test_furnace_excursion_suspends_until_the_temperature_is_back(beamline, sim_facility):
    heater, detector = beamline.heater, beamline.detector
    heater.tolerance_K.set(2.0).wait(1)
    heater.settle_s.set(0.3).wait(1)
    heater.set(320.0).wait(60)
    RE = _run_engine()
    recorder = Recorder()
    kicked = {}

    def kick() -> None:
        kicked["t"] = time.monotonic()
        epics.caput(f"{sim_facility.prefix_of('heater')}sim:Kick", 30.0, wait=True)

    recorder.actions[("primary", 5)] = kick
    suspender = SuspendTemperatureExcursion(heater, sleep_s=0.2)
    try:
        detector.exposure_s.set(0.02).wait(5)
        plan = bpp.suspend_wrapper(bp.count([detector, heater], num=20, delay=0.05), [suspender])
        RE(plan, recorder)
    finally:
        heater.set(293.15).wait(60)
    assert recorder.stop()[1]["exit_status"] == "success"
    primary = unique_events(recorder.docs, stream="primary")
    assert [event["seq_num"] for event in primary] == list(range(1, 21))
    interruptions = recorder.interruptions()
    assert len(interruptions) == 1 and "more than 2.0 K from its setpoint 320.0 K" in interruptions[0][1]
    # Nothing was taken while suspended; every event after the resumption is within tolerance.
    # Events read between the kick and the suspender's trip (one readback update, <= 0.1 s) stay:
    # a suspender rewinds to the last checkpoint, it cannot un-take what was already saved.
    suspend_time = next(d["time"] for n, d in recorder.docs if n == "event" and recorder.streams[d["descriptor"]] == "interruptions")
    off = [event for event in primary if abs(event["data"]["heater"] - 320.0) > 2.0]
    assert all(event["time"] < suspend_time for event in off) and len(off) <= 3
    after = [event for event in primary if event["time"] > suspend_time]
    assert after and all(abs(event["data"]["heater"] - 320.0) <= 2.0 for event in after)


def test_ioc_killed_mid_scan_stops_the_motors_and_fails_within_4_s(beamline, sim_facility):
    stage, detector = beamline.stage, beamline.detector
    rotation = stage.rotation
    nominal_velocity = rotation.velocity.get()
    rotation.velocity.set(30.0).wait(5)  # 20 deg steps take 0.67 s: the kill lands mid-move
    angles = list(np.arange(10) * 20.0)
    RE = _run_engine()
    watcher = ConnectionWatcher([beamline.detector, beamline.stage, beamline.shutter], reconnect_timeout_s=1.0)
    RE.install_suspender(watcher)
    recorder = Recorder()
    killed = {}

    def kill() -> None:
        time.sleep(0.3)
        killed["t"] = time.monotonic()
        sim_facility.kill("xray-detector")

    recorder.actions[("primary", 3)] = kill
    detector.exposure_s.set(0.01).wait(5)
    try:
        with pytest.raises(EpicsDisconnectedError, match="EPICS disconnect"):
            RE(bp.list_scan([detector], rotation, angles), recorder)
        t_stop, stop = recorder.stop()
        # Fails within 4 s of the kill, saying why.
        assert t_stop - killed["t"] < 4.0
        assert stop["exit_status"] == "fail"
        assert "EPICS disconnect" in stop["reason"] and f"{sim_facility.prefix_of('xray-detector')}" in stop["reason"]
        # It suspended first, with the lost PVs as the justification.
        suspend_t, justification = recorder.interruptions()[0]
        assert "EPICS disconnect" in justification
        assert suspend_t - killed["t"] < 2.0
        # The rotation, on a live IOC, was stopped short of the target of the move in progress.
        time.sleep(0.3)
        assert rotation.motor_is_moving.get() == 0
        # Event 3 was taken at angles[2]; the move to angles[3] was under way when the IOC died.
        assert angles[2] < rotation.position < angles[3] - 1.0
        assert stage.x.position == pytest.approx(0.0)
        assert RE.state == "idle"
        kinds = [kind for _, kind, _ in watcher.events]
        assert kinds.index("suspend") < kinds.index("fail")
    finally:
        RE.remove_suspender(watcher)
        sim_facility.restart("xray-detector")
        rotation.velocity.set(nominal_velocity).wait(5)
    # The devices reconnect to the restarted IOC by themselves.
    deadline = time.monotonic() + 10
    while not detector.connected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert detector.connected


@pytest.mark.slow  # an IOC restart and Channel Access reconnection take several seconds
def test_connection_watcher_resumes_when_the_ioc_comes_back(beamline, sim_facility):
    detector = beamline.detector
    RE = _run_engine()
    watcher = ConnectionWatcher([beamline.beam], reconnect_timeout_s=30.0, sleep_s=0.2)
    RE.install_suspender(watcher)
    recorder = Recorder()

    def bounce_source() -> None:
        sim_facility.kill("source")
        time.sleep(1.0)
        sim_facility.restart("source")

    recorder.actions[("primary", 3)] = bounce_source
    detector.exposure_s.set(0.01).wait(5)
    try:
        RE(bp.count([detector, beamline.beam], num=8, delay=0.2), recorder)
    finally:
        RE.remove_suspender(watcher)
        if not sim_facility.is_running("source"):
            sim_facility.restart("source")
    assert recorder.stop()[1]["exit_status"] == "success"
    assert [e["seq_num"] for e in unique_events(recorder.docs, stream="primary")] == list(range(1, 9))
    contents = [content for _, content in recorder.interruptions()]
    assert len(contents) == 1 and "EPICS disconnect" in contents[0]
    kinds = [kind for _, kind, _ in watcher.events]
    assert "disconnect" in kinds and "reconnect" in kinds and "fail" not in kinds


def test_watcher_needs_epics_signals():
    from ophyd.sim import SynAxis

    with pytest.raises(ValueError, match="no EPICS signal"):
        ConnectionWatcher([SynAxis(name="soft")])
