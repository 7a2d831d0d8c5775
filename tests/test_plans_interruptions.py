"""Pause, resume, stop and abort of a tomography scan (simulated beamline): stop documents and
one event per sequence number after a resume."""

from __future__ import annotations

import threading

import pytest
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted

from corrflow.devices.beamline import build_beamline
from corrflow.plans import tomo_scan
from corrflow.plans.interruptions import SuspendTemperatureExcursion, beam_current_suspender, unique_events
from corrflow.settings import load_settings
from corrflow.simulators import SimulatedWorld

SAMPLE = {"sample_name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}


@pytest.fixture
def beamline(tmp_path):
    settings = load_settings(data_root=tmp_path)
    return build_beamline(settings, SimulatedWorld(settings.simulation))


def _paused_scan(beamline):
    RE = RunEngine({}, context_managers=[])
    RE.record_interruptions = True
    docs = []
    streams = {}

    def collect(name, doc):
        docs.append((name, doc))
        if name == "descriptor":
            streams[doc["uid"]] = doc["name"]
        if name == "event" and streams[doc["descriptor"]] == "primary" and doc["seq_num"] == 3:
            threading.Thread(target=RE.request_pause, daemon=True).start()

    RE.subscribe(collect)
    plan = tomo_scan(beamline, num_projections=8, exposure_s=0.1, num_darks=1, num_flats=1, sample=SAMPLE)
    with pytest.raises(RunEngineInterrupted):
        RE(plan)
    assert RE.state == "paused"
    return RE, docs


def test_pause_then_resume_keeps_one_event_per_seq_num(beamline):
    RE, docs = _paused_scan(beamline)
    RE.resume()
    assert docs[-1][1]["exit_status"] == "success"
    assert [e["seq_num"] for e in unique_events(docs, stream="primary")] == list(range(1, 9))
    contents = [d["data"]["interruption"] for n, d in docs if n == "event" and "interruption" in d["data"]]
    assert contents == ["pause", "resume"]


@pytest.mark.parametrize(("action", "status"), [("stop", "success"), ("abort", "abort"), ("halt", "abort")])
def test_stop_abort_and_halt_of_a_paused_scan_say_so_in_the_stop_document(beamline, action, status):
    RE, docs = _paused_scan(beamline)
    getattr(RE, action)()
    stop = docs[-1][1]
    assert docs[-1][0] == "stop" and stop["exit_status"] == status
    assert len(unique_events(docs, stream="primary")) < 8
    if action != "halt":  # halt skips the plan's clean-up by design
        assert beamline.shutter.state.get() == "closed" and beamline.stage.rotation.position == 0.0


def test_suspender_arguments_are_checked(beamline):
    from ophyd import Signal

    with pytest.raises(ValueError, match="resume_above_mA"):
        beam_current_suspender(Signal(name="current", value=200.0), suspend_below_mA=100.0, resume_above_mA=50.0)
    with pytest.raises(ValueError, match="tolerance_K"):
        SuspendTemperatureExcursion(beamline.heater, tolerance_K=-1.0)
