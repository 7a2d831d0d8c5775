"""The tomography fly scan on the simulated beamline: documents, per-frame angles, physics, NXtomo."""

from __future__ import annotations

from collections import Counter

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from event_model import DocumentNames, schema_validators

from corrflow.devices.beamline import build_beamline
from corrflow.formats.nexus import read_nxtomo, write_nxtomo_from_documents
from corrflow.plans import PLAN_SPECS, PlanValidationError, estimate_tomo_fly_scan, summarize_messages, tomo_fly_scan
from corrflow.config.settings import load_settings
from corrflow.simulators import SimulatedWorld, xray_transmission

SAMPLE = {"name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}
N, EXPOSURE_S, READOUT_S = 20, 0.2, 0.001
NXTOMO_REQUIRED = (
    "entry/definition",
    "entry/instrument/source/type",
    "entry/instrument/source/name",
    "entry/instrument/source/probe",
    "entry/instrument/detector/data",
    "entry/instrument/detector/image_key",
    "entry/instrument/detector/x_pixel_size",
    "entry/instrument/detector/y_pixel_size",
    "entry/instrument/detector/distance",
    "entry/sample/name",
    "entry/sample/rotation_angle",
    "entry/sample/x_translation",
    "entry/sample/y_translation",
    "entry/sample/z_translation",
    "entry/control/data",
    "entry/data/data",
    "entry/data/rotation_angle",
    "entry/data/image_key",
)


@pytest.fixture(scope="module")
def fly(tmp_path_factory):
    settings = load_settings(data_root=tmp_path_factory.mktemp("fly"))
    world = SimulatedWorld(settings.simulation)
    beamline = build_beamline(settings, world)
    docs: list[tuple[str, dict]] = []
    RunEngine({})(
        tomo_fly_scan(beamline, num_projections=N, exposure_s=EXPOSURE_S, readout_s=READOUT_S, num_darks=2, num_flats=2, sample=SAMPLE),
        lambda name, doc: docs.append((name, doc)),
    )
    return {"docs": docs, "world": world, "beamline": beamline}


def _fly_values(docs, data_key):
    """Values of ``data_key`` in the fly (``primary``) stream, read from the detector file."""
    resources = {d["uid"]: d for n, d in docs if n == "stream_resource"}
    primary = next(d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "primary")
    for name, doc in docs:
        if name == "stream_datum" and doc["descriptor"] == primary and resources[doc["stream_resource"]]["data_key"] == data_key:
            resource = resources[doc["stream_resource"]]
            with h5py.File(resource["uri"].removeprefix("file://localhost"), "r", swmr=True) as f:
                return f[resource["parameters"]["dataset"]][doc["indices"]["start"] : doc["indices"]["stop"]]
    raise AssertionError(f"no stream datum for {data_key}")


def test_fly_documents_announce_frames_and_per_frame_angles(fly):
    docs = fly["docs"]
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    assert docs[-1][1]["exit_status"] == "success"
    descriptors = {d["uid"]: d for n, d in docs if n == "descriptor"}
    assert sorted(d["name"] for d in descriptors.values()) == ["dark", "flat", "primary"]
    primary = next(d for d in descriptors.values() if d["name"] == "primary")
    assert {"xray_detector_image", "xray_detector_rotation_angle", "xray_detector_x_translation"} <= set(primary["data_keys"])
    assert all(key["external"] == "STREAM:" for key in primary["data_keys"].values())
    # The fly stream has no events: its frames are stream data with sequence numbers 1..N.
    events = Counter(descriptors[d["descriptor"]]["name"] for n, d in docs if n == "event")
    assert events == {"dark": 2, "flat": 2}
    fly_datums = [d for n, d in docs if n == "stream_datum" and d["descriptor"] == primary["uid"]]
    assert all(d["indices"] == {"start": 0, "stop": N} and d["seq_nums"] == {"start": 1, "stop": N + 1} for d in fly_datums)
    assert docs[0][1]["settings"]["parameters"]["velocity_deg_per_s"] == pytest.approx(180.0 / (N * (EXPOSURE_S + READOUT_S)))


def test_angles_are_recorded_at_mid_exposure_of_a_continuous_rotation(fly):
    angles = _fly_values(fly["docs"], "xray_detector_rotation_angle")
    velocity = 180.0 / (N * (EXPOSURE_S + READOUT_S))
    period = EXPOSURE_S + READOUT_S
    # Armed at start_deg: frame k is exposed from start + k*period*v, recorded at its middle.
    expected = (np.arange(N) * period + EXPOSURE_S / 2) * velocity
    np.testing.assert_allclose(angles, expected, atol=1e-6)


def test_fly_frames_are_projections_at_the_recorded_angles(fly):
    docs, world = fly["docs"], fly["world"]
    frames = _fly_values(docs, "xray_detector_image").astype(np.float64)
    angles = _fly_values(docs, "xray_detector_rotation_angle")
    model = world.xray
    flat = model.incident_photons_per_s * EXPOSURE_S * model.flat_profile()
    for frame, angle in zip(frames[::5], angles[::5], strict=True):
        expected = xray_transmission(world.phantom(), model, angle_deg=angle, x_um=0, y_um=0, z_um=0)
        measured = (frame - model.dark_counts) / flat
        assert np.median(np.abs(measured - expected) / np.sqrt(expected / flat)) < 1.5


def test_fly_scan_leaves_the_stage_as_found(fly):
    stage, shutter = fly["beamline"].stage, fly["beamline"].shutter
    assert stage.rotation.position == 0.0 and stage.x.position == 0.0
    assert stage.rotation.velocity.get() == 90.0
    assert shutter.state.get() == "closed"


def test_nxtomo_of_a_fly_scan_has_the_application_definition_fields(fly, tmp_path):
    import nexusformat.nexus as nx

    path = write_nxtomo_from_documents(tmp_path / "fly.nxs", fly["docs"])
    data = read_nxtomo(path)
    assert data.data.shape == (N + 4, 32, 128)
    assert list(data.image_key) == [2, 2, 1, 1] + [0] * N
    np.testing.assert_allclose(data.projection_angles_deg, _fly_values(fly["docs"], "xray_detector_rotation_angle"))
    root = nx.nxload(str(path))
    for field in NXTOMO_REQUIRED:
        assert field in root, field
    assert str(root["entry/definition"]) == "NXtomo"
    assert root["entry/sample/rotation_angle"].attrs["units"] == "degree"
    assert root["entry/instrument/detector"].nxclass == "NXdetector"


def test_fly_scan_validation_refuses_impossible_speeds_and_paths(fly):
    beamline = fly["beamline"]
    # What the rotation cannot do is found by the preflight reads, the plan's first messages.
    with pytest.raises(PlanValidationError, match="above its velocity"):
        summarize_messages(tomo_fly_scan(beamline, num_projections=100, exposure_s=0.001, sample=SAMPLE))
    with pytest.raises(PlanValidationError, match="fly path"):
        summarize_messages(tomo_fly_scan(beamline, num_projections=10, exposure_s=1.0, start_deg=-360.0, sample=SAMPLE))
    with pytest.raises(PlanValidationError, match="readout_s: Input should be greater than or equal to 0"):
        tomo_fly_scan(beamline, num_projections=10, exposure_s=1.0, readout_s=-1.0, sample=SAMPLE)


def test_fly_scan_is_registered_with_an_estimate(fly):
    beamline = fly["beamline"]
    assert PLAN_SPECS["tomo_fly_scan"].plan is tomo_fly_scan
    estimate = estimate_tomo_fly_scan(beamline, num_projections=N, exposure_s=EXPOSURE_S, num_darks=2, num_flats=2, sample=SAMPLE)
    assert estimate.n_frames == N + 4
    # The rotation alone takes the acquisition time (plus run-up) at the fly speed.
    assert estimate.duration_s > N * (EXPOSURE_S + 0.001)
    summary = summarize_messages(tomo_fly_scan(beamline, num_projections=N, exposure_s=EXPOSURE_S, sample=SAMPLE))
    assert summary["messages"]["kickoff"] == 1 and summary["messages"]["collect"] == 1
