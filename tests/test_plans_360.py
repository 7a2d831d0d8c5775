"""Full-turn and offset-centre (half-acquisition) tomography, from the plan to the reconstructed volume.

The simulated beamline here has a 64-column detector of 8 um pixels (512 um field of view) and the
default sample, an 800 um wide cylinder: it does not fit. With ``rotation_range_deg=360`` and
``axis_offset_um=160`` (20 px; nominal overlap 64 - 2 * 20 = 24 px) the two half turns see a field of
``2 c + 1 = 110`` px (880 um), c the true axis column (the simulator's axis sits 3.3 px off the detector
centre, unknown to the plan: the reconstruction must find it). The yardstick is a standard half-turn
scan of the same sample on a 128-column detector, where it fits.
"""

from __future__ import annotations

import inspect

import h5py
import numpy as np
import pytest
from bluesky import RunEngine

from corrflow.report import ground_truth
from corrflow.devices.beamline import build_beamline
from corrflow.acquisition.dryrun import describe_plans, dry_run_plan
from corrflow.formats.nexus import read_nxtomo, write_nxtomo_from_documents
from corrflow.plans import (
    PlanValidationError,
    estimate_tomo_fly_scan,
    estimate_tomo_scan,
    summarize_messages,
    tomo_fly_scan,
    tomo_scan,
)
from corrflow.plans.validation import MIN_HALF_ACQUISITION_OVERLAP_PX
from corrflow.config.settings import load_settings
from corrflow.simulators import SimulatedWorld
from corrflow.compute.volume import VolumeInputError, read_provenance, reconstruct_nxtomo

SAMPLE = {"name": "wide-AlSi10Mg", "proposal": "P-2026-360", "user": "ada"}
PIXEL_UM = 8.0
NARROW_COLS, WIDE_COLS, ROWS = 64, 128, 8
AXIS_OFFSET_UM = 160.0
EXPOSURE_S = 0.25  # 5e4 flat photons per pixel, below the uint16 ceiling with the gain pattern
SAMPLE_DIAMETER_UM = 800.0  # simulators.phantom.make_phantom's default


def _beamline(root, cols):
    settings = load_settings(data_root=root, simulation={"xray_detector_shape_px": (ROWS, cols)})
    world = SimulatedWorld(settings.simulation)
    return build_beamline(settings, world), world, settings


def _run(plan):
    docs: list[tuple[str, dict]] = []
    RunEngine({})(plan, lambda name, doc: docs.append((name, doc)))
    return docs


def _reconstruct(docs, world, root, name, **kwargs):
    nxtomo = write_nxtomo_from_documents(root / f"{name}.nxs", docs)
    product = reconstruct_nxtomo(nxtomo, root / f"{name}_volume.nxs", **kwargs)
    with h5py.File(product.path, "r") as f:
        volume = f["/entry/data/data"][()]
    truth = ground_truth.phantom_on_volume_grid(world.phantom(), shape_zyx=volume.shape, voxel_size_um=product.voxel_size_um)
    return nxtomo, product, ground_truth.reconstruction_error(volume, truth), truth


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A standard scan that fits, an offset-centre step scan and fly scan that need the full turn."""
    root = tmp_path_factory.mktemp("scans360")
    out = {"root": root}
    beamline, world, _ = _beamline(root / "standard", WIDE_COLS)
    docs = _run(tomo_scan(beamline, num_projections=200, exposure_s=EXPOSURE_S, num_darks=3, num_flats=5, sample=SAMPLE))
    out["standard"] = (docs, world, *_reconstruct(docs, world, root, "standard"))
    beamline, world, _ = _beamline(root / "half", NARROW_COLS)
    docs = _run(tomo_scan(beamline, num_projections=400, exposure_s=EXPOSURE_S, num_darks=3, num_flats=5, sample=SAMPLE,
                          rotation_range_deg=360, axis_offset_um=AXIS_OFFSET_UM))
    out["half"] = (docs, world, *_reconstruct(docs, world, root, "half"))
    out["half_beamline"] = beamline
    beamline, world, _ = _beamline(root / "fly", NARROW_COLS)
    docs = _run(tomo_fly_scan(beamline, num_projections=400, exposure_s=EXPOSURE_S, num_darks=3, num_flats=5, sample=SAMPLE,
                              start_deg=-180.0, rotation_range_deg=360, axis_offset_um=AXIS_OFFSET_UM))
    out["fly"] = (docs, world, *_reconstruct(docs, world, root, "fly"))
    out["fly_beamline"] = beamline
    return out


# -- end to end: a sample wider than the detector ----------------------------------------------------
@pytest.mark.parametrize("kind", ["half", "fly"])
def test_offset_centre_scan_reconstructs_a_sample_wider_than_the_detector(scans, kind):
    """Measured: nrmse 0.408 (offset centre, step and fly scans) vs 0.414 (standard scan on a detector
    twice as wide; both dominated by the Cu fiducials' edges and photon noise), matrix noise 0.157 vs
    0.162 1/mm, axis found within 0.006 px of the truth. Bound: nrmse and noise within 15 % of the
    standard scan's, axis within 0.5 px, matrix bias below 2 %."""
    _, world, _, product, error, truth = scans[kind]
    _, _, _, standard, standard_error, _ = scans["standard"]
    assert NARROW_COLS * PIXEL_UM < SAMPLE_DIAMETER_UM < product.shape_zyx[2] * PIXEL_UM
    # The whole sample lies inside the widened volume: nothing of it is cut off by the grid.
    wider = ground_truth.phantom_on_volume_grid(world.phantom(), shape_zyx=(ROWS, 128, 128), voxel_size_um=PIXEL_UM)
    assert truth.sum() == pytest.approx(wider.sum(), rel=1e-6)
    assert product.acquisition == "360-half" and standard.acquisition == "180"
    true_axis = world.xray.axis_column(x_um=AXIS_OFFSET_UM)
    assert abs(product.center_px - true_axis) <= 0.5
    assert product.shape_zyx == (ROWS, int(np.floor(2 * product.center_px)) + 1, int(np.floor(2 * product.center_px)) + 1)
    assert error.nrmse <= 1.15 * standard_error.nrmse, (error, standard_error)
    assert abs(error.matrix_mean_error_pct) < 2.0
    assert error.matrix_noise_per_mm <= 1.15 * standard_error.matrix_noise_per_mm


def test_reconstruction_provenance_says_what_was_done(scans):
    _, _, _, product, _, _ = scans["half"]
    parameters = read_provenance(product.path)["parameters"]
    assert parameters["acquisition"] == "360-half"
    assert parameters["scan_range_deg"] == pytest.approx(360.0)
    assert parameters["axis_offset_um"] == AXIS_OFFSET_UM
    assert parameters["detector_cols"] == NARROW_COLS and parameters["volume_width_px"] == product.shape_zyx[2]
    assert parameters["n_projections"] == 400 and parameters["n_projections_reconstructed"] == 200
    assert parameters["axis_side"] == "right" and parameters["center_px"] == product.center_px
    assert parameters["overlap_px"] == pytest.approx(NARROW_COLS - (2 * product.center_px - (NARROW_COLS - 1)))
    assert parameters["axis_correlation"] > 0.9
    assert "360 deg offset-centre -> 180 deg" in parameters["conversion"]


def test_half_acquisition_can_be_forced_off_or_refused(scans):
    root = scans["root"]
    nxtomo, _, _, _ = scans["half"][2:6]
    # Treated as a plain (centred) full turn, the axis near the edge cannot even be centred on the grid.
    plain = reconstruct_nxtomo(nxtomo, root / "half_as_plain.nxs", half_acquisition=False, center_px=55.0)
    assert plain.acquisition == "360" and plain.shape_zyx == (ROWS, NARROW_COLS, NARROW_COLS)
    standard_nxtomo = scans["standard"][2]
    with pytest.raises(VolumeInputError, match="full turn"):
        reconstruct_nxtomo(standard_nxtomo, root / "standard_as_half.nxs", half_acquisition=True)
    assert not (root / "standard_as_half.nxs").exists()


def test_offset_centre_is_recognised_from_what_a_foreign_file_keeps(scans):
    """Without the NeXus fields: from corrflow's settings; without either: only when told, and then the
    axis is searched on both sides of the detector."""
    import shutil

    root = scans["root"]
    nxtomo, half = scans["half"][2], scans["half"][3]
    stripped = root / "stripped.nxs"
    shutil.copy(nxtomo, stripped)
    with h5py.File(stripped, "r+") as f:
        del f["/entry/sample/rotation_axis_offset"], f["/entry/instrument/detector/field_of_view"]
    from_settings = reconstruct_nxtomo(stripped, root / "stripped_volume.nxs")
    assert from_settings.acquisition == "360-half" and from_settings.center_px == pytest.approx(half.center_px, abs=1e-6)
    with h5py.File(stripped, "r+") as f:
        del f["/entry/corrflow_metadata/settings"]
    assert reconstruct_nxtomo(stripped, root / "bare_volume.nxs").acquisition == "360"
    told = reconstruct_nxtomo(stripped, root / "told_volume.nxs", half_acquisition=True)
    assert told.acquisition == "360-half" and told.center_px == pytest.approx(half.center_px, abs=0.05)
    assert read_provenance(told.path)["parameters"]["axis_offset_um"] is None


# -- documents and NXtomo --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["half", "fly"])
def test_metadata_and_nxtomo_record_the_range_and_the_axis_offset(scans, kind):
    docs, _, nxtomo, _, _, _ = scans[kind]
    start = docs[0][1]
    parameters, units = start["settings"]["parameters"], start["settings"]["units"]
    assert parameters["rotation_range_deg"] == 360.0
    assert parameters["axis_offset_um"] == AXIS_OFFSET_UM
    assert parameters["field_of_view"] == "half"
    assert parameters["nominal_overlap_px"] == pytest.approx(NARROW_COLS - 2 * AXIS_OFFSET_UM / PIXEL_UM)
    assert units["rotation_range_deg"] == "deg" and units["axis_offset_um"] == "um" and set(units) == set(parameters)
    assert start["plan_args"]["axis_offset_um"] == AXIS_OFFSET_UM
    (transform,) = start["references"]["transforms"].values()
    assert np.asarray(transform)[0, 3] == pytest.approx(AXIS_OFFSET_UM)  # the geometry of the first projection
    data = read_nxtomo(nxtomo)
    projections = data.image_key == 0
    np.testing.assert_allclose(data.x_translation_um[projections], AXIS_OFFSET_UM)
    np.testing.assert_allclose(data.x_translation_um[data.image_key == 2], 0.0)  # darks at the centred x
    np.testing.assert_allclose(data.x_translation_um[data.image_key == 1], 1.5 * NARROW_COLS * PIXEL_UM)
    angles = data.projection_angles_deg
    assert angles.max() - angles.min() == pytest.approx(360.0 * 399 / 400, abs=0.01)
    assert data.axis_offset_um == AXIS_OFFSET_UM and data.half_acquisition
    with h5py.File(nxtomo, "r") as f:
        assert f["/entry/instrument/detector/field_of_view"][()].decode() == "Half"
        assert f["/entry/sample/rotation_axis_offset"].attrs["units"] == "um"


@pytest.mark.parametrize("kind", ["half", "fly"])
def test_stage_is_back_at_its_centred_start_after_an_offset_centre_scan(scans, kind):
    stage, shutter = scans[f"{kind}_beamline"].stage, scans[f"{kind}_beamline"].shutter
    assert stage.x.position == pytest.approx(0.0) and stage.rotation.position == pytest.approx(0.0)
    assert shutter.state.get() == "closed"


# -- validation before anything moves --------------------------------------------------------------------
GOOD = dict(num_projections=40, exposure_s=0.1, num_darks=2, num_flats=2, sample=SAMPLE)
LARGEST_OFFSET_UM = (NARROW_COLS - MIN_HALF_ACQUISITION_OVERLAP_PX) / 2 * PIXEL_UM  # 192 um


@pytest.fixture
def narrow(tmp_path):
    return _beamline(tmp_path, NARROW_COLS)[0]


@pytest.mark.parametrize("plan", [tomo_scan, tomo_fly_scan, estimate_tomo_scan, estimate_tomo_fly_scan])
@pytest.mark.parametrize(
    ("x_um", "changes", "words"),
    [
        pytest.param(0.0, {"axis_offset_um": 100.0}, ["axis_offset_um", "full turn"], id="offset-without-360"),
        pytest.param(4900.0, {"axis_offset_um": 160.0, "rotation_range_deg": 360, "flat_offset_x_um": -800.0},
                     ["axis_offset_um", "outside its limits [-5000.0, 5000.0]"], id="offset-beyond-x-limit"),
        pytest.param(0.0, {"axis_offset_um": -(LARGEST_OFFSET_UM + 8.0), "rotation_range_deg": 360},
                     ["14.0 px seen by both half turns", "at least 16 px", "<= 192 um"], id="overlap-too-small"),
        pytest.param(0.0, {"axis_offset_um": 160.0, "rotation_range_deg": 360, "flat_offset_x_um": 600.0},
                     ["flat_offset_x_um", "widened"], id="flats-inside-the-widened-field"),
        pytest.param(0.0, {"rotation_range_deg": 270}, ["rotation_range_deg: Input should be 180.0 or 360.0"], id="range-270"),
        pytest.param(0.0, {"axis_offset_um": "160"}, ["axis_offset_um: Input should be a valid number"], id="offset-text"),
    ],
)
def test_bad_full_turn_or_offset_is_refused_before_any_motion(narrow, plan, x_um, changes, words):
    stage = narrow.stage
    stage.x.set(x_um).wait(timeout=5)
    before = {axis.name: axis.position for axis in (stage.x, stage.y, stage.z, stage.rotation)}
    kwargs = {**GOOD, **changes}
    if plan in (tomo_fly_scan, estimate_tomo_fly_scan) and kwargs.get("rotation_range_deg") == 360 and "stop_deg" not in kwargs:
        kwargs["start_deg"] = -180.0  # the fly path with run-up must fit the +-360 deg rotation
    with pytest.raises(PlanValidationError) as info:
        # A bad request is refused when the plan is called; one the beamline cannot do, by the
        # preflight reads that are the plan's first messages (walked here without a RunEngine).
        result = plan(narrow, **kwargs)
        if inspect.isgenerator(result):
            summarize_messages(result)
    for word in words:
        assert word in str(info.value)
    assert {axis.name: axis.position for axis in (stage.x, stage.y, stage.z, stage.rotation)} == before
    assert narrow.shutter.state.get() == "closed"
    assert not narrow.data_dir.exists() or not any(narrow.data_dir.iterdir())


def test_largest_offset_leaves_the_minimum_overlap_and_is_accepted(narrow):
    for offset in (LARGEST_OFFSET_UM, -LARGEST_OFFSET_UM):
        summary = summarize_messages(tomo_scan(narrow, **GOOD, rotation_range_deg=360, axis_offset_um=offset))
        assert summary["events"] == {"dark": 2, "flat": 2, "primary": 40}
    # Equivalent ways of asking for a full turn.
    for range_deg in (360, 360.0):
        assert summarize_messages(tomo_scan(narrow, **GOOD, axis_offset_um=100.0, rotation_range_deg=range_deg))["runs"] == 1


# -- estimates and the dry run -----------------------------------------------------------------------------
def test_estimate_of_a_full_turn_counts_twice_the_projections_and_the_offset_move(narrow):
    n = 20
    half_turn = estimate_tomo_scan(narrow, **{**GOOD, "num_projections": n})
    full_turn = estimate_tomo_scan(narrow, **{**GOOD, "num_projections": 2 * n}, rotation_range_deg=360, axis_offset_um=-160.0)
    stage = narrow.stage
    rotation_v, x_v = stage.rotation.velocity.get(), stage.x.velocity.get()
    assert full_turn.n_frames == half_turn.n_frames + n
    assert full_turn.data_bytes == half_turn.data_bytes + n * ROWS * NARROW_COLS * 2
    # n more exposures, 180 deg more sweep out and back, and x: flats (+768 um), then -160 um, then 0.
    extra_s = n * GOOD["exposure_s"] + 2 * 180.0 / rotation_v + 2 * 160.0 / x_v
    assert full_turn.duration_s == pytest.approx(half_turn.duration_s + extra_s)
    fly_half = estimate_tomo_fly_scan(narrow, **{**GOOD, "num_projections": n}, start_deg=-180.0)
    fly_full = estimate_tomo_fly_scan(narrow, **{**GOOD, "num_projections": 2 * n}, start_deg=-180.0, rotation_range_deg=360)
    assert fly_full.n_frames == fly_half.n_frames + n
    assert fly_full.duration_s > fly_half.duration_s + n * GOOD["exposure_s"]


def test_dry_run_and_plan_listing_show_the_full_turn_options(tmp_path):
    settings = load_settings(data_root=tmp_path)  # default detector: 128 columns of 8 um
    raw = {"num_projections": "16", "exposure_s": "0.01", "num_darks": "1", "num_flats": "1",
           "rotation_range_deg": "360", "axis_offset_um": "160"}
    report = dry_run_plan(settings, "tomo_scan", raw)
    assert report["parameters"]["rotation_range_deg"] == 360.0 and report["parameters"]["axis_offset_um"] == 160.0
    assert report["estimate"]["n_frames"] == 18 and report["messages"]["events"]["primary"] == 16
    assert report["run"]["exit_status"] == "success"
    half = dry_run_plan(settings, "tomo_scan", {**raw, "num_projections": "8", "rotation_range_deg": "180", "axis_offset_um": "0"})
    # Twice the projections over the full turn: 8 more exposures, and the extra half-turn sweep and return.
    assert report["estimate"]["duration_s"] == pytest.approx(half["estimate"]["duration_s"] + 8 * 0.01 + 2 * 180.0 / 90.0)
    listing = describe_plans()
    for plan in ("tomo_scan", "tomo_fly_scan"):
        assert listing[plan]["parameters"]["rotation_range_deg"] == "Literal[180.0, 360.0] = 180.0"
        assert listing[plan]["parameters"]["axis_offset_um"] == "float = 0.0"
        assert "Offset centre" in listing[plan]["descriptions"]["axis_offset_um"]
        assert "360" in listing[plan]["descriptions"]["rotation_range_deg"]
