"""Simulated ophyd devices: motion in simulated time, limits, HDF5 stream assets, heater settling."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from bluesky.protocols import WritesStreamAssets
from ophyd import Device
from ophyd.utils import LimitError

from corrflow.devices import beamline as beamline_module
from corrflow.devices import sem as sem_module
from corrflow.devices.beamline import build_beamline
from corrflow.devices.clock import SimClock
from corrflow.devices.hdf5_stream import DATASET_PATH, HDF5FrameWriter
from corrflow.formats.hdf5_frames import ATTRIBUTES_PATH
from corrflow.devices.motors import SimMotor
from corrflow.devices.sem import build_microscope
from corrflow.config.settings import load_settings
from corrflow.simulators import SimulatedWorld, microscope_image


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_root=tmp_path)


@pytest.fixture
def world(settings):
    return SimulatedWorld(settings.simulation)


@pytest.fixture
def beamline(settings, world, tmp_path):
    return build_beamline(settings, world, data_dir=tmp_path / "raw")


def _slow_motor(**kwargs) -> SimMotor:
    # 20 simulated seconds per wall second: a 100 um move at 100 um/s takes 50 ms of wall time.
    options = dict(egu="um", limits=(-200.0, 200.0), velocity=100.0, clock=SimClock.wall(time_scale=20.0))
    options.update(kwargs)
    return SimMotor(name="m", **options)


# -- motors ---------------------------------------------------------------------------------------
def test_motor_set_returns_at_once_and_moves_in_simulated_time():
    motor = _slow_motor()
    t0 = time.monotonic()
    status = motor.set(200.0)
    returned_after_s = time.monotonic() - t0
    assert returned_after_s < 0.05
    assert not status.done
    assert status.timeout is not None and status.timeout > 0.1
    status.wait(timeout=5)
    elapsed_s = time.monotonic() - t0
    assert status.success
    assert motor.position == pytest.approx(200.0)
    assert motor.readback.get() == pytest.approx(200.0)
    assert motor.setpoint.get() == pytest.approx(200.0)
    # 200 um at 100 um/s is 2 simulated seconds, 100 ms of wall time at time_scale 20.
    assert elapsed_s >= 0.095


def test_motor_readback_passes_intermediate_positions():
    motor = _slow_motor()
    seen = []
    motor.readback.subscribe(lambda value, **kwargs: seen.append(value), run=False)
    motor.set(100.0).wait(timeout=5)
    intermediate = [v for v in seen if 0.0 < v < 100.0]
    assert len(intermediate) >= 2
    assert intermediate == sorted(intermediate)


@pytest.mark.parametrize("target", [200.5, -1000.0])
def test_motor_refuses_targets_outside_limits_before_moving(target):
    motor = _slow_motor()
    motor.set(10.0).wait(timeout=5)
    with pytest.raises(LimitError, match="outside the limits"):
        motor.set(target)
    assert isinstance(LimitError("x"), ValueError)
    assert motor.position == pytest.approx(10.0)
    assert motor.setpoint.get() == pytest.approx(10.0)
    assert not motor.moving


@pytest.mark.parametrize("target", [float("nan"), "5", None, True])
def test_motor_refuses_non_numbers(target):
    motor = _slow_motor()
    with pytest.raises(ValueError):
        motor.set(target)
    assert motor.position == 0.0


def test_motor_stop_halts_between_start_and_target():
    motor = _slow_motor(velocity=20.0)  # 200 um at 20 um/s: 10 simulated s, 0.5 s wall
    status = motor.set(200.0)
    time.sleep(0.1)
    motor.stop()
    with pytest.raises(Exception, match="failed"):
        status.wait(timeout=5)
    assert not status.success
    stopped_at = motor.position
    assert 0.0 < stopped_at < 200.0
    assert not motor.moving
    time.sleep(0.05)
    assert motor.position == stopped_at


def test_motor_velocity_must_be_positive():
    motor = _slow_motor()
    with pytest.raises(ValueError, match="> 0"):
        motor.velocity.put(0.0)
    with pytest.raises(ValueError):
        SimMotor(name="bad", egu="um", limits=(5.0, -5.0), velocity=1.0, clock=SimClock.wall())


def test_motor_move_wait_is_refused_rather_than_blocking():
    motor = _slow_motor()
    with pytest.raises(ValueError, match="wait"):
        motor.move(5.0, wait=True)


def test_stage_axes_share_the_world_clock_and_describe_units(beamline, world):
    stage = beamline.stage
    for axis in (stage.x, stage.y, stage.z, stage.rotation, stage.tip, stage.tilt):
        assert axis.clock.now_s.__self__ is world  # type: ignore[attr-defined]
    description = stage.describe()
    assert description["sample_stage_x"]["units"] == "um"
    assert description["sample_stage_rotation"]["units"] == "deg"
    assert stage.hints == {"fields": ["sample_stage_rotation"]}


# -- factories ------------------------------------------------------------------------------------
def test_factories_build_nothing_at_import():
    for module in (beamline_module, sem_module):
        assert not [name for name, value in vars(module).items() if isinstance(value, Device)]


def test_epics_mode_is_picked_by_one_setting_and_needs_no_world(tmp_path, monkeypatch):
    # The EPICS devices are tested against the caproto IOCs (tests/test_epics_*.py); no Channel
    # Access channel is created here: a process's CA library reads its address list only once.
    settings = load_settings(
        data_root=tmp_path,
        beamline={"mode": "epics", "epics_prefix": "BL:TOMO:"},
        microscope={"mode": "epics", "epics_prefix": "SEM:"},
    )
    built = []
    monkeypatch.setattr(
        beamline_module, "_build_epics_beamline", lambda s, directory, timeout: built.append((s.beamline.epics_prefix, directory)) or "epics-beamline"
    )
    assert build_beamline(settings) == "epics-beamline"
    assert built == [("BL:TOMO:", settings.beamline_storage)]
    with pytest.raises(TypeError, match="SimulatedWorld"):
        build_beamline(load_settings(data_root=tmp_path))


def test_beamline_defaults_to_settings_storage(settings, world):
    beamline = build_beamline(settings, world)
    assert beamline.data_dir == settings.beamline_storage
    assert beamline.detector.data_dir == settings.beamline_storage
    assert beamline.frame == "beamline_sample"
    assert not settings.beamline_storage.exists()  # nothing is written before a detector is staged


# -- shutter --------------------------------------------------------------------------------------
def test_shutter_opens_and_closes_and_refuses_other_values(beamline):
    shutter = beamline.shutter
    assert shutter.state.get() == "closed"
    shutter.set("open").wait(timeout=5)
    assert shutter.is_open
    with pytest.raises(ValueError, match="open"):
        shutter.set("half")
    shutter.set("closed").wait(timeout=5)
    assert not shutter.is_open


# -- detectors ------------------------------------------------------------------------------------
def test_detector_refuses_trigger_before_stage(beamline, tmp_path):
    with pytest.raises(RuntimeError, match="stage"):
        beamline.detector.trigger()
    assert not (tmp_path / "raw").exists()


def test_detector_describes_image_as_stream_and_reads_only_scalars(beamline):
    detector = beamline.detector
    assert isinstance(detector, WritesStreamAssets)
    key = detector.image_data_key
    description = detector.describe()
    rows, cols = detector.frame_shape_px
    assert description[key] == {
        "source": "SIM:xray_detector:image",
        "dtype": "array",
        "dtype_numpy": "<u2",
        "shape": [rows, cols],
        "dims": ["row", "column"],
        "external": "STREAM:",
    }
    assert key not in detector.read()
    # The frame's own angle comes from the file, as the image does (the camera writes it).
    angle = "xray_detector_rotation_angle"
    assert description[angle]["external"] == "STREAM:" and description[angle]["units"] == "deg"
    assert set(detector.read()) == set(description) - {key, angle}
    config = detector.read_configuration()
    assert config["xray_detector_pixel_size_um"]["value"] == 8.0
    assert config["xray_detector_energy_keV"]["value"] == 25.0
    assert config["xray_detector_shape_px"]["value"] == [rows, cols]


def test_detector_writes_frames_and_stream_documents(beamline, tmp_path):
    detector = beamline.detector
    detector.stage()
    path = detector.last_file_path
    assert path.parent == tmp_path / "raw" and path.exists()
    for _ in range(3):
        detector.trigger().wait(timeout=5)
    assert detector.get_index() == 3
    assert detector.read()["xray_detector_frame_number"]["value"] == 3
    docs = list(detector.collect_asset_docs())
    assert [name for name, _ in docs] == ["stream_resource", "stream_resource", "stream_datum", "stream_datum"]
    assert [doc["data_key"] for _, doc in docs[:2]] == ["xray_detector_image", "xray_detector_rotation_angle"]
    resource, datum = docs[0][1], docs[2][1]
    rows, cols = detector.frame_shape_px
    assert resource["mimetype"] == "application/x-hdf5"
    assert resource["uri"] == f"file://localhost{path}"
    assert resource["data_key"] == "xray_detector_image"
    assert resource["parameters"]["dataset"] == DATASET_PATH
    assert resource["parameters"]["chunk_shape"] == [1, rows, cols]
    assert datum["indices"] == {"start": 2, "stop": 3}  # a step scan's event holds its latest frame only
    assert datum["seq_nums"] == {"start": 0, "stop": 0}
    assert datum["descriptor"] == ""
    assert datum["stream_resource"] == resource["uid"]
    assert datum["uid"] == f"{resource['uid']}/0"
    # While staged, the file can be read (SWMR) and already holds the flushed frames.
    with h5py.File(path, "r", swmr=True) as f:
        assert f[DATASET_PATH].shape == (3, rows, cols)
    detector.trigger().wait(timeout=5)
    later = list(detector.collect_asset_docs())
    assert [name for name, _ in later] == ["stream_datum", "stream_datum"]
    assert later[0][1]["indices"] == {"start": 3, "stop": 4}
    assert later[0][1]["uid"] == f"{resource['uid']}/1"
    assert list(detector.collect_asset_docs()) == []
    detector.unstage()
    with h5py.File(path, "r") as f:
        dataset = f[DATASET_PATH]
        assert dataset.shape == (4, rows, cols)
        assert dataset.dtype == np.uint16
        assert dataset.chunks == (1, rows, cols)
    # A new staging is a new file and a new resource; the old file is untouched.
    detector.stage()
    assert detector.last_file_path != path
    detector.unstage()


def test_unstaging_during_an_exposure_keeps_the_frame(beamline):
    """An abort unstages the detector while a trigger may be in flight: the frame lands, the status succeeds."""
    detector = beamline.detector
    detector.stage()
    path = detector.last_file_path
    status = detector.trigger()
    detector.unstage()  # at once, while the exposure runs
    status.wait(timeout=5)
    assert status.success
    with h5py.File(path, "r") as f:
        assert f[DATASET_PATH].shape[0] == 1


@pytest.mark.fault("no overwrite")
def test_frame_writer_never_overwrites(tmp_path):
    path = tmp_path / "frames.h5"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        HDF5FrameWriter(path, frame_shape=(4, 4), dtype=np.uint16)
    assert path.read_bytes() == b"precious"


def _seen_by_another_process(path) -> tuple[tuple[int, ...], list[float]]:
    """Frame-dataset shape and the ``angle_deg`` attribute as a separate SWMR reader sees them.

    (In the writer's own process HDF5 shares the open file, so only another process shows what a
    reader really sees.)
    """
    code = (
        "import h5py, json, sys\n"
        "with h5py.File(sys.argv[1], 'r', swmr=True) as f:\n"
        f"    print(json.dumps([f['{DATASET_PATH}'].shape, f['{ATTRIBUTES_PATH}/angle_deg'][()].tolist()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, timeout=60)
    shape, angles = json.loads(out.stdout)
    return tuple(shape), angles


def test_frame_writer_shows_frames_to_readers_only_once_flushed(tmp_path):
    path = tmp_path / "frames.h5"
    frames = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    writer = HDF5FrameWriter(path, frame_shape=(4, 5), dtype=np.uint16, attribute_names=("angle_deg", "x_um"),
                             flush_interval_s=1e6)
    try:
        for k, frame in enumerate(frames):
            writer.append(frame, {"angle_deg": 10.0 * k})  # x_um missing: recorded as NaN
        assert (writer.n_frames, writer.n_flushed) == (3, 0)
        assert _seen_by_another_process(path) == ((0, 4, 5), [])  # the timer has not fired: nothing visible
        assert writer.flush() == 3
        assert _seen_by_another_process(path) == ((3, 4, 5), [0.0, 10.0, 20.0])
        writer.append(frames[0], {"angle_deg": 30.0, "x_um": 1.5})
    finally:
        writer.close()  # flushes what is pending
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f[DATASET_PATH][:3], frames)
        assert f[DATASET_PATH].shape == (4, 4, 5)
        np.testing.assert_array_equal(f[f"{ATTRIBUTES_PATH}/angle_deg"][()], [0.0, 10.0, 20.0, 30.0])
        x_um = f[f"{ATTRIBUTES_PATH}/x_um"][()]
        assert np.isnan(x_um[:3]).all() and x_um[3] == 1.5


def test_frame_writer_flush_interval_zero_flushes_every_frame_and_rejects_bad_input(tmp_path):
    writer = HDF5FrameWriter(tmp_path / "a.h5", frame_shape=(2, 2), dtype=np.uint16, flush_interval_s=0.0)
    try:
        for k in range(3):
            writer.append(np.full((2, 2), k, dtype=np.uint16))
            assert writer.n_flushed == k + 1
        with pytest.raises(ValueError, match="dtype"):
            writer.append(np.zeros((2, 2), dtype=np.float32))
        with pytest.raises(ValueError, match="shape"):
            writer.append(np.zeros((3, 2), dtype=np.uint16))
        assert writer.n_frames == 3
    finally:
        writer.close()
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="flush_interval_s"):
            HDF5FrameWriter(tmp_path / "b.h5", frame_shape=(2, 2), dtype=np.uint16, flush_interval_s=bad)
    assert not (tmp_path / "b.h5").exists()


def test_dark_frames_when_shutter_closed(beamline, world):
    detector = beamline.detector
    detector.stage()
    try:
        assert not beamline.shutter.is_open
        for _ in range(2):
            detector.trigger().wait(timeout=5)
    finally:
        detector.unstage()
    with h5py.File(detector.last_file_path, "r") as f:
        frames = f[DATASET_PATH][()].astype(float)
    assert frames.mean() == pytest.approx(world.xray.dark_counts, abs=0.5)
    assert frames.std() == pytest.approx(world.xray.read_noise_counts, rel=0.2)


def test_microscope_images_the_stage_position(settings, world, tmp_path):
    microscope = build_microscope(settings, world, data_dir=tmp_path / "sem")
    detector, stage = microscope.detector, microscope.stage
    assert detector.describe()[detector.image_data_key]["dtype_numpy"] == "<f4"
    x_um, y_um = 40.0, -30.0
    stage.x.set(x_um).wait(timeout=5)
    stage.y.set(y_um).wait(timeout=5)
    detector.stage()
    try:
        detector.trigger().wait(timeout=5)
    finally:
        detector.unstage()
    with h5py.File(detector.last_file_path, "r") as f:
        image = f[DATASET_PATH][0]
    assert image.dtype == np.float32
    # Ground truth: the simulator's image at the same position with (almost) no shot noise.
    quiet_model = dataclasses.replace(world.microscope, electrons_per_px=1e7)
    rng = np.random.default_rng(0)
    phantom = world.phantom()
    expected = microscope_image(phantom, quiet_model, stage_x_um=x_um, stage_y_um=y_um, rng=rng)
    elsewhere = microscope_image(phantom, quiet_model, stage_x_um=x_um + 60.0, stage_y_um=y_um, rng=rng)
    assert np.corrcoef(image.ravel(), expected.ravel())[0, 1] > 0.9
    assert np.corrcoef(image.ravel(), elsewhere.ravel())[0, 1] < 0.8


# -- heater ---------------------------------------------------------------------------------------
def _time_to_enter_band_s(model, start_K: float, target_K: float, band_K: float) -> float:
    """Analytic time for the rate-limited first-order lag to come within band_K of target_K."""
    error = abs(target_K - start_K)
    ramp_band = model.max_ramp_K_per_s * model.time_constant_s
    ramp_s = max(0.0, (error - ramp_band) / model.max_ramp_K_per_s)
    return ramp_s + model.time_constant_s * np.log(min(error, ramp_band) / band_K)


def test_heater_set_completes_only_after_settling(beamline, world):
    heater = beamline.heater
    tolerance_K, settle_s = heater.tolerance_K.get(), heater.settle_s.get()
    start_K = world.sample_temperature_K()
    t0_s = world.now_s()
    status = heater.set(400.0)
    assert not status.done
    assert status.timeout is not None
    status.wait(timeout=30)
    elapsed_s = world.now_s() - t0_s
    assert status.success
    assert heater.setpoint.get() == 400.0
    assert world.sample_temperature_K() == pytest.approx(400.0, abs=tolerance_K)
    assert heater.read()["heater"]["value"] == pytest.approx(400.0, abs=tolerance_K)
    # Sensor noise (0.05 K) can only bring a reading into the band a little early: allow 5 %.
    minimum_s = _time_to_enter_band_s(world.heater, start_K, 400.0, tolerance_K) + settle_s
    assert elapsed_s >= 0.95 * minimum_s
    # At steady state the heater supplies the losses: P = C (T - T_ambient) / tau.
    expected_W = heater.heat_capacity_J_per_K.get() * (400.0 - world.heater.ambient_K) / world.heater.time_constant_s
    assert heater.power_W.get() == pytest.approx(expected_W, rel=0.02)


def test_heater_refuses_out_of_range_setpoint(beamline, world):
    heater = beamline.heater
    before = heater.setpoint.get()
    for bad in (5000.0, 100.0, float("nan"), "hot"):
        with pytest.raises(ValueError, match="temperature_K"):
            heater.set(bad)
    assert heater.setpoint.get() == before
    assert world.heater.setpoint_K == before


def test_heater_stop_fails_the_pending_status(beamline, world):
    heater = beamline.heater
    status = heater.set(900.0)  # minutes of simulated ramp: still running when stopped
    heater.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        status.wait(timeout=5)
    assert world.heater.setpoint_K == 900.0  # the furnace keeps regulating to its setpoint


def test_detector_counts_saturated_pixels(beamline, world):
    detector, shutter = beamline.detector, beamline.shutter
    shutter.set("open").wait(timeout=5)
    beamline.stage.x.set(3000.0).wait(timeout=5)  # sample out of the beam: a flat field
    rows, cols = detector.frame_shape_px
    # Ten times the exposure that fills the uint16 range at the brightest pixel: all saturate.
    detector.exposure_s.put(10 * 65535 / world.xray.incident_photons_per_s / world.xray.flat_profile().min())
    detector.stage()
    try:
        detector.trigger().wait(timeout=5)
        assert detector.saturated_px.get() == rows * cols
        detector.exposure_s.put(1000 / world.xray.incident_photons_per_s)
        detector.trigger().wait(timeout=5)
        assert detector.saturated_px.get() == 0
    finally:
        detector.unstage()
