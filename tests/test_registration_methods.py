"""The registration stage's methods (``RegistrationParameters.method``) against the simulator's ground truth.

The scene is the demo's sample: the ``SimulatedWorld``'s phantom and its TRUE ``sample_from_microscope``. The
volume is a filtered back-projection (8 um voxels, 16 rows: z from -60 to +60 um) of the phantom's Beer-Lambert
line integrals with the photon noise of the default scan; the micrographs are backscatter images of the section
at z = 20 um, 160 px of 3 um centred on the stage origin. That field lies inside the sample: where a large part
of the field is the sample's round outline (the demo's 256 px micrograph), the significance of the mutual
information over misplaced copies drops below the kernels' limit and both mutual-information methods refuse
the fit (a refusal, not a wrong transform).

"Pulled out": the same section with every fiducial gone in polishing, leaving a pit (dark in backscatter where
the volume shows bright copper), so the fiducial method finds nothing to match.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from pydantic import ValidationError

from corrflow.catalog.tiled import open_catalog, plain
from corrflow.config.settings import Settings, SimulationSettings, load_settings
from corrflow.flows import register
from corrflow.flows.models import (
    ExperimentRequest,
    MicrographRun,
    RegisteredMicrograph,
    RegistrationParameters,
    ShippedVolume,
    StoredFile,
    TomographyRun,
)
from corrflow.flows.register import AUTO_ORDER, Micrograph, RejectedRegistration, register_micrograph
from corrflow.plans.requests import TomoScanRequest
from corrflow.processing.fbp import fbp_volume
from corrflow.processing.registration import RegistrationError
from corrflow.report.ground_truth import field_of_view_points, registration_error
from corrflow.simulators import MicroscopeModel, microscope_image
from corrflow.simulators.phantom import Phantom
from corrflow.simulators.world import SimulatedWorld

VOXEL_UM = 8.0
SECTION_Z_UM = 20.0  # the world's section height (where its fiducials are centred)
FIELD_PX = (160, 160)
PIXEL_UM = 3.0

# Tolerances against the truth, over a 9 x 9 grid spanning the micrograph's field: (RMS, largest) position error
# (um) and section height error (um). Fiducials and 2-D mutual information are good to a small fraction of a
# voxel in plane; slice-in-volume also fits the plane's tilt, which a section through the fiducial plane hardly
# constrains (a sphere cut a little above its equator looks like one cut as far below), so it gets most of a voxel.
TOLERANCE_UM = {
    "fiducials": (1.0, 2.0, 1.0),
    "intensity": (1.5, 3.0, 1.0),
    "slice_in_volume": (6.0, 10.0, 3.0),
}
QUALITY = {  # the quality figure each method is judged by: (name, unit)
    "fiducials": ("rms_residual", "um"),
    "intensity": ("normalized_mutual_information", "1"),
    "slice_in_volume": ("normalized_mutual_information", "1"),
}


def reconstructed_volume(world: SimulatedWorld, *, rows: int, seed: int) -> np.ndarray:
    """FBP of ``rows`` detector rows around the sample centre, with photon noise: shape (rows, cols, cols), 1/mm."""
    model, phantom = world.xray, world.phantom()
    cols = model.shape_px[1]
    angles = np.linspace(0.0, 180.0, 180, endpoint=False)
    centre = model.axis_column(x_um=0.0)
    u = (np.arange(cols) - centre) * model.pixel_size_um
    z = (np.arange(rows) - (rows - 1) / 2) * model.pixel_size_um
    sinograms = np.stack([phantom.line_integrals(angle_deg=a, u_um=u, z_um=z) for a in angles], axis=1)
    photons = model.incident_photons_per_s * TomoScanRequest().exposure_s
    counts = np.random.default_rng(seed).poisson(photons * np.exp(-sinograms))
    noisy = -np.log(np.maximum(counts, 1) / photons)
    return fbp_volume(noisy, angles, center_px=centre, filter_name="shepp-logan", pixel_size_um=model.pixel_size_um)


def write_volume(path: Path, volume: np.ndarray) -> None:
    """The reconstruction's layout (corrflow.compute.volume): /entry/data/{data, z, y, x}, centred coordinates (um)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w-") as f:
        data = f.create_group("entry").create_group("data")
        data["data"] = volume.astype(np.float32)
        for axis, n in (("z", volume.shape[0]), ("y", volume.shape[1]), ("x", volume.shape[2])):
            data[axis] = ((np.arange(n) - (n - 1) / 2) * VOXEL_UM).astype(np.float32)


def micrograph_of(world: SimulatedWorld, phantom: Phantom, *, seed: int) -> Micrograph:
    model = MicroscopeModel(shape_px=FIELD_PX, pixel_size_um=PIXEL_UM,
                            sample_from_microscope=world.sample_from_microscope, seed=world.seed)
    image = microscope_image(phantom, model, stage_x_um=0.0, stage_y_um=0.0, rng=np.random.default_rng(seed))
    return Micrograph(image=image, pixel_size_um=PIXEL_UM, stage_x_um=0.0, stage_y_um=0.0, run_uid=f"micrograph-{seed}")


def field_error(world: SimulatedWorld, micrograph: Micrograph, sample_from_microscope) -> tuple[float, float]:
    points = field_of_view_points(shape_px=micrograph.image.shape, pixel_size_um=micrograph.pixel_size_um,
                                  stage_x_um=micrograph.stage_x_um, stage_y_um=micrograph.stage_y_um)
    error = registration_error(np.asarray(sample_from_microscope), world.sample_from_microscope, field_points_um=points)
    return error.rms_um, error.max_um


@pytest.fixture(scope="module")
def world() -> SimulatedWorld:
    world = SimulatedWorld(SimulationSettings(), section_z_um=SECTION_Z_UM)
    assert world.xray.pixel_size_um == VOXEL_UM
    return world


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, world: SimulatedWorld) -> tuple[Settings, StoredFile]:
    """Settings of a fresh data root and the volume on its microscope storage."""
    settings = load_settings(data_root=tmp_path_factory.mktemp("registration-methods"))
    settings.ensure_directories()
    volume = StoredFile(site="microscope", path="volumes/sim-volume.h5")
    write_volume(volume.local_path(settings), reconstructed_volume(world, rows=16, seed=3))
    return settings, volume


@pytest.fixture(scope="module")
def micrograph(world: SimulatedWorld) -> Micrograph:
    return micrograph_of(world, world.phantom(), seed=5)


@pytest.fixture(scope="module")
def pulled_out(world: SimulatedWorld) -> Micrograph:
    phantom = world.phantom()
    pits = tuple(replace(f, kind="pore", material="pore") if f.kind == "fiducial" else f for f in phantom.features)
    return micrograph_of(world, Phantom(features=pits, temperature_K=phantom.temperature_K), seed=6)


def assert_within_limits(figure: RegisteredMicrograph.Quality) -> None:
    assert figure.lower_limit is None or figure.value >= figure.lower_limit, figure
    assert figure.upper_limit is None or figure.value <= figure.upper_limit, figure


# ---------------------------------------------------------------------------------------------- the request


def test_the_default_method_is_the_fiducials_and_bad_options_are_refused():
    assert RegistrationParameters().method == "fiducials"
    assert ExperimentRequest().registration == RegistrationParameters()
    assert RegistrationParameters(method="auto", rotation_range_deg=(-20.0, 40.0)).rotation_range_deg == (-20.0, 40.0)
    for bad in ({"method": "phase_correlation"}, {"rotation_range_deg": (40.0, -20.0)},
                {"rotation_range_deg": (float("nan"), 0.0)}, {"min_nmi": 0.9}, {"search_half_width_voxels": 0},
                {"fiducial_check_um": -1.0}):
        with pytest.raises(ValidationError):
            RegistrationParameters(**bad)


# ---------------------------------------------------------------------------------------------- each method


@pytest.mark.parametrize("method", ["fiducials", "intensity", "slice_in_volume"])
def test_each_method_recovers_the_true_transform(site, world, micrograph, method):
    settings, volume = site
    registration = register_micrograph(micrograph, volume.local_path(settings), RegistrationParameters(method=method))
    found = registration.found
    rms_um, max_um = field_error(world, micrograph, found.sample_from_microscope)
    rms_limit, max_limit, height_limit = TOLERANCE_UM[method]
    assert rms_um <= rms_limit and max_um <= max_limit, (method, rms_um, max_um)
    assert abs(found.section_z_um - SECTION_Z_UM) <= height_limit
    assert found.method == method
    assert (found.quality.name, found.quality.unit) == QUALITY[method]
    for figure in (found.quality, *found.checks):
        assert_within_limits(figure)
    # The fiducials are in view: the mutual-information methods were checked against them (within a voxel).
    check = {figure.name: figure for figure in found.checks}
    if method == "fiducials":
        assert found.rms_residual_um == found.quality.value and found.quality.upper_limit == VOXEL_UM / 2
    else:
        assert check["fiducial_rms_residual"].value == found.rms_residual_um
        assert check["fiducial_rms_residual"].upper_limit == VOXEL_UM
        assert check["nmi_significance"].unit == "sigma"
    assert found.n_matches >= 3 and found.matched_fiducials_um.shape == (found.n_matches, 2)
    assert [(a.method, a.accepted) for a in registration.attempts] == [(method, True)]


def test_auto_takes_the_fiducials_where_they_fit(site, micrograph):
    settings, volume = site
    path = volume.local_path(settings)
    auto = register_micrograph(micrograph, path, RegistrationParameters(method="auto"))
    fiducials = register_micrograph(micrograph, path, RegistrationParameters())
    assert auto.requested_method == "auto" and auto.found.method == "fiducials"
    np.testing.assert_array_equal(auto.found.sample_from_microscope, fiducials.found.sample_from_microscope)
    assert [(a.method, a.accepted) for a in auto.attempts] == [("fiducials", True)]


def test_a_fit_that_fails_its_quality_check_is_an_error(site, micrograph):
    settings, volume = site
    path = volume.local_path(settings)
    with pytest.raises(RegistrationError, match="no slice .* registers"):
        register_micrograph(micrograph, path, RegistrationParameters(max_residual_um=0.01))
    with pytest.raises(RejectedRegistration, match="intensity registration rejected") as rejected:
        register_micrograph(micrograph, path, RegistrationParameters(method="intensity", min_nmi=1.5))
    quality = rejected.value.quality
    assert quality.name == "normalized_mutual_information" and quality.lower_limit == 1.5 and quality.value < 1.5


# ---------------------------------------------------------------------------------------------- auto falls back


def test_the_pulled_out_fiducials_defeat_the_fiducial_method(site, pulled_out):
    settings, volume = site
    with pytest.raises(RegistrationError, match="no slice .* registers"):
        register_micrograph(pulled_out, volume.local_path(settings), RegistrationParameters(method="fiducials"))


def test_auto_falls_back_to_slice_in_volume_and_the_stage_records_the_attempts(site, world, pulled_out, monkeypatch):
    """Through the stage: the product and its catalog record say which method was used, its quality and what
    was tried before it (and why that was rejected)."""
    settings, volume = site
    monkeypatch.setattr(register, "load_micrograph", lambda _settings, _uid: pulled_out)
    request = ExperimentRequest(registration=RegistrationParameters(method="auto"))
    tomography = TomographyRun(run_uid="tomo-auto", instrument="sim-tomo", files=(),
                               nxtomo=StoredFile(site="beamline", path="raw/scan.nxs"))
    micrograph_run = MicrographRun(run_uid=pulled_out.run_uid, instrument="sim-sem", files=())
    shipped = ShippedVolume(file=volume, source=StoredFile(site="compute", path="volumes/sim-volume.h5"),
                            sha256="0" * 64, size_bytes=1, seconds=0.0,
                            manifest=StoredFile(site="microscope", path="volumes/manifest.json"))
    product = register.registration_stage(settings, request, tomography=tomography, volume_shipment=shipped,
                                          micrograph=micrograph_run)

    assert product.requested_method == "auto" and product.method == "slice_in_volume" == AUTO_ORDER[1]
    rms_um, max_um = field_error(world, pulled_out, product.sample_from_microscope)
    rms_limit, max_limit, height_limit = TOLERANCE_UM["slice_in_volume"]
    assert rms_um <= rms_limit and max_um <= max_limit, (rms_um, max_um)
    assert abs(product.section_z_um - SECTION_Z_UM) <= height_limit
    assert (product.quality.name, product.quality.unit) == QUALITY["slice_in_volume"]
    assert_within_limits(product.quality)
    # No fiducial is seen in the micrograph to check against: nothing is made up.
    assert product.rms_residual_um is None and product.n_matches == 0 and product.matched_fiducials_um == []
    assert "fiducial_rms_residual" not in {figure.name for figure in product.checks}
    first, used = product.attempts
    assert (first.method, first.accepted, first.quality) == ("fiducials", False, None)
    assert "no slice" in first.reason and "fiducials" in first.reason
    assert (used.method, used.accepted, used.quality) == ("slice_in_volume", True, product.quality)

    with open_catalog(settings) as catalog:
        record = plain(catalog.processed[product.catalog_key].metadata)
    assert record["kind"] == "registration" and record["parent_run_uids"] == ["tomo-auto", pulled_out.run_uid]
    fields = {name: record[name] for name in RegisteredMicrograph.model_fields if name != "catalog_key"}
    assert RegisteredMicrograph(catalog_key=product.catalog_key, **fields) == product  # the record is the product
    assert record["method"] == "slice_in_volume" and record["requested_method"] == "auto"
    assert record["quality"] == product.quality.model_dump(mode="json")
    assert [(a["method"], a["accepted"]) for a in record["attempts"]] == [("fiducials", False),
                                                                          ("slice_in_volume", True)]


def test_auto_fails_with_every_attempt_when_no_method_passes(site, pulled_out):
    """No acceptable result: a RegistrationError that names every method tried and why it was rejected."""
    settings, volume = site
    parameters = RegistrationParameters(method="auto", min_nmi=1.5, max_tilt_deg=0.0)  # no tilted retry: faster
    with pytest.raises(RejectedRegistration, match="no method registers the micrograph") as failed:
        register_micrograph(pulled_out, volume.local_path(settings), parameters)
    attempts = failed.value.attempts
    assert tuple(a.method for a in attempts) == AUTO_ORDER and not any(a.accepted for a in attempts)
    for attempt in attempts:
        assert attempt.reason and attempt.method in str(failed.value)
    for attempt in attempts[1:]:  # the mutual-information methods say which figure failed, and by how much
        assert attempt.quality is not None and attempt.quality.value < attempt.quality.lower_limit == 1.5


def test_the_summary_line_of_a_registration_without_fiducials_gives_its_own_quality_figure():
    from corrflow.flows.report import describe_registration

    assert describe_registration({"method": "fiducials", "n_matches": 7, "rms_residual_um": 0.241}) == (
        "7 fiducials, 0.24 um RMS residual"
    )
    line = describe_registration({
        "method": "slice_in_volume", "n_matches": 0, "rms_residual_um": None,
        "quality": {"name": "nmi", "value": 1.0331, "unit": ""},
    })
    assert line == "slice_in_volume: nmi 1.033 (no fiducials matched)"
