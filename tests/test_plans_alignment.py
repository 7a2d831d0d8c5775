"""Alignment from quick projections and ROI relocation, against the simulation's ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from bluesky import RunEngine
from scipy import ndimage

from corrflow.devices.beamline import build_beamline
from corrflow.devices.sem import build_microscope
from corrflow.plans import PlanValidationError, align_rotation_axis, relocate_roi
from corrflow.plans.alignment import axis_column_from_opposite_projections
from corrflow.plans.relocation import stage_target_um
from corrflow.processing.transforms import similarity
from corrflow.config.settings import load_settings
from corrflow.simulators import SimulatedWorld

SAMPLE = {"name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}


def test_axis_column_from_a_synthetic_pair():
    cols, c_true = 96, 50.3
    j = np.arange(cols)
    # A blob off the axis: at 0 deg at u = +12 px, at 180 deg mirrored about c.
    p0 = np.exp(-0.5 * ((j - (c_true + 12.0)) / 3.0) ** 2)[None, :].repeat(4, axis=0)
    p180 = np.exp(-0.5 * ((j - (c_true - 12.0)) / 3.0) ** 2)[None, :].repeat(4, axis=0)
    assert axis_column_from_opposite_projections(p0, p180) == pytest.approx(c_true, abs=0.05)
    with pytest.raises(ValueError, match="same"):
        axis_column_from_opposite_projections(p0, p180[:, :-1])


@pytest.fixture
def setup(tmp_path):
    settings = load_settings(data_root=tmp_path)
    world = SimulatedWorld(settings.simulation)
    return settings, world, build_beamline(settings, world), build_microscope(settings, world)


def test_alignment_finds_the_true_axis_and_centres_it(setup):
    settings, world, beamline, _ = setup
    RE = RunEngine({}, call_returns_result=True)
    docs = []
    result = RE(align_rotation_axis(beamline, exposure_s=0.2, sample=SAMPLE), lambda n, d: docs.append((n, d)))
    values = result.plan_result
    true_c = (128 - 1) / 2 + settings.simulation.rotation_axis_offset_px
    assert values["axis_column_px"] == pytest.approx(true_c, abs=0.25)
    assert abs(values["sample_offset_x_um"]) < 8.0 and abs(values["sample_offset_y_um"]) < 8.0
    recorded = next(d for n, d in docs if n == "event" and d["data"].get("alignment_axis_column_px") is not None)
    assert recorded["data"]["alignment_axis_column_px"] == values["axis_column_px"]
    # Applied: x moved by -offset * pixel; a second alignment finds the axis on the centre column.
    assert beamline.stage.x.position == pytest.approx(-values["axis_offset_px"] * 8.0)
    again = RE(align_rotation_axis(beamline, exposure_s=0.2, sample=SAMPLE, apply=False)).plan_result
    assert again["axis_column_px"] == pytest.approx(63.5, abs=0.25)


def test_roi_relocation_images_the_chosen_fiducial_at_the_image_centre(setup):
    _, world, _, microscope = setup
    fiducial = world.phantom().fiducial_centers_um()[0]
    roi = {"frame": "beamline_sample", "center_um": tuple(fiducial), "half_size_um": (20.0, 20.0, 20.0), "label": "fiducial 0"}
    docs = []
    RunEngine({})(
        relocate_roi(microscope, roi=roi, sample_from_microscope=world.sample_from_microscope.tolist(), sample=SAMPLE),
        lambda n, d: docs.append((n, d)),
    )
    start = docs[0][1]
    target = stage_target_um(world.sample_from_microscope, fiducial)
    assert microscope.stage.x.position == pytest.approx(target[0]) and microscope.stage.y.position == pytest.approx(target[1])
    assert start["references"]["roi"]["label"] == "fiducial 0"
    np.testing.assert_allclose(start["references"]["transforms"]["beamline_sample_from_microscope_stage"], world.sample_from_microscope)
    # The fiducial (brightest feature) sits at the image centre.
    import h5py

    resource = next(d for n, d in docs if n == "stream_resource")
    with h5py.File(resource["uri"].removeprefix("file://localhost"), "r") as f:
        image = f["/entry/data/data"][0]
    bright = image > np.percentile(image, 99)
    labels, n = ndimage.label(bright)
    centres = np.asarray(ndimage.center_of_mass(bright, labels, range(1, n + 1)))
    nearest = centres[np.argmin(np.hypot(centres[:, 0] - 127.5, centres[:, 1] - 127.5))]
    assert np.hypot(nearest[0] - 127.5, nearest[1] - 127.5) < 4.0  # within 12 um


def test_roi_relocation_refuses_bad_requests_before_moving(setup):
    _, world, _, microscope = setup
    transform = world.sample_from_microscope.tolist()
    far = {"frame": "beamline_sample", "center_um": (0.0, 0.0, 120.0), "half_size_um": (5.0, 5.0, 5.0)}
    with pytest.raises(PlanValidationError, match="off the sectioned plane"):
        relocate_roi(microscope, roi=far, sample_from_microscope=transform, sample=SAMPLE)
    other = {"frame": "microscope_stage", "center_um": (0.0, 0.0, 20.0), "half_size_um": (5.0, 5.0, 5.0)}
    with pytest.raises(PlanValidationError, match="maps into"):
        relocate_roi(microscope, roi=other, sample_from_microscope=transform, sample=SAMPLE)
    singular = np.zeros((4, 4)).tolist()
    with pytest.raises(PlanValidationError, match="invertible"):
        relocate_roi(microscope, roi={**far, "center_um": (0.0, 0.0, 20.0)}, sample_from_microscope=singular, sample=SAMPLE)
    # Beyond the stage: a valid request, refused by the preflight (the stage as it is when the
    # plan runs, read through the RunEngine) before anything moves.
    beyond = similarity(translation_um=(50_000.0, 0.0, 20.0))
    plan = relocate_roi(microscope, roi={**far, "center_um": (0.0, 0.0, 20.0)}, sample_from_microscope=beyond, sample=SAMPLE)
    documents = []
    with pytest.raises(PlanValidationError, match="stage limits"):
        RunEngine({})(plan, lambda name, doc: documents.append(name))
    assert "start" not in documents, "no run was opened"
    assert microscope.stage.x.position == 0.0 and microscope.stage.y.position == 0.0
