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
from corrflow.config.settings import load_settings
from corrflow.simulators import SimulatedWorld

SAMPLE = {"name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}


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


@pytest.mark.fault("pause/resume/stop/abort/halt")
def test_pause_then_resume_keeps_one_event_per_seq_num(beamline):
    RE, docs = _paused_scan(beamline)
    RE.resume()
    assert docs[-1][1]["exit_status"] == "success"
    assert [e["seq_num"] for e in unique_events(docs, stream="primary")] == list(range(1, 9))
    contents = [d["data"]["interruption"] for n, d in docs if n == "event" and "interruption" in d["data"]]
    assert contents == ["pause", "resume"]


@pytest.mark.parametrize(("action", "status"), [("stop", "success"), ("abort", "abort"), ("halt", "abort")])
@pytest.mark.fault("pause/resume/stop/abort/halt")
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


def test_furnace_excursion_suspends_a_simulated_temperature_series_until_settled_again(tmp_path):
    """The in-process heater's readback is monitored like the EPICS one: the same suspender trips
    on a disturbance and resumes once the temperature has been back for the settle time."""
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp

    from corrflow.plans import temperature_series

    settings = load_settings(data_root=tmp_path)
    world = SimulatedWorld(settings.simulation)
    beamline = build_beamline(settings, world)
    heater = beamline.heater
    tolerance_K, settle_s, setpoint_K = 2.0, 20.0, 320.0  # settle_s: simulated seconds
    heater.tolerance_K.set(tolerance_K).wait(1)
    heater.settle_s.set(settle_s).wait(1)
    heater.set(setpoint_K).wait(30)  # at the setpoint first: the suspender guards acquisition, not the ramp
    suspender = SuspendTemperatureExcursion(heater)  # tolerance and settle time from the heater
    readings: list[tuple[float, float]] = []  # (simulated s, K) as the monitor posts them
    token = heater.readback.subscribe(lambda value, **kwargs: readings.append((world.now_s(), float(value))), run=False)

    RE = RunEngine({}, context_managers=[])
    RE.record_interruptions = True
    docs: list[tuple[str, dict]] = []
    arrival_s: list[float] = []  # simulated time each document arrived
    streams: dict[str, str] = {}
    kicked: dict[str, float] = {}

    def record(name, doc):
        docs.append((name, doc))
        arrival_s.append(world.now_s())
        if name == "descriptor":
            streams[doc["uid"]] = doc["name"]

    def kick():
        kicked["s"] = world.now_s()
        world.disturb_heater(30.0)  # +30 K at once
        # The plan goes on for a moment (the move to the next angle): the monitor sees the excursion
        # within a few ms, and the suspension lands here, between two frames.
        yield from bps.sleep(0.2)

    saves = {"primary": 0}

    def disturb_after_point_5(msg):
        if msg.command == "create" and msg.kwargs.get("name") == "primary":
            saves["primary"] += 1
        if msg.command == "checkpoint" and saves["primary"] == 5 and not kicked:
            return None, kick()
        return None, None

    plan = temperature_series(
        beamline, temperatures_K=[setpoint_K], num_projections=20, exposure_s=0.1, num_darks=1, num_flats=1,
        tolerance_K=tolerance_K, settle_s=settle_s, sample=SAMPLE,
    )
    try:
        RE(bpp.suspend_wrapper(bpp.plan_mutator(plan, disturb_after_point_5), [suspender]), record)
    finally:
        heater.readback.unsubscribe(token)

    stop = next(doc for name, doc in docs if name == "stop")
    assert stop["exit_status"] == "success"
    primary = unique_events(docs, stream="primary")
    assert [event["seq_num"] for event in primary] == list(range(1, 21))
    interruptions = [doc["data"]["interruption"] for name, doc in docs if name == "event" and streams[doc["descriptor"]] == "interruptions"]
    assert len(interruptions) == 1 and f"more than {tolerance_K} K from its setpoint {setpoint_K} K" in interruptions[0]
    # Suspended promptly: at most a few frames were taken off tolerance, all before the suspension.
    k_suspend = next(k for k, (name, doc) in enumerate(docs) if name == "event" and streams[doc["descriptor"]] == "interruptions")
    suspended_s = arrival_s[k_suspend]
    off = [doc for k, (name, doc) in enumerate(docs)
           if name == "event" and streams[doc["descriptor"]] == "primary" and abs(doc["data"]["heater"] - setpoint_K) > tolerance_K]
    assert len(off) <= 3 and all(doc["time"] <= docs[k_suspend][1]["time"] for doc in off)
    # Resumed only after the temperature had been back in the band for the settle time.
    k_resumed = next(k for k in range(k_suspend, len(docs)) if docs[k][0] == "event" and streams[docs[k][1]["descriptor"]] == "primary")
    resumed_s = arrival_s[k_resumed]
    last_out_s = max(t for t, value in readings if t < resumed_s and abs(value - setpoint_K) > 0.8 * tolerance_K)
    assert last_out_s > kicked["s"] and resumed_s - last_out_s >= settle_s
    after = [doc for k, (name, doc) in enumerate(docs) if k >= k_resumed and name == "event" and streams[doc["descriptor"]] == "primary"]
    assert after and all(abs(doc["data"]["heater"] - setpoint_K) <= tolerance_K for doc in after)
    print(f"suspended {suspended_s - kicked['s']:.1f} s (simulated) after the kick, resumed {resumed_s - last_out_s:.1f} s after the last reading off the band")


def test_the_simulated_readback_monitor_runs_only_while_subscribed(beamline):
    import time as time_

    readback = beamline.heater.readback

    def monitors() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == f"{readback.name}-monitor"}

    before = monitors()  # other heaters' monitors may still be winding down
    seen: list[float] = []
    token = readback.subscribe(lambda value, **kwargs: seen.append(value), run=False)
    time_.sleep(0.1)
    assert len(seen) >= 5  # ~200 readings/s of wall time at the default time_scale
    (ours,) = monitors() - before
    readback.unsubscribe(token)
    time_.sleep(0.05)
    count = len(seen)
    time_.sleep(0.1)
    assert len(seen) == count
    assert not ours.is_alive()
