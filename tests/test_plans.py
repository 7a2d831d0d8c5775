"""Plans on simulated devices: documents, files, physics of the frames, eager validation, dry runs."""

from __future__ import annotations

import inspect
from collections import Counter, defaultdict

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from event_model import DocumentNames, schema_validators
from ophyd.device import Staged

from corrflow.devices.beamline import build_beamline
from corrflow.devices.hdf5_stream import DATASET_PATH
from corrflow.devices.sem import build_microscope
from corrflow.plans import (
    PLAN_SPECS,
    PLANS,
    PlanValidationError,
    Sample,
    estimate_tomo_scan,
    micrograph,
    summarize_messages,
    tomo_fly_scan,
    tomo_scan,
)
from corrflow.plans.stubs import set_temperature
from corrflow.config.settings import load_settings
from corrflow.simulators import Phantom, SimulatedWorld

SAMPLE = {"name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}
ANGLES_DEG = (0.0, 45.0, 90.0, 135.0)
N_DARKS, N_FLATS = 3, 4
FLAT_PHOTONS = 2.0e4  # per pixel: well below the uint16 maximum, 0.7 % Poisson noise


def _run(RE, plan):
    docs: list[tuple[str, dict]] = []
    RE(plan, lambda name, doc: docs.append((name, doc)))
    return docs


def _frames_by_stream(docs):
    """Stream name -> frames read back from the HDF5 files the stream resources point to."""
    stream_of_descriptor = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    path_of_resource = {d["uid"]: d["uri"].removeprefix("file://localhost") for n, d in docs if n == "stream_resource"}
    paths = {}
    for name, doc in docs:
        if name == "stream_datum":
            paths[stream_of_descriptor[doc["descriptor"]]] = path_of_resource[doc["stream_resource"]]
    frames = {}
    for stream, path in paths.items():
        with h5py.File(path, "r") as f:
            frames[stream] = f[DATASET_PATH][()]
    return frames


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """One tomography scan on the simulated beamline, shared by the tests that inspect it."""
    root = tmp_path_factory.mktemp("scan")
    settings = load_settings(data_root=root)
    world = SimulatedWorld(settings.simulation)
    beamline = build_beamline(settings, world)
    exposure_s = FLAT_PHOTONS / world.xray.incident_photons_per_s
    RE = RunEngine({})
    docs = _run(
        RE,
        tomo_scan(
            beamline,
            num_projections=len(ANGLES_DEG),
            start_deg=0.0,
            exposure_s=exposure_s,
            num_darks=N_DARKS,
            num_flats=N_FLATS,
            sample=SAMPLE,
            parent_uids=["parent-run-1"],
            md={"operator_note": "test"},
        ),
    )
    return {"docs": docs, "world": world, "beamline": beamline, "settings": settings, "exposure_s": exposure_s}


@pytest.fixture
def beamline(tmp_path):
    settings = load_settings(data_root=tmp_path)
    return build_beamline(settings, SimulatedWorld(settings.simulation))


# -- documents ------------------------------------------------------------------------------------
def test_scan_documents_validate_against_event_model_schemas(scan):
    docs = scan["docs"]
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    counts = Counter(name for name, _ in docs)
    n_frames = N_DARKS + N_FLATS + len(ANGLES_DEG)
    # Per stream file: the image and the angle the camera wrote with each frame.
    assert counts == {
        "start": 1,
        "descriptor": 3,
        "stream_resource": 3 * 2,
        "stream_datum": n_frames * 2,
        "event": n_frames,
        "stop": 1,
    }
    assert docs[-1][1]["exit_status"] == "success"


def test_each_stream_has_its_own_file_and_contiguous_indices(scan):
    docs = scan["docs"]
    descriptors = {d["uid"]: d for n, d in docs if n == "descriptor"}
    assert sorted(d["name"] for d in descriptors.values()) == ["dark", "flat", "primary"]
    for descriptor in descriptors.values():
        key = descriptor["data_keys"]["xray_detector_image"]
        assert key["external"] == "STREAM:" and key["shape"] == [32, 128] and key["dtype_numpy"] == "<u2"
    resources = {d["uid"]: d for n, d in docs if n == "stream_resource"}
    assert len({r["uri"] for r in resources.values()}) == 3
    indices = defaultdict(list)
    resource_of_stream = defaultdict(set)
    image_resources = {uid for uid, r in resources.items() if r["data_key"] == "xray_detector_image"}
    for name, doc in docs:
        if name == "stream_datum" and doc["stream_resource"] in image_resources:
            stream = descriptors[doc["descriptor"]]["name"]
            indices[stream].append((doc["indices"]["start"], doc["indices"]["stop"]))
            resource_of_stream[stream].add(doc["stream_resource"])
    expected = {"dark": N_DARKS, "flat": N_FLATS, "primary": len(ANGLES_DEG)}
    for stream, n in expected.items():
        assert indices[stream] == [(k, k + 1) for k in range(n)]
        assert len(resource_of_stream[stream]) == 1
    events = [d for n, d in docs if n == "event"]
    assert all("xray_detector_image" not in e["data"] for e in events)
    frames = _frames_by_stream(docs)
    assert {s: f.shape for s, f in frames.items()} == {s: (n, 32, 128) for s, n in expected.items()}
    assert all(f.dtype == np.uint16 for f in frames.values())


def test_events_carry_geometry_image_key_and_shutter(scan):
    docs = scan["docs"]
    stream_of = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    by_stream = defaultdict(list)
    for name, doc in docs:
        if name == "event":
            by_stream[stream_of[doc["descriptor"]]].append(doc["data"])
    assert [e["xray_detector_image_key"] for e in by_stream["dark"]] == [2] * N_DARKS
    assert [e["xray_detector_image_key"] for e in by_stream["flat"]] == [1] * N_FLATS
    assert [e["xray_detector_image_key"] for e in by_stream["primary"]] == [0] * len(ANGLES_DEG)
    assert {e["xray_detector_saturated_px"] for events in by_stream.values() for e in events} == {0}
    assert {e["shutter"] for e in by_stream["dark"]} == {"closed"}
    assert {e["shutter"] for e in by_stream["flat"] + by_stream["primary"]} == {"open"}
    flat_offset_um = 1.5 * 128 * 8.0
    assert [e["sample_stage_x"] for e in by_stream["flat"]] == pytest.approx([flat_offset_um] * N_FLATS)
    assert [e["sample_stage_x"] for e in by_stream["primary"]] == pytest.approx([0.0] * len(ANGLES_DEG))
    assert [e["sample_stage_rotation"] for e in by_stream["primary"]] == pytest.approx(ANGLES_DEG)
    # In-situ provenance: the measured sample temperature goes with every frame.
    ambient_K = scan["world"].heater.ambient_K
    temperatures = [e["heater"] for events in by_stream.values() for e in events]
    assert temperatures == pytest.approx([ambient_K] * len(temperatures), abs=0.5)


def test_start_document_holds_the_three_metadata_groups(scan):
    start = scan["docs"][0][1]
    assert start["identification"] == {
        "proposal": "P-2026-001",
        "sample_name": "AlSi10Mg-7",
        "user": "ada",
        "facility": "corrflow-sim-synchrotron",
        "instrument": "sim-tomo",
        "description": "",
    }
    references = start["references"]
    assert references["frame"] == "beamline_sample"
    assert references["parent_uids"] == ["parent-run-1"]
    (transform,) = references["transforms"].values()
    assert np.asarray(transform).shape == (4, 4)
    settings = start["settings"]
    assert settings["parameters"]["exposure_s"] == scan["exposure_s"]
    assert settings["parameters"]["num_projections"] == 4
    assert set(settings["units"]) == set(settings["parameters"])
    assert settings["units"]["flat_offset_x_um"] == "um"
    assert start["nxtomo"]["image_key_by_stream"] == {"dark": 2, "flat": 1, "primary": 0}
    assert start["operator_note"] == "test"
    assert start["num_points"] == N_DARKS + N_FLATS + len(ANGLES_DEG)


def test_scan_ends_with_shutter_closed_and_stage_back(scan):
    beamline = scan["beamline"]
    assert beamline.shutter.state.get() == "closed"
    assert beamline.stage.x.position == pytest.approx(0.0)
    assert beamline.stage.rotation.position == pytest.approx(0.0)


# -- physics of the recorded frames -----------------------------------------------------------------
def _measured_line_integrals(frames):
    dark = frames["dark"].astype(np.float64).mean(axis=0)
    flat = frames["flat"].astype(np.float64).mean(axis=0)
    ratio = (frames["primary"].astype(np.float64) - dark) / (flat - dark)
    return -np.log(np.clip(ratio, 1e-6, None))


def _detector_coordinates(world):
    model = world.xray
    rows, cols = model.shape_px
    u_um = (np.arange(cols) - model.axis_column(x_um=0.0)) * model.pixel_size_um
    z_um = (np.arange(rows) - (rows - 1) / 2) * model.pixel_size_um
    return u_um, z_um


def test_projections_match_the_sample_at_the_stage_angle(scan):
    world = scan["world"]
    phantom = world.phantom()
    measured = _measured_line_integrals(_frames_by_stream(scan["docs"]))
    u_um, z_um = _detector_coordinates(world)
    for k, angle_deg in enumerate(ANGLES_DEG):
        def rmse(at_deg, k=k):
            expected = phantom.line_integrals(angle_deg=at_deg, u_um=u_um, z_um=z_um)
            return float(np.sqrt(np.mean((measured[k] - expected) ** 2)))

        at_angle = rmse(angle_deg)
        assert at_angle < 0.02  # Poisson noise of ~2e4 photons per pixel
        # A 3 degree error in the angle would be seen: the frame holds this angle's projection.
        assert rmse(angle_deg + 3.0) > 2.5 * at_angle
        assert rmse(angle_deg - 3.0) > 2.5 * at_angle


def test_fiducial_shadows_move_with_angle_as_the_geometry_predicts(scan):
    world = scan["world"]
    phantom = world.phantom()
    measured = _measured_line_integrals(_frames_by_stream(scan["docs"]))
    u_um, z_um = _detector_coordinates(world)
    pixel_um = world.xray.pixel_size_um
    axis_column = world.xray.axis_column(x_um=0.0)
    fiducials = phantom.features_of_kind("fiducial")
    assert len(fiducials) >= 6
    for fiducial in fiducials:
        without = Phantom(features=tuple(f for f in phantom.features if f is not fiducial), temperature_K=phantom.temperature_K)
        x_f, y_f, z_f = fiducial.center_um
        row = int(round(z_f / pixel_um + (len(z_um) - 1) / 2))
        for k, angle_deg in enumerate(ANGLES_DEG):
            theta = np.radians(angle_deg)
            # Contract: the ray at u sees the sample point (x, y) with u = x cos(theta) - y sin(theta).
            predicted_column = axis_column + (x_f * np.cos(theta) - y_f * np.sin(theta)) / pixel_um
            shadow = measured[k, row] - without.line_integrals(angle_deg=angle_deg, u_um=u_um, z_um=z_um[[row]])[0]
            window = np.abs(np.arange(len(u_um)) - predicted_column) <= 8
            weights = np.clip(np.where(window, shadow, 0.0), 0.0, None)
            centroid = float(np.sum(weights * np.arange(len(u_um))) / np.sum(weights))
            assert centroid == pytest.approx(predicted_column, abs=0.5), (fiducial.center_um, angle_deg)


def test_flats_show_no_sample_and_darks_the_dark_level(scan):
    world = scan["world"]
    model = world.xray
    frames = _frames_by_stream(scan["docs"])
    expected_flat = model.incident_photons_per_s * scan["exposure_s"] * model.flat_profile()
    ratio = (frames["flat"].astype(np.float64) - model.dark_counts) / expected_flat
    assert ratio.mean() == pytest.approx(1.0, abs=0.005)
    assert ratio.min() > 0.95  # no attenuating sample anywhere (Poisson noise is ~0.7 %)
    darks = frames["dark"].astype(np.float64)
    assert darks.mean() == pytest.approx(model.dark_counts, abs=0.5)
    assert darks.std() == pytest.approx(model.read_noise_counts, rel=0.2)


# -- cleanup on failure -------------------------------------------------------------------------------
def test_failure_mid_scan_still_closes_shutter_and_returns_stage(beamline):
    RE = RunEngine({})

    class Boom(RuntimeError):
        pass

    def fail_on_second_projection(name, doc):
        if name == "event" and doc["seq_num"] == 2 and doc["data"]["xray_detector_image_key"] == 0:
            raise Boom("simulated failure")

    beamline.stage.rotation.set(10.0).wait(timeout=5)
    with pytest.raises(Boom):
        RE(
            tomo_scan(beamline, num_projections=6, exposure_s=0.1, num_darks=1, num_flats=1, sample=SAMPLE),
            fail_on_second_projection,
        )
    assert beamline.shutter.state.get() == "closed"
    assert beamline.stage.x.position == pytest.approx(0.0)
    assert beamline.stage.rotation.position == pytest.approx(10.0)
    assert beamline.detector._staged == Staged.no
    assert beamline.detector.get_index() == 0  # its file was closed


# -- validation before anything moves -----------------------------------------------------------------
GOOD = dict(num_projections=10, exposure_s=0.1, num_darks=2, num_flats=2, sample=SAMPLE)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"exposure_s": -0.1}, ["exposure_s"]),
        ({"exposure_s": 0.0}, ["exposure_s"]),
        ({"exposure_s": float("nan")}, ["exposure_s"]),
        ({"exposure_s": "0.1"}, ["exposure_s"]),
        ({"num_projections": 0}, ["num_projections"]),
        ({"num_projections": 1}, ["num_projections"]),
        ({"num_projections": 10.0}, ["num_projections"]),
        ({"num_projections": True}, ["num_projections"]),
        ({"num_darks": 0}, ["num_darks"]),
        ({"num_flats": -1}, ["num_flats"]),
        ({"rotation_range_deg": 270.0}, ["rotation_range_deg"]),
        ({"axis_offset_um": 100.0}, ["axis_offset_um", "rotation_range_deg=360"]),
        ({"flat_offset_x_um": 0.0}, ["flat_offset_x_um"]),
        ({"sample": {"name": "", "proposal": "p", "user": "u"}}, ["sample.name"]),
        ({"sample": {"name": "a/b", "proposal": "p", "user": "u"}}, ["sample.name"]),
        ({"sample": {"proposal": "p", "user": "u"}}, ["sample.name"]),
        ({"sample": {"name": "s", "proposal": "a b"}}, ["sample.proposal"]),
        ({"sample": "s1"}, ["sample"]),
        ({"md": {"settings": {}}}, ["md"]),
        ({"md": {"nxtomo": {}}}, ["md"]),
        ({"parent_uids": "uid"}, ["parent_uids"]),
        ({"exposure_s": -1.0, "num_projections": 0, "sample": {"name": "s", "user": ""}}, ["exposure_s", "num_projections", "sample.user"]),
    ],
)
def test_bad_arguments_are_refused_when_the_plan_is_called(beamline, changes, names, monkeypatch):
    # Building the plan reads no hardware: any device read now fails the test.
    import ophyd

    def no_hardware(*args, **kwargs):
        raise AssertionError("the plan read the instrument when it was called")

    monkeypatch.setattr(ophyd.Signal, "get", no_hardware)
    monkeypatch.setattr(ophyd.Signal, "read", no_hardware)
    with pytest.raises(PlanValidationError) as info:
        tomo_scan(beamline, **{**GOOD, **changes})
    for name in names:
        assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_creating_a_plan_reads_no_hardware(beamline, monkeypatch):
    import ophyd

    def no_hardware(*args, **kwargs):
        raise AssertionError("the plan read the instrument when it was called")

    monkeypatch.setattr(ophyd.Signal, "get", no_hardware)
    monkeypatch.setattr(ophyd.Signal, "read", no_hardware)
    for plan in (tomo_scan(beamline, **GOOD), tomo_fly_scan(beamline, **GOOD)):
        assert inspect.isgenerator(plan)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"start_deg": 300.0}, ["rotation limits"]),
        ({"start_deg": -400.0}, ["rotation limits"]),
        ({"flat_offset_x_um": 100.0}, ["field of view"]),
        ({"flat_offset_x_um": 6000.0}, ["limits"]),
        ({"rotation_range_deg": 360.0, "axis_offset_um": 2000.0}, ["px seen by both half turns"]),
    ],
)
def test_the_preflight_refuses_what_the_beamline_cannot_do_before_any_motion(beamline, changes, names):
    stage = beamline.stage
    stage.x.set(100.0).wait(timeout=5)
    positions_before = {axis.name: axis.position for axis in (stage.x, stage.y, stage.z, stage.rotation)}
    plan = tomo_scan(beamline, **{**GOOD, **changes})  # a valid request: refused only against the beamline
    engine = RunEngine({})
    commands = []
    engine.msg_hook = lambda msg: commands.append(msg.command)
    documents = []
    with pytest.raises(PlanValidationError) as info:
        engine(plan, lambda name, doc: documents.append(name))
    for name in names:
        assert name in str(info.value)
    assert set(commands) <= {"read", "locate"}, "the preflight only reads"
    assert documents == [], "no run was opened"
    assert {axis.name: axis.position for axis in (stage.x, stage.y, stage.z, stage.rotation)} == positions_before
    assert beamline.shutter.state.get() == "closed"
    assert not beamline.data_dir.exists() or not any(beamline.data_dir.iterdir())


def test_the_preflight_reads_the_beamline_when_the_plan_runs_not_when_it_was_made(beamline):
    plan = tomo_scan(beamline, **GOOD)
    beamline.stage.x.set(250.0).wait(timeout=5)  # moved after the plan was made (a queued experiment)
    docs = _run(RunEngine({}), plan)
    x_of_flats = [d["data"][beamline.stage.x.name] for n, d in docs if n == "event" and d.get("descriptor") in
                  {doc["uid"] for name, doc in docs if name == "descriptor" and doc["name"] == "flat"}]
    flat_offset_um = 1.5 * beamline.detector.frame_shape_px[1] * beamline.detector.pixel_size_um.get()
    assert x_of_flats and all(x == pytest.approx(250.0 + flat_offset_um) for x in x_of_flats)
    assert beamline.stage.x.position == pytest.approx(250.0)


def test_wrong_instrument_is_refused(beamline):
    with pytest.raises(PlanValidationError, match="beamline"):
        tomo_scan("beamline-1", **GOOD)
    with pytest.raises(PlanValidationError, match="detector must be a XrayDetector"):
        tomo_scan((beamline.stage, beamline.shutter, beamline.shutter), **GOOD)


def test_calling_a_plan_moves_nothing_until_it_is_run(beamline):
    plan = tomo_scan(beamline, **GOOD)
    assert inspect.isgenerator(plan)
    assert beamline.stage.rotation.position == 0.0
    assert not beamline.data_dir.exists()


def test_set_temperature_checks_when_called_and_waits_for_settling(beamline):
    heater = beamline.heater
    with pytest.raises(PlanValidationError, match="temperature_K"):
        set_temperature(heater, 5000.0)
    assert heater.setpoint.get() == pytest.approx(293.15)
    RunEngine({})(set_temperature(heater, 350.0))
    world = heater._world
    assert world.sample_temperature_K() == pytest.approx(350.0, abs=heater.tolerance_K.get())


# -- dry run, estimates, registry ---------------------------------------------------------------------
def test_summarize_messages_counts_without_touching_devices(beamline):
    summary = summarize_messages(tomo_scan(beamline, **GOOD))
    assert summary["events"] == {"dark": 2, "flat": 2, "primary": 10}
    assert summary["runs"] == 1
    messages = summary["messages"]
    assert messages["stage"] == messages["unstage"] == 3
    assert messages["trigger"] >= 14 and messages["save"] == 14
    assert summary["total"] == sum(messages.values())
    assert beamline.stage.rotation.position == 0.0
    assert beamline.shutter.state.get() == "closed"
    assert not beamline.data_dir.exists()


def test_estimate_counts_frames_bytes_and_motion(beamline):
    estimate = estimate_tomo_scan(beamline, **{**GOOD, "flat_offset_x_um": 2000.0})
    assert estimate.n_frames == 14
    assert estimate.data_bytes == 14 * 32 * 128 * 2
    stage = beamline.stage
    rotation_v, x_v = stage.rotation.velocity.get(), stage.x.velocity.get()
    last_deg = 180.0 * 9 / 10
    expected_s = (
        14 * 0.1
        + 2 * last_deg / rotation_v  # sweep out and return
        + 2 * 2000.0 / x_v  # flat excursion out and back
        + 3 * beamline.shutter.actuation_time_s.get()
    )
    assert estimate.duration_s == pytest.approx(expected_s)
    with pytest.raises(PlanValidationError):
        estimate_tomo_scan(beamline, **{**GOOD, "exposure_s": -1.0})


def test_plan_registry_exposes_typed_keyword_parameters():
    assert set(PLANS) == {
        "tomo_scan", "tomo_fly_scan", "xray_mosaic", "temperature_series", "time_lapse", "align_rotation_axis",
        "micrograph", "micrograph_mosaic", "relocate_roi",
    }
    assert PLAN_SPECS["tomo_scan"].instrument == "beamline"
    for plan in PLANS.values():
        parameters = list(inspect.signature(plan).parameters.values())
        assert parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[1:])
        assert all(p.annotation is not inspect.Parameter.empty for p in parameters)


# -- microscopy ---------------------------------------------------------------------------------------
def test_micrograph_moves_and_records_one_image(tmp_path):
    settings = load_settings(data_root=tmp_path)
    world = SimulatedWorld(settings.simulation)
    microscope = build_microscope(settings, world)
    docs = _run(
        RunEngine({}),
        micrograph(microscope, stage_x_um=25.0, stage_y_um=-10.0, sample=Sample(**SAMPLE), parent_uids=["tomo-1"]),
    )
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    assert Counter(n for n, _ in docs)["stream_datum"] == 1
    (event,) = [d for n, d in docs if n == "event"]
    assert event["data"]["microscope_stage_x"] == pytest.approx(25.0)
    assert event["data"]["microscope_stage_y"] == pytest.approx(-10.0)
    frames = _frames_by_stream(docs)
    assert frames["primary"].shape == (1, 256, 256) and frames["primary"].dtype == np.float32
    start = docs[0][1]
    assert start["references"]["frame"] == "microscope_stage"
    assert start["references"]["parent_uids"] == ["tomo-1"]
    # The recorded pixel-to-stage transform puts the image centre at the stage position.
    stage_from_image = np.asarray(start["references"]["transforms"]["microscope_stage_from_image_px"])
    centre = stage_from_image @ np.array([(256 - 1) / 2, (256 - 1) / 2, 0.0, 1.0])
    assert centre[:2] == pytest.approx([25.0, -10.0])


def test_micrograph_refuses_targets_outside_the_stage(tmp_path):
    settings = load_settings(data_root=tmp_path)
    microscope = build_microscope(settings, SimulatedWorld(settings.simulation))
    with pytest.raises(PlanValidationError, match="stage_x_um"):  # by the preflight: its reads only
        summarize_messages(micrograph(microscope, stage_x_um=1e6, stage_y_um=0.0, sample=SAMPLE))
    assert microscope.stage.x.position == 0.0
    assert not microscope.data_dir.exists()
