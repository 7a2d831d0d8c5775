"""Ground-truth tests of 360° scans: offset-centre -> 180° conversion, axis finding, centred 360° FBP.

The truth is analytic (ellipses with the closed-form Radon transform in the contract's convention, as in
tests/test_processing_recon.py): ``sino[k, j] = ∫ f dt`` along ``x = u cosθ + t sinθ, y = -u sinθ + t cosθ``,
``u = (j - c) * pixel``; an ellipse (semi-axes a, b, rotated by phi, centred at p0) has the chord
``2 a b sqrt(s_max² - s²) / s_max²`` with ``s = u - p0·n``, ``n = (cosθ, -sinθ)``,
``s_max² = a² cos²(-θ - phi) + b² sin²(-θ - phi)``.

The FBP floor: the same object's analytic 180° sinogram on a virtual detector as wide as the converted
one, with the same axis column, reconstructed the same way. A converted offset-centre scan can at best
reach it; a wrong axis, a mirrored half, a seam or a wrong angular weighting adds to it.
"""

from __future__ import annotations

import numpy as np
import pytest

from corrflow.processing import fbp, nrmse
from corrflow.simulators import ellipses
from corrflow.simulators.ellipses import SHEPP_LOGAN_HIGH_CONTRAST, scale_ellipses
from corrflow.processing.sinogram360 import (
    covers_full_turn,
    find_axis_360,
    half_acquisition_geometry,
    sinogram_360_to_180,
)

# The analytic phantom without its three smallest ellipses (too fine for a 96-column detector).
ELLIPSES = tuple(SHEPP_LOGAN_HIGH_CONTRAST[k] for k in (0, 1, 2, 3, 4, 5, 9))
N_COLS = 96
PIXEL_UM = 5.0
ANGLES_360 = np.arange(600) * 360.0 / 600  # 300 per half turn: >= pi/2 * 178 columns of the widened field
FILTER = "shepp-logan"


def scaled(radius_um):
    return scale_ellipses(ELLIPSES, radius_um)


def detector_sinogram(ellipses_um, angles_deg, *, n_cols, center_px):
    return ellipses.detector_sinogram(ellipses_um, angles_deg, n_cols=n_cols, center_px=center_px, pixel_um=PIXEL_UM)


def rasterised(ellipses_um, n):
    return ellipses.rasterise(ellipses_um, n, pixel_um=PIXEL_UM)


def disc(n, radius_px):
    r = np.hypot(*np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2))
    return r < radius_px


# Axis near the right edge, near the left edge (a mirrored layout), both with a fractional 2c.
OFFSET_CENTRES = [pytest.param(88.7, id="axis-right"), pytest.param(6.3, id="axis-left")]


@pytest.mark.parametrize("center_px", OFFSET_CENTRES)
def test_geometry_of_an_offset_centre_scan(center_px):
    geometry = half_acquisition_geometry(n_cols=N_COLS, center_px=center_px)
    # Axis 6.3 px from an edge: both half turns share 2 * 6.3 + 1 columns; the field doubles less that.
    assert geometry.overlap_px == pytest.approx(13.6)
    assert geometry.width_px == 178 == 2 * N_COLS - 14
    assert geometry.side == ("right" if center_px > N_COLS / 2 else "left")
    assert geometry.center_180_px == pytest.approx(88.7 if center_px > N_COLS / 2 else 177 - 88.7)


@pytest.mark.parametrize("center_px", OFFSET_CENTRES)
def test_offset_centre_scan_reconstructs_a_sample_twice_the_detector_width_at_the_fbp_floor(center_px):
    """Measured: nrmse 0.0235 (converted) vs 0.0236 (floor) on both sides; a 1 px axis error gives
    0.146 and FBP of the raw full turn without conversion 0.134."""
    width = half_acquisition_geometry(n_cols=N_COLS, center_px=center_px).width_px
    phantom = scaled(0.42 * width * PIXEL_UM)  # 150 px across on a 96 px detector
    sino_360 = detector_sinogram(phantom, ANGLES_360, n_cols=N_COLS, center_px=center_px)
    half = sinogram_360_to_180(sino_360, ANGLES_360, center_px=center_px)
    assert half.sinograms.shape == (300, width) and half.sinograms.dtype == np.float32
    np.testing.assert_allclose(half.angles_deg, ANGLES_360[:300])

    # The converted sinogram IS the wide detector's 180° sinogram, up to the resampling of the mirrored
    # half (measured: 0.6 % / 1.0 % rms, right / left).
    wide = detector_sinogram(phantom, half.angles_deg, n_cols=width, center_px=half.center_px)
    assert np.sqrt(np.mean((half.sinograms - wide) ** 2)) < 0.015 * np.sqrt(np.mean(wide**2))

    truth = rasterised(phantom, width)
    mask = disc(width, 0.42 * width)
    rec = fbp(half.sinograms, half.angles_deg, center_px=half.center_px, output_size=width,
              pixel_size_um=PIXEL_UM, filter_name=FILTER)
    floor = fbp(wide, half.angles_deg, center_px=half.center_px, output_size=width,
                pixel_size_um=PIXEL_UM, filter_name=FILTER)
    error, floor_error = nrmse(rec, truth, mask=mask), nrmse(floor, truth, mask=mask)
    assert error <= 1.1 * floor_error, (error, floor_error)

    off = sinogram_360_to_180(sino_360, ANGLES_360, center_px=center_px + 1.0)
    wrong = fbp(off.sinograms, off.angles_deg, center_px=off.center_px, output_size=width,
                pixel_size_um=PIXEL_UM, filter_name=FILTER)
    assert nrmse(wrong, truth, mask=mask) > 3 * floor_error
    # Without the conversion (FBP over the full turn) the part of the sample seen once is half-weighted.
    plain = fbp(sino_360, ANGLES_360, center_px=center_px, output_size=width, pixel_size_um=PIXEL_UM, filter_name=FILTER)
    assert nrmse(plain, truth, mask=mask) > 4 * floor_error


@pytest.mark.parametrize("center_px", [*OFFSET_CENTRES, pytest.param(80.25, id="wider-overlap")])
def test_axis_of_an_offset_centre_scan_is_recovered_to_a_fraction_of_a_pixel(center_px):
    """Measured over 8 noise seeds: |error| <= 0.06 px (rms 0.03) with 1 % noise on 13.6 px of
    overlap; without noise 0.005 px. Required: <= 0.5 px (brief), asserted <= 0.15 px."""
    width = half_acquisition_geometry(n_cols=N_COLS, center_px=center_px).width_px
    phantom = scaled(0.42 * width * PIXEL_UM)
    sino_360 = detector_sinogram(phantom, ANGLES_360, n_cols=N_COLS, center_px=center_px)
    rng = np.random.default_rng(11)
    noisy = sino_360[None] + rng.normal(0.0, 0.01 * sino_360.max(), size=(3, *sino_360.shape))  # 3 rows
    estimate = find_axis_360(noisy, ANGLES_360)
    assert abs(estimate.center_px - center_px) <= 0.15, estimate
    assert estimate.side == ("right" if center_px > N_COLS / 2 else "left")
    assert estimate.overlap_px == pytest.approx(half_acquisition_geometry(n_cols=N_COLS, center_px=center_px).overlap_px, abs=0.3)
    assert estimate.correlation > 0.9
    # The side and a search window only narrow the candidates: same answer.
    narrowed = find_axis_360(noisy, ANGLES_360, side=estimate.side, search_center_px=center_px + 3.0, search_radius_px=8.0)
    assert narrowed.center_px == pytest.approx(estimate.center_px, abs=1e-9)


def test_axis_is_found_for_angles_that_do_not_start_at_zero_and_without_exact_opposites():
    """Fly-scan-like angles: offset by a fraction of a step and an odd count, so every opposite is
    interpolated in angle."""
    center_px = 87.4
    angles = -180.0 + 0.37 + np.arange(601) * 360.0 / 601
    width = half_acquisition_geometry(n_cols=N_COLS, center_px=center_px).width_px
    phantom = scaled(0.42 * width * PIXEL_UM)
    sino_360 = detector_sinogram(phantom, angles, n_cols=N_COLS, center_px=center_px)
    assert abs(find_axis_360(sino_360, angles).center_px - center_px) <= 0.1
    half = sinogram_360_to_180(sino_360, angles, center_px=center_px)
    assert half.angles_deg.min() == pytest.approx(angles[0]) and half.angles_deg.max() < angles[0] + 180.0
    truth = rasterised(phantom, width)
    rec = fbp(half.sinograms, half.angles_deg, center_px=half.center_px, output_size=width, pixel_size_um=PIXEL_UM, filter_name=FILTER)
    assert nrmse(rec, truth, mask=disc(width, 0.42 * width)) < 0.035  # floor 0.024; interpolation in angle adds


def test_conversion_keeps_rows_independent_and_matches_slice_by_slice():
    center_px = 88.7
    phantom = scaled(300.0)
    one = detector_sinogram(phantom, ANGLES_360, n_cols=N_COLS, center_px=center_px)
    stack = np.stack([one, 0.5 * one, one[:, ::-1]])  # the third row: another object entirely
    converted = sinogram_360_to_180(stack, ANGLES_360, center_px=center_px).sinograms
    for row in range(3):
        alone = sinogram_360_to_180(stack[row], ANGLES_360, center_px=center_px).sinograms
        np.testing.assert_allclose(converted[row], alone, rtol=1e-6, atol=1e-7)


def test_centred_360_scan_reconstructs_as_well_as_a_half_turn():
    """FBP weights fold the angles modulo 180°, so a centred full turn needs no conversion; it reaches the
    same floor as the half turn (measured 0.0365 vs 0.0369) and averages two measurements of each ray."""
    center_px = (N_COLS - 1) / 2 + 3.25
    phantom = scaled(0.42 * N_COLS * PIXEL_UM)
    truth = rasterised(phantom, N_COLS)
    mask = disc(N_COLS, 0.42 * N_COLS)
    angles_180 = np.arange(300) * 180.0 / 300
    sino_360 = detector_sinogram(phantom, ANGLES_360, n_cols=N_COLS, center_px=center_px)
    sino_180 = detector_sinogram(phantom, angles_180, n_cols=N_COLS, center_px=center_px)
    rec_360 = fbp(sino_360, ANGLES_360, center_px=center_px, pixel_size_um=PIXEL_UM, filter_name=FILTER)
    rec_180 = fbp(sino_180, angles_180, center_px=center_px, pixel_size_um=PIXEL_UM, filter_name=FILTER)
    assert nrmse(rec_360, truth, mask=mask) <= 1.05 * nrmse(rec_180, truth, mask=mask)
    # The same data converted to 180° (opposed projections averaged with a ramp) agrees too.
    half = sinogram_360_to_180(sino_360, ANGLES_360, center_px=center_px)
    assert half.geometry.overlap_px == pytest.approx(N_COLS - 6.5)
    rec_half = fbp(half.sinograms, half.angles_deg, center_px=half.center_px, output_size=N_COLS,
                   pixel_size_um=PIXEL_UM, filter_name=FILTER)
    assert nrmse(rec_half, truth, mask=disc(N_COLS, 0.38 * N_COLS)) <= 1.1 * nrmse(rec_180, truth, mask=disc(N_COLS, 0.38 * N_COLS))
    # And the axis of a centred full turn is found by the same search.
    assert find_axis_360(sino_360, ANGLES_360).center_px == pytest.approx(center_px, abs=0.05)


def test_full_turn_is_recognised_from_the_angles():
    assert covers_full_turn(np.arange(400) * 0.9)
    assert covers_full_turn(-180.0 + np.arange(100) * 3.6)
    assert not covers_full_turn(np.arange(200) * 0.9)  # a half turn
    assert not covers_full_turn(np.linspace(0.0, 180.0, 201))  # a half turn with its end point
    assert not covers_full_turn(np.r_[np.arange(0, 170, 1.0), np.arange(190, 360, 1.0)])  # a 20 deg gap


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, a: sinogram_360_to_180(s[:300], a[:300], center_px=88.7), "full turn"),
        (lambda s, a: sinogram_360_to_180(s, a[:-1], center_px=88.7), "angles_deg"),
        (lambda s, a: sinogram_360_to_180(s, a, center_px=N_COLS + 1.0), "on the detector"),
        (lambda s, a: sinogram_360_to_180(s, a, center_px=N_COLS - 1.2), "overlap"),
        (lambda s, a: sinogram_360_to_180(s[None, None], a, center_px=88.7), "shape"),
        (lambda s, a: sinogram_360_to_180(np.where(s > 0.1, np.nan, s), a, center_px=88.7), "NaN"),
        (lambda s, a: sinogram_360_to_180(s > 0, a, center_px=88.7), "real numeric"),
        (lambda s, a: find_axis_360(s, a, side="up"), "side"),
        (lambda s, a: find_axis_360(s, a, min_overlap_px=1.0), "min_overlap_px"),
        (lambda s, a: find_axis_360(s, a, search_center_px=50.0), "both"),
        (lambda s, a: find_axis_360(s, a, side="left", search_center_px=80.0, search_radius_px=5.0), "no candidate"),
        (lambda s, a: find_axis_360(s[:, :6], a), "8 detector columns"),
    ],
)
def test_bad_input_is_rejected_naming_the_problem(call, message):
    sino = detector_sinogram(scaled(300.0), ANGLES_360, n_cols=N_COLS, center_px=88.7)
    with pytest.raises(ValueError, match=message):
        call(sino, ANGLES_360)
