"""The EPICS device classes against the caproto IOCs of the simulated facility, over Channel Access.

Everything runs on 127.0.0.1 (see tests/epics_fixtures.py); the IOCs count the
client writes they receive, which is how "nothing was written" is checked.
"""

from __future__ import annotations

import time

import epics
import h5py
import numpy as np
import pytest
from ophyd.utils import LimitError

from corrflow.devices.beamline import build_beamline
from corrflow.devices.epics_detector import EpicsXrayDetector
from corrflow.devices.epics_heater import EpicsHeater
from corrflow.devices.epics_source import BeamMonitor, EpicsShutter
from corrflow.devices.epics_stage import EpicsMicroscopeStage, EpicsSampleStage
from corrflow.devices.sem import build_microscope
from corrflow.config.settings import SimulationSettings
from corrflow.simulators import xray_transmission
from corrflow.simulators.world import SimulatedWorld

pytest_plugins = ["epics_fixtures"]


@pytest.fixture
def beamline(epics_settings):
    beamline = build_beamline(epics_settings)
    yield beamline
    # Leave the shared facility as found: stage home, shutter closed.
    statuses = [beamline.stage.x.set(0.0), beamline.stage.rotation.set(0.0), beamline.shutter.set("closed")]
    for status in statuses:
        status.wait(10)


def test_factories_build_the_epics_classes_from_one_setting(beamline, epics_settings, sim_facility):
    assert beamline.mode == "epics"
    assert isinstance(beamline.stage, EpicsSampleStage)
    assert isinstance(beamline.detector, EpicsXrayDetector)
    assert isinstance(beamline.heater, EpicsHeater)
    assert isinstance(beamline.shutter, EpicsShutter)
    assert isinstance(beamline.beam, BeamMonitor)
    assert beamline.detector.prefix == f"{sim_facility.beamline_prefix}det:"
    # The IOC reports the detector geometry of the simulation settings it was started with.
    simulation = SimulationSettings()
    assert beamline.detector.frame_shape_px == tuple(simulation.xray_detector_shape_px)
    assert beamline.detector.pixel_size_um.get() == pytest.approx(simulation.xray_pixel_size_um)
    assert beamline.detector.frame_dtype == np.dtype(np.uint16)
    assert beamline.stage.rotation.limits == (-360.0, 360.0)
    assert beamline.stage.x.egu == "um"
    microscope = build_microscope(epics_settings)
    assert isinstance(microscope.stage, EpicsMicroscopeStage)
    assert microscope.detector.frame_shape_px == tuple(simulation.microscope_image_shape_px)
    assert microscope.detector.frame_dtype == np.dtype(np.float32)


def test_building_against_missing_iocs_fails_naming_the_pvs(epics_settings, tmp_path):
    settings = epics_settings.model_copy(
        update={"beamline": epics_settings.beamline.model_copy(update={"epics_prefix": "CFNOSUCHIOC:"})}
    )
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"CFNOSUCHIOC:stage:x"):
        build_beamline(settings, connection_timeout_s=0.5)
    assert time.monotonic() - started < 10


def test_motor_moves_at_its_velocity_and_reports_intermediate_positions(beamline):
    x = beamline.stage.x
    velocity = x.velocity.get()
    seen = []
    x.user_readback.subscribe(lambda value=None, **kwargs: seen.append(value), run=False)
    start = time.monotonic()
    status = x.set(2000.0)
    assert not status.done  # set() returns at once
    status.wait(10)
    elapsed = time.monotonic() - start
    assert x.position == pytest.approx(2000.0)
    assert elapsed >= 0.8 * 2000.0 / velocity
    assert any(0.0 < value < 2000.0 for value in seen)
    assert status.timeout is not None  # every status has a timeout


def test_motor_refuses_targets_outside_the_soft_limits_without_writing(beamline, sim_facility):
    before = sim_facility.put_counts(["stage"])
    for target in (6000.0, -5000.5, float("nan"), "far"):
        with pytest.raises(ValueError):  # LimitError is a ValueError
            beamline.stage.x.set(target)
    assert sim_facility.put_counts(["stage"]) == before
    with pytest.raises(LimitError):
        beamline.stage.rotation.set(400.0)


def test_soft_limits_follow_the_record_fields(beamline):
    z = beamline.stage.z
    z.high_limit_travel.set(100.0).wait(5)
    try:
        deadline = time.monotonic() + 5
        while z.limits[1] != 100.0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert z.limits == (-2000.0, 100.0)
        with pytest.raises(LimitError):
            z.set(150.0)
    finally:
        z.high_limit_travel.set(2000.0).wait(5)


def test_motor_stop_halts_between_start_and_target_and_fails_the_move(beamline):
    x = beamline.stage.x
    x.velocity.set(1000.0).wait(5)
    try:
        status = x.set(4000.0)
        time.sleep(0.5)
        x.stop()
        with pytest.raises(Exception):  # noqa: B017 - ophyd raises its own status failure types
            status.wait(5)
        time.sleep(0.2)
        assert 0.0 < x.position < 4000.0
        assert x.motor_done_move.get() == 1
        assert x.user_setpoint.get() == pytest.approx(x.position, abs=1e-6)
    finally:
        x.velocity.set(1000.0 * 20).wait(5)


def test_a_move_started_right_after_a_stopped_one_is_not_finished_by_the_stopped_ones_end(beamline, sim_facility):
    """ophyd's EpicsMotor takes the ``.DMOV`` 0 -> 1 of a stop for the end of whatever move is
    pending: a move started during the stop would report success at once, wherever the motor is.
    The rotation stalls here, so the second move cannot finish until the stall is lifted."""
    rotation = beamline.stage.rotation
    stall_pv = f"{sim_facility.prefix_of('stage')}rot:sim:Stall"
    start = rotation.position
    epics.caput(stall_pv, 1, wait=True, timeout=10)
    try:
        first = rotation.set(start + 5.0)
        time.sleep(0.3)
        rotation.stop()
        second = rotation.set(start + 6.0)
        time.sleep(1.0)
        assert not second.done, "the stopped move's end was taken for the second move's"
        with pytest.raises(Exception):  # noqa: B017 - ophyd raises its own status failure types
            first.wait(5)
    finally:
        epics.caput(stall_pv, 0, wait=True, timeout=10)
    second.wait(15)
    assert rotation.position == pytest.approx(start + 6.0, abs=1e-3)
    rotation.set(start).wait(15)


def test_shutter_opens_and_closes(beamline):
    shutter = beamline.shutter
    shutter.set("open").wait(5)
    assert shutter.is_open and shutter.read()["shutter"]["value"] == "open"
    shutter.set("closed").wait(5)
    assert not shutter.is_open
    with pytest.raises(ValueError, match="open"):
        shutter.set("half")


def _frames(path):
    with h5py.File(path, "r", swmr=True) as f:
        return f["/entry/data/data"][()], {k: v[()] for k, v in f["/entry/instrument/NDAttributes"].items()}


def test_detector_writes_frames_of_the_sample_at_the_stage_angle(beamline):
    stage, detector, shutter = beamline.stage, beamline.detector, beamline.shutter
    detector.exposure_s.set(0.05).wait(5)
    shutter.set("open").wait(5)
    angles = (0.0, 60.0, 135.0)
    detector.stage()
    try:
        documents = []
        for angle in angles:
            stage.rotation.set(angle).wait(10)
            detector.trigger().wait(15)
            documents.extend(detector.collect_asset_docs())
        path = detector.last_file_path
    finally:
        detector.unstage()
    # The image, and the angle and ring current the IOC wrote with each frame: one resource each,
    # then one datum each per frame.
    resources = [doc for name, doc in documents if name == "stream_resource"]
    assert [r["data_key"] for r in resources] == ["xray_detector_image", "xray_detector_rotation_angle", "xray_detector_ring_current"]
    assert [name for name, _ in documents] == ["stream_resource"] * 3 + ["stream_datum"] * 9
    resource = resources[0]
    assert resource["uri"] == f"file://localhost{path}"
    assert resource["parameters"]["dataset"] == "/entry/data/data"
    image_datums = [doc for name, doc in documents if name == "stream_datum" and doc["stream_resource"] == resource["uid"]]
    assert [doc["indices"] for doc in image_datums] == [{"start": k, "stop": k + 1} for k in range(3)]

    frames, attributes = _frames(path)
    assert frames.shape == (3, *detector.frame_shape_px) and frames.dtype == np.uint16
    np.testing.assert_allclose(attributes["RotationAngle"], angles, atol=1e-6)
    assert np.all(attributes["ShutterOpen"] == 1)
    # Physics: the frames are Beer-Lambert projections of the phantom at those angles.
    world = SimulatedWorld(SimulationSettings())
    model = world.xray
    flat = model.incident_photons_per_s * 0.05 * model.flat_profile()
    for frame, angle in zip(frames, angles, strict=True):
        expected = xray_transmission(world.phantom(), model, angle_deg=angle, x_um=0.0, y_um=0.0, z_um=0.0)
        measured = (frame - model.dark_counts) / flat
        noise = np.sqrt(flat * expected) / flat  # Poisson standard deviation of the ratio
        assert np.median(np.abs(measured - expected) / noise) < 1.5
        assert expected.min() < 0.9  # the sample is in the beam: the comparison is not trivial


def test_detector_announces_only_frames_it_has_flushed(beamline):
    """The plugin flushes on a timer; announcing frames first puts FlushNow, so readers see them."""
    from ophyd import EpicsSignal

    detector = beamline.detector
    interval = EpicsSignal(f"{detector.prefix}HDF1:FlushInterval", name="flush_interval")
    interval.wait_for_connection(timeout=5)
    previous = interval.get()
    interval.put(1e6, wait=True)  # no timed flush during this test
    detector.exposure_s.set(0.01).wait(5)
    detector.stage()
    try:
        for _ in range(2):
            detector.trigger().wait(15)
        path = detector.last_file_path
        with h5py.File(path, "r", swmr=True) as reader:
            data = reader["/entry/data/data"]
            assert data.shape[0] == 0  # written, not yet flushed
            documents = [doc for _, doc in detector.collect_asset_docs()]
            data.refresh()
            assert documents[-1]["indices"] == {"start": 1, "stop": 2}
            assert data.shape[0] == 2  # everything announced is readable
    finally:
        detector.unstage()
        interval.put(previous, wait=True)


def test_detector_needs_staging_and_never_overwrites(beamline):
    detector = beamline.detector
    with pytest.raises(RuntimeError, match="stage"):
        detector.trigger()
    detector.stage()
    first = detector.last_file_path
    detector.unstage()
    detector.stage()
    try:
        assert detector.last_file_path != first and first.exists()
    finally:
        detector.unstage()


def test_dark_frames_with_the_shutter_closed(beamline):
    detector = beamline.detector
    beamline.shutter.set("closed").wait(5)
    detector.exposure_s.set(0.02).wait(5)
    detector.stage()
    try:
        detector.trigger().wait(15)
        path = detector.last_file_path
    finally:
        detector.unstage()
    frames, attributes = _frames(path)
    assert attributes["ShutterOpen"][0] == 0
    assert abs(frames[0].mean() - SimulatedWorld(SimulationSettings()).xray.dark_counts) < 5


def test_heater_set_completes_only_after_the_readback_settles(beamline):
    heater = beamline.heater
    heater.tolerance_K.set(1.0).wait(1)
    heater.settle_s.set(0.5).wait(1)
    start = heater.readback.get()
    target = 350.0
    begun = time.monotonic()
    status = heater.set(target)
    readings = []
    while not status.done and time.monotonic() - begun < 30:
        readings.append(heater.readback.get())
        time.sleep(0.05)
    status.wait(1)
    assert abs(heater.readback.get() - target) < 1.0
    # It ramped through intermediate temperatures and waited at least the settle time.
    assert any(start + 5 < value < target - 5 for value in readings)
    assert time.monotonic() - begun >= 0.5
    heater.set(293.15).wait(30)


def test_heater_refuses_out_of_range_setpoints_without_writing(beamline, sim_facility):
    before = sim_facility.put_counts(["heater"])
    low, high = beamline.heater.limits
    assert (low, high) == pytest.approx((243.15, 1273.0))
    for bad in (high + 1.0, low - 1.0, float("inf"), None):
        with pytest.raises(ValueError):
            beamline.heater.set(bad)
    assert sim_facility.put_counts(["heater"]) == before


def test_beam_current_drops_and_is_restored(beamline, sim_facility):
    import epics

    current = beamline.beam.current_mA
    assert current.get() == pytest.approx(200.0, rel=1e-2)
    epics.caput(f"{sim_facility.prefix_of('source')}sim:DumpFor", 0.5, wait=True)
    deadline = time.monotonic() + 2
    while current.get() > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert current.get() == 0.0
    time.sleep(1.0)
    assert current.get() == pytest.approx(200.0, rel=1e-2)
