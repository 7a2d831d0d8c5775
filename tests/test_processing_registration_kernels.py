"""Ground-truth tests of the registration kernels: phase correlation, multimodal MI registration, slice in
volume, regions of interest across frames and the volume feature detector.

Every scene is rendered here with a KNOWN transform (random, fixed seeds) from the analytic phantom of
``corrflow.simulators`` or from a band-limited random texture; accuracy is asserted against that truth.
The full accuracy tables (>= 50 cases per kind, at 512²) are in ``python -m benchmarks.registration``;
these tests use fewer, smaller cases and bounds measured on them.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from corrflow.processing._mutual_information import robust_range
from corrflow.processing.intensity_registration import _Grid, normalized_mutual_information, register_intensity
from corrflow.processing.phase_correlation import phase_correlation_shift
from corrflow.processing.registration import RegistrationError
from corrflow.processing.roi import FrameGraph, RegionOfInterest, map_roi, microscope_target
from corrflow.processing.slice_in_volume import (
    _image_motion,
    _refine_least_squares,
    find_slice_in_volume,
    plane_parameters,
)
from corrflow.processing.transforms import apply, compose, invert, similarity
from corrflow.processing.volume_features import detect_volume_features, largest_feature
from corrflow.simulators import MicroscopeModel, make_phantom, microscope_image
from corrflow.simulators.microscope import microscope_pixel_points_um
from corrflow.simulators.phantom import Feature, Phantom


def angle_difference(a_deg, b_deg):
    return abs((a_deg - b_deg + 180.0) % 360.0 - 180.0)


# ================================================================================ phase correlation


def texture_pair(rng, *, n=256, snr=10.0, max_shift_px=12.0):
    """Two non-periodic crops of a band-limited texture; the second EXACTLY shifted (Fourier shift of the
    periodic canvas before cropping). White noise at std(signal)/std(noise) = snr. Returns (ref, mov, shift_xy)."""
    big = n + 2 * int(np.ceil(max_shift_px)) + 32
    field = ndimage.gaussian_filter(rng.normal(size=(big, big)), 2.0, mode="wrap")
    field += 4.0 * ndimage.gaussian_filter(rng.normal(size=(big, big)), 8.0, mode="wrap")
    shift = rng.uniform(-max_shift_px, max_shift_px, 2)
    ky, kx = np.fft.fftfreq(big)[:, None], np.fft.fftfreq(big)[None, :]
    moved = np.fft.ifft2(np.fft.fft2(field) * np.exp(-2j * np.pi * (kx * shift[0] + ky * shift[1]))).real
    o = (big - n) // 2
    ref, mov = field[o : o + n, o : o + n], moved[o : o + n, o : o + n]
    sigma = ref.std() / snr
    return ref + rng.normal(0, sigma, ref.shape), mov + rng.normal(0, sigma, mov.shape), shift


@pytest.mark.parametrize("seed", range(6))
def test_phase_correlation_is_subpixel_at_snr_10_on_non_periodic_crops(seed):
    ref, mov, truth = texture_pair(np.random.default_rng(seed))
    result = phase_correlation_shift(ref, mov)
    # Goal 0.05 px; measured <= 0.01 px on these 256² crops (0.009 px max over 50 cases at 512²).
    assert np.hypot(*(result.shift_xy_px - truth)) < 0.02
    assert result.ok and result.correlation > 0.9 and result.overlap_fraction > 0.85
    np.testing.assert_allclose(result.shift_rc_px, result.shift_xy_px[::-1])
    # The matrix maps moving points to reference points: a feature at p in the reference is at p + s in moving.
    np.testing.assert_allclose(result.matrix[:2, 2], -result.shift_xy_px)


def test_phase_correlation_of_unrelated_images_is_reported_as_a_failure():
    rng = np.random.default_rng(11)
    a, _, _ = texture_pair(rng)
    b, _, _ = texture_pair(rng)
    with pytest.raises(RegistrationError, match="do not correlate"):
        phase_correlation_shift(a, b)
    result = phase_correlation_shift(a, b, raise_on_failure=False)
    assert not result.ok and result.correlation < 0.2


def test_phase_correlation_rejects_bad_input():
    rng = np.random.default_rng(12)
    ref, mov, _ = texture_pair(rng, n=64, max_shift_px=20.0)
    with pytest.raises(ValueError, match="reference"):
        phase_correlation_shift(ref[None], mov)
    with pytest.raises(ValueError, match="same shape"):
        phase_correlation_shift(ref, mov[:-1])
    with pytest.raises(ValueError, match="window"):
        phase_correlation_shift(ref, mov, window="gauss")
    with pytest.raises(RegistrationError, match="constant"):
        phase_correlation_shift(np.ones((64, 64)), mov)
    with pytest.raises(RegistrationError, match="no overlap"):
        phase_correlation_shift(ref, mov, min_overlap=0.999)


# ================================================================================ multimodal MI registration

PHANTOM = make_phantom(seed=7)


def xray_section(n, pixel_um, rng, *, z_um=0.0, noise=0.05):
    """Reconstruction-like slice on the contract grid: pixel-averaged attenuation (1/mm), blur, noise."""
    ss = 2
    g = ((np.arange(n * ss) + 0.5) / ss - 0.5 - (n - 1) / 2) * pixel_um
    xx, yy = np.meshgrid(g, g)
    mu = PHANTOM.attenuation_at(np.stack([xx, yy, np.full_like(xx, z_um)], axis=-1)).astype(np.float64)
    mu = ndimage.gaussian_filter(mu.reshape(n, ss, n, ss).mean(axis=(1, 3)), 0.8)
    return mu + rng.normal(0.0, noise, mu.shape)


@pytest.fixture(scope="module")
def slice_256():
    return xray_section(256, 820.0 / 256, np.random.default_rng(20))


def micrograph_of(true_4x4, rng, *, n=256, field_um=600.0):
    stage = rng.uniform(-50.0, 50.0, 2)
    model = MicroscopeModel(shape_px=(n, n), pixel_size_um=field_um / n, sample_from_microscope=true_4x4)
    image = microscope_image(PHANTOM, model, stage_x_um=float(stage[0]), stage_y_um=float(stage[1]), rng=rng)
    return image, stage


def field_error_um(matrix, true_4x4, stage, half_um=300.0):
    corners = np.array([[stage[0] + sx * half_um, stage[1] + sy * half_um] for sx in (-1, 1) for sy in (-1, 1)])
    truth = corners @ true_4x4[:2, :2].T + true_4x4[:2, 3]
    return np.linalg.norm(corners @ matrix[:2, :2].T + matrix[:2, 2] - truth, axis=1).max()


@pytest.mark.parametrize("seed", range(2))
def test_register_intensity_recovers_a_random_rigid_transform_across_modalities(slice_256, seed):
    """X-ray attenuation slice (fixed) vs backscatter micrograph (moving), any rotation, no initial guess."""
    rng = np.random.default_rng(30 + seed)
    true = similarity(rotation_deg=float(rng.uniform(-180, 180)), translation_um=(*rng.uniform(-40, 40, 2), 0.0))
    micrograph, stage = micrograph_of(true, rng)
    result = register_intensity(slice_256, micrograph, fixed_pixel_size_um=820.0 / 256,
                                moving_pixel_size_um=600.0 / 256, moving_center_um=stage, model="rigid")
    assert result.ok and result.nmi > 1.05 and result.overlap_fraction > 0.4 and result.significance > 10
    # At 256² (3.2 um slice pixels): measured <= 0.09 deg and <= 0.9 um over the 600 um field; the 0.05 deg
    # goal holds at 512² (benchmark).
    assert angle_difference(result.rotation_deg, np.degrees(np.arctan2(true[1, 0], true[0, 0]))) < 0.15
    assert field_error_um(result.matrix, true, stage) < 1.5
    assert result.as_4x4(z_um=5.0)[2, 3] == 5.0


def test_register_intensity_similarity_and_affine_models(slice_256):
    rng = np.random.default_rng(40)
    true = similarity(scale=1.06, rotation_deg=-23.0, translation_um=(12.0, -30.0, 0.0))
    micrograph, stage = micrograph_of(true, rng)
    args = dict(fixed_pixel_size_um=820.0 / 256, moving_pixel_size_um=600.0 / 256, moving_center_um=stage)
    # (The rotation search is narrowed here to keep the test fast; the rigid tests above search all angles.)
    result = register_intensity(slice_256, micrograph, model="similarity", scale_range=(1.02, 1.1),
                                rotation_range_deg=(-45.0, 0.0), **args)
    assert result.scale == pytest.approx(1.06, rel=2e-3)  # measured 0.05 %
    assert angle_difference(result.rotation_deg, -23.0) < 0.15
    assert field_error_um(result.matrix, true, stage) < 1.5
    # A known start skips the search; the affine model then recovers a small shear as well.
    shear = true.copy()
    shear[:2, :2] = true[:2, :2] @ np.array([[1.0, 0.02], [0.0, 1.0]])
    micrograph, stage = micrograph_of(shear, rng)
    start = np.eye(3)
    start[:2, :2], start[:2, 2] = true[:2, :2], true[:2, 3]
    affine = register_intensity(slice_256, micrograph, model="affine", initial_matrix=start,
                                **{**args, "moving_center_um": stage})
    assert affine.n_candidates == 1
    np.testing.assert_allclose(affine.matrix[:2, :2], shear[:2, :2], atol=4e-3)  # measured 2.7e-3
    assert field_error_um(affine.matrix, shear, stage) < 1.5


def test_register_intensity_reports_unrelated_images_and_bad_input(slice_256):
    rng = np.random.default_rng(50)
    noise = ndimage.gaussian_filter(rng.normal(size=(128, 128)), 2.0)
    quick = dict(fixed_pixel_size_um=3.2, moving_pixel_size_um=4.0, rotation_step_deg=30.0, n_candidates=1)
    with pytest.raises(RegistrationError, match="do not share information"):
        register_intensity(slice_256, noise, **quick)
    result = register_intensity(slice_256, noise, raise_on_failure=False, **quick)
    # Whatever NMI the optimiser fits to noise, it does not stand out from misplacements (measured <= 5 sigma
    # for noise, >= 15 sigma for true matches).
    assert not result.ok and result.significance < 8.0
    with pytest.raises(ValueError, match="fixed"):
        register_intensity(slice_256[None], noise)
    with pytest.raises(ValueError, match="moving_pixel_size_um"):
        register_intensity(slice_256, noise, moving_pixel_size_um=0.0)
    with pytest.raises(ValueError, match="model"):
        register_intensity(slice_256, noise, model="projective")
    with pytest.raises(RegistrationError, match="constant"):
        register_intensity(slice_256, np.zeros((64, 64)))


def test_normalized_mutual_information_bounds():
    rng = np.random.default_rng(60)
    a = rng.normal(size=20000)
    assert normalized_mutual_information(a, a) == pytest.approx(2.0, abs=1e-9)
    assert normalized_mutual_information(a, 3.0 - 2.0 * a) == pytest.approx(2.0, abs=1e-9)  # any affine map
    assert normalized_mutual_information(a, rng.normal(size=20000)) < 1.02


# ================================================================================ slice in volume


def dense_phantom(seed, *, n_inclusions=900):
    """Phantom with a dense population of inclusions (make_phantom has ~8 per section: too few to pin an
    arbitrary plane by intensity). Same feature model and materials."""
    rng = np.random.default_rng(seed)
    features = [Feature("matrix", "matrix", (0.0, 0.0, 0.0), (400.0, 400.0, 200.0), 0.0, "cylinder")]
    centres, radii = [], []
    kinds = ("pore", "precipitate", "precipitate", "pore", "phase")
    while len(radii) < n_inclusions:
        r = float(rng.uniform(9.0, 24.0))
        c = np.array([*rng.uniform(-400, 400, 2), rng.uniform(-200, 200)])
        if np.hypot(c[0], c[1]) + r + 2 > 400 or abs(c[2]) + r + 2 > 200:
            continue
        if centres and np.any(np.linalg.norm(np.array(centres) - c, axis=1) < np.array(radii) + r + 2):
            continue
        centres.append(c)
        radii.append(r)
        kind = kinds[len(radii) % 5]
        axes = (r, r * float(rng.uniform(0.6, 1.0)), r * float(rng.uniform(0.6, 1.0)))
        features.append(Feature(kind, kind, tuple(c), axes, float(rng.uniform(0, 180)), "ellipsoid"))
    return Phantom(features=tuple(features), temperature_K=293.15)


def tilted(rotation_deg, tilt_x_deg, tilt_y_deg, translation_um):
    """Image plane -> sample: Ry(tilt_y) Rx(tilt_x) Rz(rotation), then translation."""
    cz, sz = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    cx, sx = np.cos(np.radians(tilt_x_deg)), np.sin(np.radians(tilt_x_deg))
    cy, sy = np.cos(np.radians(tilt_y_deg)), np.sin(np.radians(tilt_y_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    out = np.eye(4)
    out[:3, :3] = ry @ rx @ rz
    out[:3, 3] = translation_um
    return out


VOXEL_UM = 8.0
IMAGE_PX_UM = 4.0


@pytest.fixture(scope="module")
def dense_volume():
    phantom = dense_phantom(3)
    volume = phantom.voxelize(shape_zyx=(40, 96, 96), voxel_size_um=VOXEL_UM).astype(np.float64)
    return phantom, volume + np.random.default_rng(70).normal(0.0, 0.05, volume.shape)


def plane_errors(estimate, truth, stage, half_um):
    """(largest out-of-plane distance in voxels, largest 3-D position error in voxels, tilt error in deg)."""
    corners = np.array([[stage[0] + sx * half_um, stage[1] + sy * half_um, 0.0] for sx in (-1, 1) for sy in (-1, 1)])
    difference = apply(estimate, corners) - apply(truth, corners)
    normal = plane_parameters(truth).normal
    tilt = np.degrees(np.arccos(np.clip(normal @ plane_parameters(estimate).normal, -1, 1)))
    return np.abs(difference @ normal).max() / VOXEL_UM, np.linalg.norm(difference, axis=1).max() / VOXEL_UM, tilt


@pytest.mark.parametrize(("modality", "seed"), [("xray", 1), ("sem", 0)])
def test_find_slice_in_volume_recovers_a_random_tilted_plane(dense_volume, modality, seed):
    """Any in-plane rotation, tilts up to 2.5 deg about x and y, any height: no initial guess.

    (The SEM case succeeds in ~90 % of random planes on this phantom, failures being reported, not returned:
    see the benchmark's accuracy_slice_sem row; the X-ray case in all.)
    """
    phantom, volume = dense_volume
    rng = np.random.default_rng(80 + seed)
    truth = tilted(float(rng.uniform(-180, 180)), *rng.uniform(-2.5, 2.5, 2), (*rng.uniform(-20, 20, 2),
                                                                             float(rng.uniform(-80, 80))))
    stage = rng.uniform(-30.0, 30.0, 2)
    model = MicroscopeModel(shape_px=(128, 128), pixel_size_um=IMAGE_PX_UM, sample_from_microscope=truth)
    if modality == "sem":
        image = microscope_image(phantom, model, stage_x_um=float(stage[0]), stage_y_um=float(stage[1]), rng=rng)
    else:
        points = microscope_pixel_points_um(model, stage_x_um=float(stage[0]), stage_y_um=float(stage[1]),
                                            supersample=2)
        image = phantom.attenuation_at(apply(truth, points.reshape(-1, 3))).reshape(128, 2, 128, 2).mean(axis=(1, 3))
        image = image + rng.normal(0.0, 0.05, image.shape)
    result = find_slice_in_volume(volume, image, voxel_size_um=VOXEL_UM, image_pixel_size_um=IMAGE_PX_UM,
                                  image_center_um=stage)
    plane, position, tilt = plane_errors(result.sample_from_image, truth, stage, 63.5 * IMAGE_PX_UM)
    # Goals: plane position <= 1 voxel, tilt <= 0.5 deg (measured here: <= 0.2 voxel, <= 0.1 deg).
    assert plane < 1.0 and position < 1.0 and tilt < 0.5
    assert result.ok and result.overlap_fraction > 0.9
    assert 0.0 < result.unexplained_variance < 0.8 and "least-squares refinement" in result.message
    truth_plane = plane_parameters(truth, image_center_um=stage)
    assert result.plane.height_um == pytest.approx(truth_plane.height_um, abs=VOXEL_UM)
    assert angle_difference(result.plane.rotation_deg, truth_plane.rotation_deg) < 0.5
    np.testing.assert_allclose(result.center_um, apply(truth, [*stage, 0.0]), atol=VOXEL_UM)


def sem_plane(phantom, seed, *, max_tilt_deg=2.5, max_height_um=80.0):
    """A random tilted plane of the dense phantom and its SEM micrograph: (truth 4x4, stage (2,), image)."""
    rng = np.random.default_rng(seed)
    truth = tilted(float(rng.uniform(-180, 180)), *rng.uniform(-max_tilt_deg, max_tilt_deg, 2),
                   (*rng.uniform(-20, 20, 2), float(rng.uniform(-max_height_um, max_height_um))))
    stage = rng.uniform(-30.0, 30.0, 2)
    model = MicroscopeModel(shape_px=(128, 128), pixel_size_um=IMAGE_PX_UM, sample_from_microscope=truth)
    image = microscope_image(phantom, model, stage_x_um=float(stage[0]), stage_y_um=float(stage[1]), rng=rng)
    return truth, stage, image.astype(np.float64)


def test_final_least_squares_refinement_brings_a_plane_1_deg_and_a_voxel_off_back(dense_volume):
    """Step 5 alone: started 1 deg of tilt and 5 um off the true plane of an SEM image (1.2 voxels at the
    corners), the least-squares fit with its fitted intensity mapping, shading and blur comes back to it
    (measured: <= 0.12 voxel, <= 0.17 deg over seeds 180-183); an unrelated image leaves all its variance
    unexplained."""
    phantom, volume = dense_volume
    truth, stage, image = sem_plane(phantom, 180, max_height_um=60.0)
    grid = _Grid(image.shape, IMAGE_PX_UM, stage)
    off = _image_motion(np.array([256.0 * np.radians(1.0), 0.0, 0.0, 0.0, 0.0, 5.0]), np.array([*stage, 0.0]), 256.0)
    start = truth @ off
    assert plane_errors(start, truth, stage, 63.5 * IMAGE_PX_UM)[2] == pytest.approx(1.0, abs=1e-6)
    refined, unexplained, moved_um, note = _refine_least_squares(
        robust_range(volume), VOXEL_UM, 0.0, robust_range(image), grid, start, model="rigid", refine=True)
    plane, position, tilt = plane_errors(refined, truth, stage, 63.5 * IMAGE_PX_UM)
    assert plane < 0.3 and position < 0.3 and tilt < 0.3
    assert 0.0 < unexplained < 0.7 and 5.0 < moved_um <= 2 * VOXEL_UM and "moved the plane" in note
    noise = np.random.default_rng(0).normal(size=image.shape)
    _, unrelated, moved_um, _ = _refine_least_squares(robust_range(volume), VOXEL_UM, 0.0, noise, grid, truth,
                                                      model="rigid", refine=False)
    assert unrelated > 0.95 and moved_um == 0.0


def test_final_least_squares_refinement_never_moves_the_plane_far(dense_volume):
    """A start far off (30 um in height, 10 deg in-plane): the local refinement may not wander; it keeps the
    start or moves at most 2 voxels at the image corners."""
    phantom, volume = dense_volume
    truth, stage, image = sem_plane(phantom, 181, max_height_um=60.0)
    grid = _Grid(image.shape, IMAGE_PX_UM, stage)
    start = truth @ _image_motion(np.array([0.0, 0.0, 256.0 * np.radians(10.0), 0.0, 0.0, 30.0]),
                                  np.array([*stage, 0.0]), 256.0)
    refined, _, moved_um, note = _refine_least_squares(
        robust_range(volume), VOXEL_UM, 0.0, robust_range(image), grid, start, model="rigid", refine=True)
    assert moved_um <= 2 * VOXEL_UM
    corners = np.array([[stage[0] + sx * 254.0, stage[1] + sy * 254.0, 0.0] for sx in (-1, 1) for sy in (-1, 1)])
    assert np.linalg.norm(apply(refined, corners) - apply(start, corners), axis=1).max() <= 2 * VOXEL_UM + 1e-6
    assert note


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 106))
def test_find_slice_in_volume_meets_the_goals_on_random_sem_planes(dense_volume, seed):
    """More random SEM planes (benchmark goals: plane <= 1 voxel, tilt <= 0.5 deg); ~4 s each."""
    phantom, volume = dense_volume
    truth, stage, image = sem_plane(phantom, seed)
    result = find_slice_in_volume(volume, image, voxel_size_um=VOXEL_UM, image_pixel_size_um=IMAGE_PX_UM,
                                  image_center_um=stage)
    plane, position, tilt = plane_errors(result.sample_from_image, truth, stage, 63.5 * IMAGE_PX_UM)
    assert result.ok and plane < 1.0 and position < 1.0 and tilt < 0.5


def test_find_slice_in_volume_locates_the_microscope_section_in_the_project_phantom():
    """The project's use: the SEM section through the fiducial plane of make_phantom, height unknown.

    (Untilted: a section through the fiducial plane hardly constrains a tilt, because a sphere cut a little
    above its equator looks like one cut as far below; measured tilt error 1 deg for a 1 deg tilt.)
    """
    phantom = make_phantom(seed=7, section_z_um=20.0)
    volume = phantom.voxelize(shape_zyx=(30, 104, 104), voxel_size_um=VOXEL_UM).astype(np.float64)
    rng = np.random.default_rng(90)
    volume += rng.normal(0.0, 0.05, volume.shape)
    truth = tilted(12.0, 0.0, 0.0, (35.0, -20.0, 20.0))
    model = MicroscopeModel(shape_px=(128, 128), pixel_size_um=5.0, sample_from_microscope=truth)
    image = microscope_image(phantom, model, stage_x_um=0.0, stage_y_um=0.0, rng=rng)
    # The flow knows the microscope's rotation roughly (its stage is mounted ~12 deg off): search +-30 deg.
    result = find_slice_in_volume(volume, image, voxel_size_um=VOXEL_UM, image_pixel_size_um=5.0,
                                  rotation_range_deg=(-20.0, 40.0))
    plane, position, tilt = plane_errors(result.sample_from_image, truth, (0.0, 0.0), 63.5 * 5.0)
    # Measured 0.23 voxel, 0.29 voxel, 0.24 deg (0.37, 0.40, 0.31 with final_refinement=False).
    assert plane < 1.0 and position < 1.0 and tilt < 0.5
    assert result.plane.height_um == pytest.approx(20.0, abs=2.0)


def test_find_slice_in_volume_rejects_bad_input(dense_volume):
    _, volume = dense_volume
    image = volume[20, :64, :64]
    with pytest.raises(ValueError, match="volume"):
        find_slice_in_volume(volume[0], image, voxel_size_um=8.0, image_pixel_size_um=8.0)
    with pytest.raises(ValueError, match="image"):
        find_slice_in_volume(volume, volume[:4], voxel_size_um=8.0, image_pixel_size_um=8.0)
    with pytest.raises(ValueError, match="voxel_size_um"):
        find_slice_in_volume(volume, image, voxel_size_um=-1.0, image_pixel_size_um=8.0)
    with pytest.raises(RegistrationError, match="no overlap"):
        find_slice_in_volume(volume, image, voxel_size_um=8.0, image_pixel_size_um=8.0, height_range_um=(500, 600))
    noise = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=(64, 64)), 1.5)
    with pytest.raises(RegistrationError, match="do not match|no overlap"):
        find_slice_in_volume(volume, noise, voxel_size_um=8.0, image_pixel_size_um=8.0, max_tilt_deg=0.0,
                             n_candidates=2)


# ================================================================================ regions of interest


def test_roi_round_trip_through_recorded_transforms():
    rng = np.random.default_rng(100)
    sample_from_microscope = similarity(scale=1.02, rotation_deg=12.0, translation_um=(35.0, -20.0, 20.0))
    tilt = tilted(0.0, 1.0, -0.5, (0.0, 0.0, 0.0))
    lab_from_sample = compose(similarity(rotation_deg=30.0, translation_um=(100.0, 0.0, -5.0)), tilt)
    graph = FrameGraph()
    graph.add(sample_from_microscope, to_frame="beamline_sample", from_frame="microscope_stage")
    graph.add(lab_from_sample, to_frame="beamline_lab", from_frame="beamline_sample")
    box = RegionOfInterest.box(min_um=(-10.0, 5.0, 15.0), max_um=(30.0, 25.0, 25.0), frame="beamline_sample",
                               label="pore")
    in_micro = graph.map_roi(box, to_frame="microscope_stage")
    assert in_micro.frame == "microscope_stage" and in_micro.label == "pore"
    np.testing.assert_allclose(in_micro.center_um, apply(invert(sample_from_microscope), box.center_um))
    # The mapped box contains the exactly mapped corners; mapped back, the centre is exact and the box grows
    # only by the rotation's bounding (it contains the original).
    assert in_micro.contains(in_micro.corners_um).all()
    back = graph.map_roi(in_micro, to_frame="beamline_sample")
    np.testing.assert_allclose(back.center_um, box.center_um, atol=1e-9)
    np.testing.assert_allclose(back.corners_um, box.box_corners_um(), atol=1e-9)
    assert back.contains(box.box_corners_um()).all()
    # Two links composed, both directions, against explicit algebra.
    lab_from_micro = graph.transform(to_frame="beamline_lab", from_frame="microscope_stage")
    np.testing.assert_allclose(lab_from_micro, compose(lab_from_sample, sample_from_microscope), atol=1e-12)
    np.testing.assert_allclose(graph.transform(to_frame="microscope_stage", from_frame="beamline_lab"),
                               invert(lab_from_micro), atol=1e-9)
    points = rng.uniform(-100, 100, (5, 3))
    np.testing.assert_allclose(
        graph.map_points(graph.map_points(points, to_frame="beamline_lab", from_frame="microscope_stage"),
                         to_frame="microscope_stage", from_frame="beamline_lab"), points, atol=1e-9)
    point = map_roi(RegionOfInterest.point((1.0, 2.0, 3.0), frame="a"), np.eye(4), to_frame="b")
    assert point.is_point and point.frame == "b" and point.to_dict()["center_um"] == [1.0, 2.0, 3.0]
    assert graph.to_dict()["links"][0]["from"] == "microscope_stage"


def test_roi_errors():
    graph = FrameGraph()
    graph.add(np.eye(4), to_frame="a", from_frame="b")
    graph.add(np.eye(4), to_frame="c", from_frame="d")
    with pytest.raises(RegistrationError, match="no recorded chain"):
        graph.transform(to_frame="a", from_frame="d")
    with pytest.raises(ValueError, match="not a known frame"):
        graph.transform(to_frame="a", from_frame="microscope_stage")
    with pytest.raises(ValueError, match="singular"):
        graph.add(np.diag([1.0, 1.0, 0.0, 1.0]), to_frame="a", from_frame="e")
    with pytest.raises(ValueError, match="center_um"):
        RegionOfInterest.point((1.0, 2.0), frame="a")
    with pytest.raises(ValueError, match="max_um"):
        RegionOfInterest.box(min_um=(0, 0, 0), max_um=(1, -1, 1), frame="a")


def test_microscope_target_centres_the_point_in_the_next_micrograph():
    true = similarity(scale=1.02, rotation_deg=12.0, translation_um=(35.0, -20.0, 20.0))
    point = np.array([120.0, -45.0, 23.0])  # 3 um above the section plane at z = 20
    target = microscope_target(point, sample_from_microscope=true)
    centre = apply(true, [target.stage_x_um, target.stage_y_um, 0.0])  # the image centre at that stage position
    np.testing.assert_allclose(centre[:2], point[:2], atol=1e-9)
    assert target.out_of_plane_um == pytest.approx(3.0)
    with pytest.raises(RegistrationError, match="not in the microscope's section"):
        microscope_target(point, sample_from_microscope=true, max_out_of_plane_um=2.0)


# ================================================================================ volume features


@pytest.fixture(scope="module")
def hot_phantom_volume():
    """The project phantom at 800 K (pores grown 1.8x), voxelised at 8 um with reconstruction-like noise."""
    phantom = make_phantom(seed=7, temperature_K=800.0)
    volume = phantom.voxelize(shape_zyx=(32, 104, 104), voxel_size_um=8.0).astype(np.float64)
    return phantom, volume + np.random.default_rng(110).normal(0.0, 0.05, volume.shape)


def inside(feature, shape_zyx=(32, 104, 104), voxel_um=8.0):
    half = (np.array(shape_zyx[::-1]) - 1) / 2 * voxel_um
    return np.all(np.abs(feature.center_um) + max(feature.semi_axes_um) < half - voxel_um)


def test_largest_pore_is_the_one_the_phantom_says(hot_phantom_volume):
    phantom, volume = hot_phantom_volume
    pores = [p for p in phantom.features_of_kind("pore") if inside(p)]
    biggest = max(pores, key=lambda p: np.prod(p.semi_axes_um))
    found = largest_feature(volume, voxel_size_um=8.0, polarity="dark")
    # Within 1 voxel (measured 0.07 voxel); size of the equal-volume sphere within 10 % (measured 1 %).
    assert np.linalg.norm(found.centroid_um - np.array(biggest.center_um)) < 8.0
    assert found.equivalent_radius_um == pytest.approx(np.cbrt(np.prod(biggest.semi_axes_um)), rel=0.1)
    roi = found.as_roi(margin_um=5.0, label="largest pore")
    assert roi.frame == "beamline_sample" and roi.contains(biggest.center_um).all()
    # Every detected pore is a real one (no vacuum, no matrix noise), each within a voxel of a phantom pore.
    features = detect_volume_features(volume, voxel_size_um=8.0)
    centres = np.array([p.center_um for p in phantom.features_of_kind("pore")])
    for f in features:
        assert np.linalg.norm(centres - f.centroid_um, axis=1).min() < 8.0


def test_largest_precipitate_excluding_fiducials(hot_phantom_volume):
    phantom, volume = hot_phantom_volume
    precipitates = [p for p in phantom.features_of_kind("precipitate") if inside(p)]
    volume_of = {"ellipsoid": 4.0 / 3.0 * np.pi, "cylinder": 2.0 * np.pi}
    biggest = max(precipitates, key=lambda p: np.prod(p.semi_axes_um) * volume_of[p.shape])
    found = largest_feature(volume, voxel_size_um=8.0, polarity="bright", exclude_above=5.0)
    assert np.linalg.norm(found.centroid_um - np.array(biggest.center_um)) < 8.0
    fiducials = largest_feature(volume, voxel_size_um=8.0, polarity="bright")  # fiducials are the largest
    assert np.linalg.norm(phantom.fiducial_centers_um() - fiducials.centroid_um, axis=1).min() < 8.0


def test_volume_features_bad_input():
    with pytest.raises(ValueError, match="volume"):
        detect_volume_features(np.zeros((8, 8)), voxel_size_um=1.0)
    with pytest.raises(ValueError, match="polarity"):
        detect_volume_features(np.zeros((8, 8, 8)), voxel_size_um=1.0, polarity="grey")
    with pytest.raises(RegistrationError, match="constant"):
        detect_volume_features(np.ones((8, 8, 8)), voxel_size_um=1.0)
    solid = np.zeros((16, 16, 16))
    solid[2:-2, 2:-2, 2:-2] = 0.5  # a sample without any pore
    with pytest.raises(RegistrationError, match="no dark feature"):
        largest_feature(solid, voxel_size_um=1.0)
