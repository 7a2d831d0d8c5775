"""In-situ plans on the simulated beamline: temperature series and time-lapse."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from bluesky import RunEngine

from corrflow.devices.beamline import build_beamline
from corrflow.plans import PlanValidationError, temperature_series, time_lapse
from corrflow.plans.insitu import estimate_temperature_series, estimate_time_lapse
from corrflow.config.settings import load_settings
from corrflow.simulators import SimulatedWorld

SAMPLE = {"name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}


@pytest.fixture
def beamline(tmp_path):
    settings = load_settings(data_root=tmp_path)
    return build_beamline(settings, SimulatedWorld(settings.simulation))


def _runs(plan):
    docs = []
    result = RunEngine({}, call_returns_result=True)(plan, lambda name, doc: docs.append((name, doc)))
    return docs, result


def test_temperature_series_settles_then_scans_at_each_setpoint(beamline):
    setpoints = [350.0, 450.0]
    docs, result = _runs(
        temperature_series(
            beamline, temperatures_K=setpoints, num_projections=4, exposure_s=0.1, num_darks=1, num_flats=1,
            tolerance_K=1.0, settle_s=10.0, sample=SAMPLE,
        )
    )
    starts = [d for n, d in docs if n == "start"]
    assert [s["temperature_series"]["setpoint_K"] for s in starts] == setpoints
    assert len({s["temperature_series"]["series_uid"] for s in starts}) == 1
    assert result.plan_result == [s["uid"] for s in starts]
    assert [d["exit_status"] for n, d in docs if n == "stop"] == ["success", "success"]
    # Every frame of each run was taken at its settled temperature.
    run_of = {}
    for name, doc in docs:
        if name == "descriptor":
            run_of[doc["uid"]] = doc["run_start"]
    setpoint_of = {s["uid"]: s["temperature_series"]["setpoint_K"] for s in starts}
    events = [d for n, d in docs if n == "event"]
    assert len(events) == 2 * (4 + 1 + 1)
    for event in events:
        assert abs(event["data"]["heater"] - setpoint_of[run_of[event["descriptor"]]]) <= 1.0
    assert beamline.heater.tolerance_K.get() == 1.0 and beamline.heater.settle_s.get() == 10.0


def test_temperature_series_refuses_any_bad_setpoint_before_heating(beamline):
    before = beamline.heater.setpoint.get()
    with pytest.raises(PlanValidationError, match=r"temperatures_K\[1\]"):
        temperature_series(beamline, temperatures_K=[350.0, 5000.0], num_projections=4, exposure_s=0.1, sample=SAMPLE)
    with pytest.raises(PlanValidationError, match="non-empty sequence"):
        temperature_series(beamline, temperatures_K=[], num_projections=4, exposure_s=0.1, sample=SAMPLE)
    with pytest.raises(PlanValidationError, match="num_projections"):
        temperature_series(beamline, temperatures_K=[350.0], num_projections=1, exposure_s=0.1, sample=SAMPLE)
    assert beamline.heater.setpoint.get() == before
    estimate = estimate_temperature_series(
        beamline, temperatures_K=[350.0, 450.0], num_projections=4, exposure_s=0.1, num_darks=1, num_flats=1, sample=SAMPLE
    )
    # Two ramps at 5 K/s (57 K then 100 K), settling, two scans of 6 frames.
    assert estimate.n_frames == 12 and estimate.duration_s > (157 / 5.0) + 2 * 30.0


def test_time_lapse_takes_frames_at_the_interval_at_a_held_temperature(beamline):
    docs, _ = _runs(
        time_lapse(beamline, num_frames=6, interval_s=20.0, exposure_s=0.5, temperature_K=330.0, settle_s=5.0, num_darks=1, num_flats=1, sample=SAMPLE)
    )
    assert docs[-1][1]["exit_status"] == "success"
    resources = {d["uid"]: d for n, d in docs if n == "stream_resource"}
    primary = next(d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "primary")
    values = {}
    for name, doc in docs:
        if name == "stream_datum" and doc["descriptor"] == primary:
            resource = resources[doc["stream_resource"]]
            with h5py.File(resource["uri"].removeprefix("file://localhost"), "r") as f:
                values[resource["data_key"]] = f[resource["parameters"]["dataset"]][()]
    assert values["xray_detector_image"].shape == (6, 32, 128)
    np.testing.assert_allclose(values["xray_detector_temperature"], 330.0, atol=1.0)
    np.testing.assert_allclose(values["xray_detector_rotation_angle"], 0.0)
    # Time stamps are wall clock: 20 simulated s = 20 ms at the simulation's 1000x.
    intervals = np.diff(values["xray_detector_timestamp"])
    assert np.median(intervals) == pytest.approx(0.02, rel=0.5)
    estimate = estimate_time_lapse(beamline, num_frames=6, interval_s=20.0, exposure_s=0.5, sample=SAMPLE)
    assert estimate.n_frames == 6 + 5 + 5 and estimate.duration_s >= 5 * 20.0


def test_time_lapse_refuses_an_interval_shorter_than_the_exposure(beamline):
    with pytest.raises(PlanValidationError, match="interval_s"):
        time_lapse(beamline, num_frames=3, interval_s=0.1, exposure_s=0.5, sample=SAMPLE)
