"""Physics of the simulators, checked against closed forms and independent numerical ground truth."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.fft

from corrflow.processing.transforms import apply, decompose_similarity, invert
from corrflow.config.settings import SimulationSettings
from corrflow.simulators import (
    MATERIAL_CODES,
    MATERIALS,
    Feature,
    HeaterModel,
    MicroscopeModel,
    Phantom,
    SimulatedWorld,
    XrayDetectorModel,
    make_phantom,
    microscope_image,
    xray_frame,
    xray_transmission,
)


def _single(feature: Feature) -> Phantom:
    return Phantom(features=(feature,), temperature_K=293.15)


def _ray_march(feature: Feature, *, angle_deg: float, u_um: float, z_um: float, step_um: float = 0.02) -> float:
    """Chord length by dense sampling along the contract's ray (independent of the analytic code)."""
    theta = math.radians(angle_deg)
    t = np.arange(-400.0, 400.0, step_um) + step_um / 2
    x = u_um * math.cos(theta) + t * math.sin(theta)
    y = -u_um * math.sin(theta) + t * math.cos(theta)
    pts = np.stack([x, y, np.full_like(t, z_um)], axis=-1)
    return float(feature.contains(pts).sum() * step_um)


# -- phantom: analytic line integrals ----------------------------------------------------------------
def test_sphere_line_integral_matches_closed_form():
    radius, center = 60.0, (25.0, -40.0, 10.0)
    phantom = _single(Feature("fiducial", "fiducial", center, (radius,) * 3))
    mu = MATERIALS["fiducial"].mu_per_mm
    u = np.linspace(-150, 150, 301)
    z = np.linspace(-70, 90, 33)
    for angle in (0.0, 37.0, 90.0, 211.0):
        theta = math.radians(angle)
        u0 = center[0] * math.cos(theta) - center[1] * math.sin(theta)
        r2 = radius**2 - (u[None, :] - u0) ** 2 - (z[:, None] - center[2]) ** 2
        expected = mu * 1e-3 * 2 * np.sqrt(np.maximum(r2, 0))
        got = phantom.line_integrals(angle_deg=angle, u_um=u, z_um=z)
        assert got.shape == (z.size, u.size) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_vertical_cylinder_line_integral_matches_closed_form():
    radius, half_h, center = 80.0, 30.0, (-10.0, 20.0, 5.0)
    phantom = _single(Feature("precipitate", "precipitate", center, (radius, radius, half_h), shape="cylinder"))
    mu = MATERIALS["precipitate"].mu_per_mm
    u = np.linspace(-120, 120, 97)
    z = np.array([-40.0, -24.9, 0.0, 34.9, 35.1, 50.0])
    theta = math.radians(63.0)
    u0 = center[0] * math.cos(theta) - center[1] * math.sin(theta)
    in_height = np.abs(z - center[2]) <= half_h
    expected = mu * 1e-3 * 2 * np.sqrt(np.maximum(radius**2 - (u[None, :] - u0) ** 2, 0)) * in_height[:, None]
    got = phantom.line_integrals(angle_deg=63.0, u_um=u, z_um=z)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", ["ellipsoid", "cylinder"])
def test_rotated_feature_chords_match_ray_marching(shape):
    feature = Feature("precipitate", "precipitate", (30.0, -15.0, 4.0), (50.0, 12.0, 20.0), 33.0, shape)
    phantom = _single(feature)
    mu_mm = MATERIALS["precipitate"].mu_per_mm * 1e-3
    for angle, u, z in [(0.0, 30.0, 4.0), (20.0, 10.0, 12.0), (101.0, -5.0, -10.0), (250.0, -30.0, 0.0)]:
        analytic = float(phantom.line_integrals(angle_deg=angle, u_um=[u], z_um=[z])[0, 0]) / mu_mm
        marched = _ray_march(feature, angle_deg=angle, u_um=u, z_um=z)
        assert marched > 5.0  # the test rays do cross the feature
        assert analytic == pytest.approx(marched, abs=0.05)


def test_line_integrals_agree_with_voxel_sums():
    phantom = make_phantom(temperature_K=800.0, section_z_um=0.0)
    voxel, n = 2.0, 420
    slice_ = phantom.voxelize(shape_zyx=(1, n, n), voxel_size_um=voxel, z_offset_um=0.0, supersample=2)[0]
    coords = (np.arange(n) - (n - 1) / 2) * voxel
    # At 0 deg rays run along +y (sum over iy, u = x); at 90 deg along +x with u = -y.
    for angle, voxel_sum, u in [(0.0, slice_.sum(axis=0), coords), (90.0, slice_.sum(axis=1), -coords)]:
        numeric = voxel_sum * voxel * 1e-3
        analytic = phantom.line_integrals(angle_deg=angle, u_um=u, z_um=[0.0])[0]
        # Total (area integral of mu) agrees to discretisation error; each ray to within a few voxels' worth.
        assert analytic.sum() == pytest.approx(numeric.sum(), rel=2e-3)
        assert np.mean(np.abs(analytic - numeric)) < 0.01 * analytic.mean()
        assert np.median(np.abs(analytic - numeric)) < 2e-3


def test_voxelize_and_points_match_materials():
    phantom = make_phantom(temperature_K=700.0)
    fid = phantom.features_of_kind("fiducial")[0]
    pore = phantom.features_of_kind("pore")[0]
    pts = np.array([fid.center_um, pore.center_um, (0.0, 0.0, 500.0), (395.0, 0.0, 0.0)])
    assert not any(f.contains(pts[3]) for f in phantom.features if f.kind != "matrix")
    codes = phantom.material_at(pts)
    assert [MATERIAL_CODES[c] for c in codes] == ["fiducial", "pore", "vacuum", "matrix"]
    mu = phantom.attenuation_at(pts)
    assert mu[0] == pytest.approx(MATERIALS["fiducial"].mu_per_mm)
    assert mu[1] == pytest.approx(0.0, abs=1e-6)
    assert mu[2] == 0.0
    vol = phantom.voxelize(shape_zyx=(3, 8, 8), voxel_size_um=4.0, z_offset_um=fid.center_um[2])
    assert vol.dtype == np.float32 and vol.shape == (3, 8, 8)


# -- phantom: temperature, layout -------------------------------------------------------------------
def test_pores_grow_and_phase_appears_only_above_threshold():
    def pore_volume(t):
        return sum(math.prod(f.semi_axes_um) for f in make_phantom(temperature_K=t).features_of_kind("pore"))

    assert pore_volume(293.15) == pytest.approx(pore_volume(400.0))
    assert pore_volume(400.0) < pore_volume(500.0) < pore_volume(700.0) < pore_volume(900.0)
    assert pore_volume(900.0) == pytest.approx(8.0 * pore_volume(293.15))  # radius doubles by 900 K
    assert make_phantom(temperature_K=293.15).features_of_kind("phase") == ()
    assert make_phantom(temperature_K=550.0).features_of_kind("phase") == ()
    radii = [
        max(f.semi_axes_um[0] for f in make_phantom(temperature_K=t).features_of_kind("phase")) for t in (560, 700, 900)
    ]
    assert 0 < radii[0] < radii[1] < radii[2]


@pytest.mark.parametrize("seed", [7, 11])
def test_inclusions_disjoint_and_inside_matrix_at_900K(seed):
    phantom = make_phantom(seed=seed, temperature_K=900.0)
    (matrix,) = phantom.features_of_kind("matrix")
    radius, _, half_h = matrix.semi_axes_um
    inclusions = [f for f in phantom.features if f.kind != "matrix"]
    assert len(phantom.features_of_kind("fiducial")) >= 6 and len(phantom.features_of_kind("phase")) > 0
    for f in inclusions:
        assert math.hypot(*f.center_um[:2]) + max(f.semi_axes_um[:2]) < radius
        assert abs(f.center_um[2]) + f.semi_axes_um[2] < half_h
    for f, g in itertools.combinations(inclusions, 2):
        # Bounding spheres disjoint => the features are disjoint.
        gap = math.dist(f.center_um, g.center_um) - f.bounding_radius_um - g.bounding_radius_um
        assert gap > 0, (f, g)


def test_fiducial_layout_on_section_plane_and_asymmetric():
    phantom = make_phantom(section_z_um=20.0)
    centers = phantom.fiducial_centers_um()
    radii = np.array([f.semi_axes_um[0] for f in phantom.features_of_kind("fiducial")])
    assert centers.shape[0] >= 6 and np.all(centers[:, 2] == 20.0)
    assert np.all(np.hypot(centers[:, 0], centers[:, 1]) + radii <= 280.0)
    assert np.all((16.0 <= radii) & (radii <= 24.0))
    dists = np.sort(np.linalg.norm(centers[:, None] - centers[None], axis=-1)[np.triu_indices(len(centers), 1)])
    assert np.min(np.diff(dists)) > 1.0  # all pairwise distances distinct: no symmetry


def test_make_phantom_is_deterministic_per_seed():
    assert make_phantom(seed=3, temperature_K=650.0) == make_phantom(seed=3, temperature_K=650.0)
    assert make_phantom(seed=3).features != make_phantom(seed=4).features


def test_invalid_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="section_z_um"):
        make_phantom(section_z_um=110.0)
    with pytest.raises(ValueError, match="temperature_K"):
        make_phantom(temperature_K=-1.0)
    with pytest.raises(ValueError, match="overlap"):
        Phantom(
            features=(
                Feature("pore", "pore", (0, 0, 0), (10, 10, 10)),
                Feature("pore", "pore", (15, 0, 0), (10, 10, 10)),
            ),
            temperature_K=300.0,
        )


def test_sem_contrast_ordering_differs_from_xray():
    others = [k for k in MATERIALS if k != "fiducial"]
    assert all(MATERIALS["fiducial"].mu_per_mm > MATERIALS[k].mu_per_mm for k in others)
    assert all(MATERIALS["fiducial"].sem_contrast > MATERIALS[k].sem_contrast for k in others)
    m = MATERIALS
    inverted = [
        (a, b)
        for a, b in itertools.combinations(m, 2)
        if (m[a].mu_per_mm - m[b].mu_per_mm) * (m[a].sem_contrast - m[b].sem_contrast) < 0
    ]
    assert ("matrix", "phase") in inverted
    assert all(1e-7 <= MATERIALS[k].delta <= 3e-6 for k in ("matrix", "precipitate", "phase", "fiducial"))


# -- X-ray detector ----------------------------------------------------------------------------------
@pytest.fixture
def detector():
    return XrayDetectorModel(
        shape_px=(16, 96), pixel_size_um=8.0, incident_photons_per_s=2.0e4, rotation_axis_offset_px=3.3
    )


def _darkest_column(transmission):
    profile = 1.0 - transmission.mean(axis=0)
    j = np.arange(profile.size)
    return float((profile * j).sum() / profile.sum())


def test_rotation_and_stage_conventions(detector):
    sphere = _single(Feature("fiducial", "fiducial", (160.0, 0.0, 0.0), (20.0,) * 3))
    c = detector.axis_column()
    assert c == pytest.approx((96 - 1) / 2 + 3.3)

    def column(angle, **stage):
        pos = {"x_um": 0.0, "y_um": 0.0, "z_um": 0.0} | stage
        return _darkest_column(xray_transmission(sphere, detector, angle_deg=angle, **pos))

    assert column(0.0) == pytest.approx(c + 20.0, abs=0.05)  # +x appears at u > 0 at 0 deg
    assert column(90.0) == pytest.approx(c, abs=0.05)  # u = x cos - y sin
    assert column(180.0) == pytest.approx(c - 20.0, abs=0.05)
    assert column(270.0) == pytest.approx(c, abs=0.05)
    on_y = _single(Feature("fiducial", "fiducial", (0.0, 160.0, 0.0), (20.0,) * 3))
    assert _darkest_column(xray_transmission(on_y, detector, angle_deg=90.0, x_um=0, y_um=0, z_um=0)) == pytest.approx(
        c - 20.0, abs=0.05
    )
    assert column(0.0, x_um=24.0) == pytest.approx(c + 23.0, abs=0.05)  # stage x moves the axis by x / pixel
    # Stage z up by 16 um: the sphere (at sample z = 0) moves up by two rows.
    rows = 1.0 - xray_transmission(sphere, detector, angle_deg=0.0, x_um=0, y_um=0, z_um=16.0).mean(axis=1)
    assert float((rows * np.arange(16)).sum() / rows.sum()) == pytest.approx(7.5 + 2.0, abs=0.05)


def test_flat_field_counts_match_incident_photons(detector):
    rng = np.random.default_rng(1)
    phantom = make_phantom()
    exposure = 0.05
    # The sample moved 10 cm out of the beam: a flat field.
    pos = {"angle_deg": 0.0, "x_um": 1e5, "y_um": 0.0, "z_um": 0.0}
    frames = np.array(
        [xray_frame(phantom, detector, **pos, exposure_s=exposure, shutter_open=True, rng=rng) for _ in range(20)],
        dtype=np.float64,
    )
    expected = detector.incident_photons_per_s * exposure * detector.flat_profile()
    photons = frames - detector.dark_counts
    total_expected = expected.sum() * len(frames)
    # Sum of Poisson counts: mean total_expected, sd sqrt(total_expected) (+ small read noise).
    assert abs(photons.sum() - total_expected) < 5 * math.sqrt(total_expected + frames.size * 4)
    np.testing.assert_allclose(photons.mean(axis=0), expected, rtol=5 * math.sqrt(1 / (20 * expected.min())))
    # Poisson: per-pixel variance equals the mean (plus read noise variance).
    ratio = photons.var(axis=0, ddof=1).mean() / (expected.mean() + detector.read_noise_counts**2)
    assert ratio == pytest.approx(1.0, abs=0.1)
    profile = detector.flat_profile()
    assert profile.max() <= 1.2 and 0.01 < profile.std() / profile.mean() < 0.2


def test_dark_frame_with_shutter_closed(detector):
    rng = np.random.default_rng(2)
    pos = {"angle_deg": 0.0, "x_um": 0.0, "y_um": 0.0, "z_um": 0.0}
    frame = xray_frame(make_phantom(), detector, **pos, exposure_s=1.0, shutter_open=False, rng=rng)
    assert frame.dtype == np.uint16 and frame.shape == (16, 96)
    assert frame.mean() == pytest.approx(detector.dark_counts, abs=0.2)
    assert frame.std() == pytest.approx(detector.read_noise_counts, rel=0.15)


def test_minus_log_normalized_matches_line_integrals(detector):
    rng = np.random.default_rng(3)
    phantom = make_phantom(temperature_K=700.0)
    common = {"angle_deg": 25.0, "y_um": 0.0, "z_um": 0.0, "exposure_s": 1.0, "rng": rng}
    n = 10
    proj = np.mean([xray_frame(phantom, detector, x_um=0.0, shutter_open=True, **common) for _ in range(n)], axis=0)
    flat = np.mean([xray_frame(phantom, detector, x_um=1e5, shutter_open=True, **common) for _ in range(n)], axis=0)
    dark = np.mean([xray_frame(phantom, detector, x_um=0.0, shutter_open=False, **common) for _ in range(n)], axis=0)
    measured = -np.log((proj - dark) / (flat - dark))
    rows, cols = detector.shape_px
    u = (np.arange(cols) - detector.axis_column()) * detector.pixel_size_um
    z = (np.arange(rows) - (rows - 1) / 2) * detector.pixel_size_um
    truth = phantom.line_integrals(angle_deg=25.0, u_um=u, z_um=z)
    # Noise of -log of a ratio of two n-frame means with N photons each: sqrt(1/(n N T) + 1/(n N)).
    n_photons = detector.incident_photons_per_s * detector.flat_profile()
    sigma = np.sqrt(np.exp(truth) / (n * n_photons) + 1 / (n * n_photons))
    z_scores = (measured - truth) / sigma
    assert abs(z_scores.mean()) < 0.1
    assert z_scores.std() == pytest.approx(1.0, abs=0.1)
    assert truth.max() > 0.5  # the sample is really in the beam


def test_paganin_retrieval_of_propagated_sphere_gives_thickness():
    """Fresnel propagation is consistent with the TIE: Paganin's filter recovers a homogeneous sphere."""
    radius, material = 120.0, MATERIALS["matrix"]
    sphere = _single(Feature("precipitate", "matrix", (0.0, 0.0, 0.0), (radius,) * 3))
    geometry = {"shape_px": (96, 96), "pixel_size_um": 4.0, "incident_photons_per_s": 1.0}
    pos = {"angle_deg": 0.0, "x_um": 0.0, "y_um": 0.0, "z_um": 0.0}
    model = XrayDetectorModel(**geometry, propagation_distance_mm=100.0)
    intensity = xray_transmission(sphere, model, **pos).astype(np.float64)
    absorption_only = xray_transmission(sphere, XrayDetectorModel(**geometry), **pos)
    assert np.abs(intensity - absorption_only).max() > 0.05  # propagation really adds edge contrast
    mu_per_um = material.mu_per_mm * 1e-3
    padded = np.pad(intensity, 48, mode="edge")
    f = scipy.fft.fftfreq(padded.shape[0], d=4.0)
    k2 = (2 * np.pi) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2)
    # Paganin et al. (2002): F^-1[F[I_z / I_0] / (1 + z delta/mu k^2)] = exp(-mu T), z = 100 mm = 1e5 um.
    paganin = 1 + 100e3 * material.delta / mu_per_um * k2
    filtered = scipy.fft.ifft2(scipy.fft.fft2(padded) / paganin).real[48:-48, 48:-48]
    thickness = -np.log(filtered) / mu_per_um
    coords = (np.arange(96) - 47.5) * 4.0
    r = np.hypot(coords[None, :], coords[:, None])
    truth = 2 * np.sqrt(np.maximum(radius**2 - r**2, 0))
    inner = r < 0.8 * radius
    assert np.abs(thickness - truth)[inner].max() < 0.03 * 2 * radius


# -- heater -----------------------------------------------------------------------------------------
def test_heater_first_order_lag_has_the_time_constant():
    heater = HeaterModel(time_constant_s=20.0, max_ramp_K_per_s=5.0)
    heater.set_setpoint(heater.ambient_K + 50.0)  # inside the ramp band (50 K < 5 K/s * 20 s)
    heater.advance(20.0)
    assert heater.temperature_K == pytest.approx(heater.ambient_K + 50.0 * (1 - math.exp(-1)), abs=1e-9)
    stepped = HeaterModel(time_constant_s=20.0, max_ramp_K_per_s=5.0)
    stepped.set_setpoint(stepped.ambient_K + 50.0)
    for _ in range(200):
        stepped.advance(0.1)
    assert stepped.temperature_K == pytest.approx(heater.temperature_K, abs=1e-9)


def test_heater_respects_ramp_limit_and_settles():
    heater = HeaterModel(time_constant_s=20.0, max_ramp_K_per_s=5.0)
    heater.set_setpoint(900.0)
    temps = [heater.temperature_K]
    for _ in range(3000):
        heater.advance(0.1)
        temps.append(heater.temperature_K)
    rates = np.diff(temps) / 0.1
    assert rates.max() <= 5.0 + 1e-9 and rates.min() >= 0
    assert rates[0] == pytest.approx(5.0)  # far from the setpoint it ramps at the limit
    assert temps[-1] == pytest.approx(900.0, abs=0.01)
    before = heater.temperature_K
    heater.set_setpoint(300.0)
    heater.advance(1.0)
    assert heater.temperature_K == pytest.approx(before - 5.0)  # cooling is rate-limited too
    readings = [heater.measure(np.random.default_rng(i)) for i in range(400)]
    assert np.std(readings) == pytest.approx(heater.noise_K, rel=0.2)
    for bad in (2000.0, 100.0, float("nan")):
        with pytest.raises(ValueError, match="setpoint_K"):
            heater.set_setpoint(bad)


# -- microscope -------------------------------------------------------------------------------------
def test_microscope_shows_fiducials_where_the_true_transform_puts_them():
    world = SimulatedWorld(SimulationSettings())
    model, phantom = world.microscope, world.phantom()
    stage = (15.0, -10.0)
    image = microscope_image(phantom, model, stage_x_um=stage[0], stage_y_um=stage[1], rng=np.random.default_rng(4))
    rows, cols = model.shape_px
    assert image.dtype == np.float32 and image.shape == (rows, cols)
    in_stage = apply(invert(model.sample_from_microscope), phantom.fiducial_centers_um())
    assert np.allclose(in_stage[:, 2], 0.0)  # the fiducials lie on the imaged plane
    col = (in_stage[:, 0] - stage[0]) / model.pixel_size_um + (cols - 1) / 2
    row = (in_stage[:, 1] - stage[1]) / model.pixel_size_um + (rows - 1) / 2
    matrix_level = np.median(image)
    assert matrix_level == pytest.approx(MATERIALS["matrix"].sem_contrast, rel=0.1)
    for r0, c0 in zip(row, col, strict=True):
        assert 10 < r0 < rows - 10 and 10 < c0 < cols - 10
        rr, cc = np.mgrid[int(r0) - 12 : int(r0) + 13, int(c0) - 12 : int(c0) + 13]
        window = image[rr, cc].astype(np.float64)
        bright = np.clip(window - matrix_level, 0, None) * (window > 0.75)
        assert bright.sum() > 0
        centroid = ((rr * bright).sum() / bright.sum(), (cc * bright).sum() / bright.sum())
        assert centroid[0] == pytest.approx(r0, abs=0.4) and centroid[1] == pytest.approx(c0, abs=0.4)
        assert image[int(round(r0)), int(round(c0))] > 0.8


def test_microscope_shot_noise_follows_electron_dose():
    flat = _single(Feature("matrix", "matrix", (0.0, 0.0, 0.0), (2000.0, 2000.0, 100.0), shape="cylinder"))
    model = MicroscopeModel(
        shape_px=(64, 64), pixel_size_um=1.0, sample_from_microscope=np.eye(4), electrons_per_px=100.0
    )
    image = microscope_image(flat, model, stage_x_um=0, stage_y_um=0, rng=np.random.default_rng(5)) / model.shading()
    level = MATERIALS["matrix"].sem_contrast
    assert image.mean() == pytest.approx(level, rel=0.02)
    assert image.std() == pytest.approx(math.sqrt(level / 100.0), rel=0.1)


# -- world ------------------------------------------------------------------------------------------
class _FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_world_clock_heater_and_cached_phantoms():
    clock = _FakeClock()
    world = SimulatedWorld(SimulationSettings(time_scale=100.0), clock=clock)
    params = decompose_similarity(world.sample_from_microscope)
    assert 1.01 < params.scale < 1.03 and 10.0 <= params.rotation_deg <= 14.0
    assert params.translation_um[2] == world.section_z_um
    assert np.allclose(world.phantom().fiducial_centers_um()[:, 2], world.section_z_um)
    first = world.phantom()
    assert world.phantom() is first and world.sample_temperature_K() == pytest.approx(293.15)
    world.set_heater_setpoint(343.15)  # 50 K step: pure first-order lag
    clock.t += 0.2  # 20 simulated seconds = one time constant
    assert world.now_s() == pytest.approx(20.0)
    assert world.sample_temperature_K() == pytest.approx(293.15 + 50 * (1 - math.exp(-1)))
    hot = world.phantom()
    assert hot is not first and hot.temperature_K == round(hot.temperature_K)
    world.set_heater_setpoint(900.0)
    clock.t += 10.0  # 1000 simulated seconds
    assert world.phantom().features_of_kind("phase")
    assert abs(world.measure_temperature_K() - 900.0) < 1.0


def test_filtered_backprojection_of_simulated_scan_gives_back_the_phantom():
    """End to end: frames -> flat/dark normalisation -> FBP (written here, contract geometry) -> voxelize."""
    world = SimulatedWorld(SimulationSettings())
    model, phantom = world.xray, make_phantom(temperature_K=800.0, section_z_um=world.section_z_um)
    rows, n = model.shape_px
    px = model.pixel_size_um
    row = int(round(world.section_z_um / px + (rows - 1) / 2))
    rng = np.random.default_rng(6)
    # ~1e4 photons per flat pixel whatever the configured flux: well inside the uint16 range.
    kw = {"y_um": 0.0, "z_um": 0.0, "exposure_s": 1e4 / model.incident_photons_per_s, "rng": rng}
    dark = np.mean([xray_frame(phantom, model, angle_deg=0, x_um=0, shutter_open=False, **kw) for _ in range(4)], 0)
    flat = np.mean([xray_frame(phantom, model, angle_deg=0, x_um=1e5, shutter_open=True, **kw) for _ in range(8)], 0)
    angles = np.linspace(0.0, 180.0, 180, endpoint=False)
    frames = [xray_frame(phantom, model, angle_deg=a, x_um=0, shutter_open=True, **kw) for a in angles]
    sino = -np.log((np.array(frames)[:, row] - dark[row]) / (flat[row] - dark[row]))
    # Ram-Lak in real space (exact DC), sample spacing in mm so the result is in 1/mm.
    tau = px * 1e-3
    k = np.arange(-n + 1, n)
    kernel = np.zeros(k.size)
    kernel[k == 0] = 1 / (4 * tau**2)
    odd = k % 2 == 1
    kernel[odd] = -1 / (np.pi * k[odd] * tau) ** 2
    filtered = np.array([np.convolve(p, kernel)[n - 1 : 2 * n - 1] for p in sino]) * tau
    u = (np.arange(n) - model.axis_column()) * px
    x = (np.arange(n) - (n - 1) / 2) * px
    xx, yy = np.meshgrid(x, x)
    recon = np.zeros((n, n))
    for theta, p in zip(np.radians(angles), filtered, strict=True):
        recon += np.interp(xx * np.cos(theta) - yy * np.sin(theta), u, p, left=0.0, right=0.0)
    recon *= np.pi / len(angles)
    truth = phantom.voxelize(shape_zyx=(1, n, n), voxel_size_um=px, z_offset_um=(row - (rows - 1) / 2) * px)[0]
    inside = np.hypot(xx, yy) < 380.0
    assert np.corrcoef(recon[inside], truth[inside])[0, 1] > 0.95
    assert np.corrcoef(recon[inside], truth.T[inside])[0, 1] < 0.5  # a mirrored geometry would not match
    assert np.median(recon[inside]) == pytest.approx(MATERIALS["matrix"].mu_per_mm, rel=0.05)
