"""Plans on the EPICS devices of the simulated facility: a tomography scan end to end over Channel
Access, its frames against the in-process simulation's physics, and validation that writes nothing."""

from __future__ import annotations

import time
from collections import Counter

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from event_model import DocumentNames, schema_validators

from corrflow.devices.beamline import build_beamline
from corrflow.formats.nexus import read_nxtomo, write_nxtomo_from_documents
from corrflow.plans import PlanValidationError, estimate_tomo_scan, summarize_messages, tomo_scan
from corrflow.plans.stubs import set_temperature
from corrflow.config.settings import load_settings
from corrflow.simulators import SimulatedWorld, xray_transmission

pytest_plugins = ["epics_fixtures"]

SAMPLE = {"name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}
N_PROJECTIONS, N_DARKS, N_FLATS = 8, 2, 3
EXPOSURE_S = 0.02  # 4000 photons per pixel in the flat field: 1.6 % Poisson noise


def _run(plan):
    docs: list[tuple[str, dict]] = []
    RunEngine({}, context_managers=[])(plan, lambda name, doc: docs.append((name, doc)))
    return docs


def _scan(beamline):
    return tomo_scan(
        beamline, num_projections=N_PROJECTIONS, exposure_s=EXPOSURE_S, num_darks=N_DARKS, num_flats=N_FLATS, sample=SAMPLE
    )


def _normalized_projections(docs):
    """-log((projection - dark) / (flat - dark)) per primary event, with each event's angle."""
    stream_of = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    paths = {
        d["uid"]: d["uri"].removeprefix("file://localhost")
        for n, d in docs
        if n == "stream_resource" and d["data_key"] == "xray_detector_image"
    }
    frames = {}
    for name, doc in docs:
        if name == "stream_datum" and doc["stream_resource"] in paths:
            with h5py.File(paths[doc["stream_resource"]], "r", swmr=True) as f:
                stream = stream_of[doc["descriptor"]]
                frames.setdefault(stream, []).append(f["/entry/data/data"][doc["indices"]["start"]].astype(np.float64))
    dark = np.mean(frames["dark"], axis=0)
    flat = np.mean(frames["flat"], axis=0)
    angles = [d["data"]["sample_stage_rotation"] for n, d in docs if n == "event" and stream_of[d["descriptor"]] == "primary"]
    projections = np.stack([-np.log(np.clip(p - dark, 1, None) / (flat - dark)) for p in frames["primary"]])
    return np.asarray(angles), projections


@pytest.fixture(scope="module")
def epics_scan(sim_facility, tmp_path_factory):
    root = tmp_path_factory.mktemp("epics-scan")
    settings = load_settings(
        data_root=root, beamline={"mode": "epics", "epics_prefix": sim_facility.beamline_prefix}
    )
    beamline = build_beamline(settings)
    # The facility is shared by the session: start from the stage's home, whatever ran before.
    for axis in (beamline.stage.rotation, beamline.stage.x):
        axis.set(0.0).wait(30)
    started = time.monotonic()
    docs = _run(_scan(beamline))
    return {"docs": docs, "beamline": beamline, "wall_s": time.monotonic() - started, "root": root}


def test_tomo_scan_on_epics_devices_produces_valid_documents(epics_scan):
    docs = epics_scan["docs"]
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    n_frames = N_PROJECTIONS + N_DARKS + N_FLATS
    # Per stream file: the image and the angle and ring current the IOC wrote with each frame.
    assert Counter(name for name, _ in docs) == {
        "start": 1, "descriptor": 3, "stream_resource": 3 * 3, "stream_datum": n_frames * 3, "event": n_frames, "stop": 1
    }
    assert docs[-1][1]["exit_status"] == "success"
    start = docs[0][1]
    assert start["identification"]["facility"].startswith("epics:")
    descriptor = next(d for n, d in docs if n == "descriptor")
    assert descriptor["data_keys"]["xray_detector_image"]["external"] == "STREAM:"
    assert descriptor["data_keys"]["xray_detector_image"]["shape"] == [32, 128]
    # The geometry of every frame is in its event, as read over Channel Access.
    primary_uid = next(d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "primary")
    primary = [d for n, d in docs if n == "event" and d["descriptor"] == primary_uid]
    angles = [event["data"]["sample_stage_rotation"] for event in primary]
    np.testing.assert_allclose(angles, np.arange(N_PROJECTIONS) * 180.0 / N_PROJECTIONS, atol=1e-6)


def test_scan_ends_with_the_shutter_closed_and_the_stage_back(epics_scan):
    beamline = epics_scan["beamline"]
    assert beamline.shutter.state.get() == "closed"
    assert beamline.stage.rotation.position == pytest.approx(0.0, abs=1e-6)
    assert beamline.stage.x.position == pytest.approx(0.0, abs=1e-6)


def test_frames_match_the_in_process_simulation(epics_scan, tmp_path):
    # Same plan on the in-process simulated beamline with the same simulation settings.
    settings = load_settings(data_root=tmp_path)
    world = SimulatedWorld(settings.simulation)
    sim_docs = _run(_scan(build_beamline(settings, world)))
    epics_angles, epics_projections = _normalized_projections(epics_scan["docs"])
    sim_angles, sim_projections = _normalized_projections(sim_docs)
    np.testing.assert_allclose(epics_angles, sim_angles, atol=1e-6)
    # Both agree with the noise-free line integrals of the phantom and with each other.
    expected = np.stack(
        [-np.log(xray_transmission(world.phantom(), world.xray, angle_deg=a, x_um=0, y_um=0, z_um=0)) for a in sim_angles]
    )
    assert expected.max() > 0.3  # the sample attenuates: the comparison is not trivial
    for projections in (epics_projections, sim_projections):
        assert np.median(np.abs(projections - expected)) < 0.03
    assert np.median(np.abs(epics_projections - sim_projections)) < 0.04
    assert np.corrcoef(epics_projections.ravel(), sim_projections.ravel())[0, 1] > 0.98


def test_nxtomo_from_the_epics_scan(epics_scan, tmp_path):
    path = write_nxtomo_from_documents(tmp_path / "scan.nxs", epics_scan["docs"])
    data = read_nxtomo(path)
    assert data.data.shape == (N_PROJECTIONS + N_DARKS + N_FLATS, 32, 128)
    assert list(data.image_key[: N_DARKS + N_FLATS]) == [2] * N_DARKS + [1] * N_FLATS
    np.testing.assert_allclose(data.projection_angles_deg, np.arange(N_PROJECTIONS) * 180.0 / N_PROJECTIONS, atol=1e-6)
    assert data.pixel_size_um == pytest.approx(8.0)


BAD_REQUESTS = [
    pytest.param({"start_deg": 200.0}, "rotation limits", id="angles-beyond-rotation-limit"),
    pytest.param({"flat_offset_x_um": 9000.0}, "outside its limits", id="flat-offset-beyond-x-limit"),
    pytest.param({"num_projections": "ten"}, "num_projections: Input should be a valid integer", id="malformed-count"),
    pytest.param({"exposure_s": -0.1}, "exposure_s: Input should be greater than 0", id="negative-exposure"),
    pytest.param({"sample": {"proposal": "P-1"}}, "sample.name", id="incomplete-sample"),
    pytest.param({"num_projections": 10_000_000}, "num_projections: Input should be less than or equal to", id="too-many-frames"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_REQUESTS)
def test_invalid_plans_are_refused_without_any_ca_write(epics_scan, sim_facility, changes, message):
    beamline = epics_scan["beamline"]
    before = sim_facility.put_counts()
    kwargs = {"num_projections": 10, "exposure_s": 0.01, "sample": SAMPLE, **changes}
    with pytest.raises(PlanValidationError, match=message):
        # Refused when called (the request) or by the preflight's Channel Access reads (the beamline).
        summarize_messages(tomo_scan(beamline, **kwargs))
    assert sim_facility.put_counts() == before


def test_out_of_range_temperature_is_refused_without_any_ca_write(epics_scan, sim_facility):
    before = sim_facility.put_counts()
    with pytest.raises(PlanValidationError, match="outside"):
        set_temperature(epics_scan["beamline"].heater, 5000.0)
    assert sim_facility.put_counts() == before


def test_valid_plans_write_nothing_until_run_and_estimate_matches(epics_scan, sim_facility):
    beamline = epics_scan["beamline"]
    before = sim_facility.put_counts()
    plan = _scan(beamline)
    estimate = estimate_tomo_scan(
        beamline, num_projections=N_PROJECTIONS, exposure_s=EXPOSURE_S, num_darks=N_DARKS, num_flats=N_FLATS, sample=SAMPLE
    )
    summary = summarize_messages(plan)  # walks the messages without a RunEngine
    assert summary["events"] == {"dark": N_DARKS, "flat": N_FLATS, "primary": N_PROJECTIONS}
    assert estimate.n_frames == N_PROJECTIONS + N_DARKS + N_FLATS
    assert estimate.data_bytes == estimate.n_frames * 32 * 128 * 2
    assert sim_facility.put_counts() == before


def test_fly_scan_on_epics_devices_records_the_angle_of_every_frame(epics_scan, tmp_path):
    from corrflow.plans import tomo_fly_scan

    beamline = epics_scan["beamline"]
    n, exposure_s, readout_s = 12, 0.03, 0.02
    docs = _run(
        tomo_fly_scan(beamline, num_projections=n, exposure_s=exposure_s, readout_s=readout_s, num_darks=1, num_flats=1, sample=SAMPLE)
    )
    assert docs[-1][1]["exit_status"] == "success"
    resources = {d["uid"]: d for name, d in docs if name == "stream_resource"}
    primary = next(d["uid"] for name, d in docs if name == "descriptor" and d["name"] == "primary")
    values = {}
    for name, doc in docs:
        if name == "stream_datum" and doc["descriptor"] == primary:
            resource = resources[doc["stream_resource"]]
            assert doc["indices"] == {"start": 0, "stop": n}
            with h5py.File(resource["uri"].removeprefix("file://localhost"), "r", swmr=True) as f:
                values[resource["data_key"]] = f[resource["parameters"]["dataset"]][()]
    angles = values["xray_detector_rotation_angle"]
    # Measured while turning, not the nominal start + k * step: the IOC's frame clock and the
    # motor run on their own in wall time, so on a loaded machine the spacing drifts (the
    # angles are what the frames saw, whatever it is). They never go back, start at the armed
    # angle and stay on the fly path (run-up included).
    assert np.all(np.diff(angles) >= 0)
    assert 0.0 <= angles[0] < 180.0 / n
    assert angles[-1] <= 180.0 + 2 * 180.0 / n  # where the rotation stops (default run-up: 2 steps)
    assert len(np.unique(np.round(angles, 3))) > 2  # taken while turning, not at rest
    # Each frame is the projection at its recorded angle.
    world = SimulatedWorld(load_settings().simulation)
    model = world.xray
    flat = model.incident_photons_per_s * exposure_s * model.flat_profile()
    for frame, angle in zip(values["xray_detector_image"][::4], angles[::4], strict=True):
        expected = xray_transmission(world.phantom(), model, angle_deg=angle, x_um=0, y_um=0, z_um=0)
        assert np.median(np.abs((frame - model.dark_counts) / flat - expected) / np.sqrt(expected / flat)) < 1.5
    data = read_nxtomo(write_nxtomo_from_documents(tmp_path / "fly.nxs", docs))
    np.testing.assert_allclose(data.projection_angles_deg, angles)
    assert beamline.stage.rotation.velocity.get() == pytest.approx(90.0 * 20)  # nominal speed restored
