"""Ground-truth tests of the pre-processing and quality kernels: flats before/after, stripe removal,
Paganin phase retrieval and Fourier ring/shell correlation.

Ground truths are analytic: ellipse sinograms in closed form (from test_processing_recon's helpers,
written there independently of corrflow's projector), a drifting beam with a known law, the
transport-of-intensity forward model, Fresnel propagation of a sphere's exit wave (forward physics from
corrflow.simulators, checked there against the TIE), and the expected FRC of a known Gaussian blur.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from corrflow.processing import fbp, nrmse
from corrflow.processing.normalize import line_integrals, normalize
from corrflow.processing.phase import paganin, paganin_length_um, wavelength_um
from corrflow.processing.resolution import (
    fourier_correlation,
    half_dataset_resolution,
    resolution_from_curve,
    threshold_curve,
)
from corrflow.processing.rings import remove_stripes_sorting
from corrflow.simulators.phantom import MATERIALS, Feature, Phantom
from corrflow.simulators.xray import XrayDetectorModel, xray_transmission
from corrflow.simulators.ellipses import scale_ellipses as scaled
from test_processing_recon import ELLIPSES, interior_mask, rasterised, sinogram_for

# ---------------------------------------------------------------- flats before and after


def _drifting_scan(rng, n_frames=9, rows=4, cols=6):
    """Raw frames of a beam whose intensity grows linearly with frame position, and the true line integrals."""
    truth = rng.uniform(0.1, 2.5, (n_frames, rows, cols))
    profile = 1.0 + 0.2 * np.sin(np.linspace(0, 3, cols))[None, :] * np.ones((rows, 1))
    dark = 100.0

    def beam(position):  # counts above dark at frame position `position`; 30 % drift over the scan
        return 2000.0 * profile * (1.0 + 0.3 * (position + 1) / (n_frames + 1))

    positions = np.arange(n_frames)
    projections = np.stack([dark + beam(p) * np.exp(-truth[p]) for p in positions])
    flats_before = np.stack([dark + beam(-1)] * 3)  # taken one step before the first projection
    flats_after = np.stack([dark + beam(n_frames)] * 3)  # and one step after the last
    darks = np.full((2, rows, cols), dark)
    return truth, projections, flats_before, flats_after, darks


def test_flats_before_and_after_interpolate_a_drifting_beam():
    rng = np.random.default_rng(2)
    truth, projections, before, after, darks = _drifting_scan(rng)
    both = line_integrals(projections, before, darks, flats_after=after)
    assert both.dtype == np.float32 and both.shape == truth.shape
    np.testing.assert_allclose(both, truth, atol=1e-5)  # the drift is linear: exact up to float32
    # One flat set leaves the drift in: up to ln(1.3/1.03) = 0.23 at the last frame.
    single = line_integrals(projections, before, darks)
    assert np.abs(single - truth).max() > 0.2
    # Explicit positions (e.g. times in s) give the same weights as the default frame order.
    timed = normalize(projections, before, darks, flats_after=after, frame_positions=10.0 + 2.0 * np.arange(9),
                      flat_positions=(8.0, 28.0))
    np.testing.assert_allclose(-np.log(timed), truth, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(flats_after=np.zeros((2, 4, 6))), "flats_after must be brighter than darks"),
        (dict(flats_after=np.full((2, 4, 6), np.nan)), "flats_after contains NaN"),
        (dict(flats_after=np.full((2, 4, 5), 3000.0)), "flats_after frame shape"),
        (dict(flats_after=np.full((4, 6), 3000.0), frame_positions=np.arange(8)),
         "frame_positions must have shape \\(9,\\)"),
        (dict(flats_after=np.full((4, 6), 3000.0), flat_positions=(5.0, 1.0)), "flat_positions"),
        (dict(frame_positions=np.arange(9)), "need flats_after"),
    ],
)
def test_flats_after_bad_input_is_named(kwargs, message):
    _, projections, before, _, darks = _drifting_scan(np.random.default_rng(0))
    with pytest.raises(ValueError, match=message):
        normalize(projections, before, darks, **kwargs)


def test_normalize_rejects_non_numeric_projections():
    with pytest.raises(ValueError, match="projections must be a real numeric array"):
        normalize(np.ones((2, 3, 3), dtype=bool), np.full((3, 3), 10.0), np.zeros((3, 3)))


# ---------------------------------------------------------------- stripe (ring) removal


def test_sorting_stripe_removal_suppresses_rings_and_keeps_the_sample():
    n, pixel_um = 256, 5.0
    ellipses = scaled(ELLIPSES, 0.42 * n * pixel_um, shift_um=(12.0, -7.0))
    truth = rasterised(ellipses, n, pixel_um)
    angles = np.arange(400) * 180.0 / 400
    center = (n - 1) / 2 + 1.25
    rng = np.random.default_rng(3)
    sino = sinogram_for(center, angles_deg=angles, n_cols=n, ellipses=ellipses)
    sino += rng.normal(0.0, 0.005 * sino.max(), sino.shape)
    # 12 miscalibrated detector pixels: a constant offset of 2-5 % of the largest line integral.
    columns = rng.choice(np.arange(20, n - 20), 12, replace=False)
    striped = sino.copy()
    striped[:, columns] += rng.choice([-1, 1], 12) * rng.uniform(0.02, 0.05, 12) * sino.max()
    cleaned = remove_stripes_sorting(striped, size=5)
    assert cleaned.dtype == np.float32 and cleaned.shape == striped.shape
    mask = interior_mask(truth, 4, fov_radius_px=n / 2 - 6)

    def error(s):
        return nrmse(fbp(s, angles, center_px=center, pixel_size_um=pixel_um, filter_name="hann"), truth, mask=mask)

    base, with_rings, without = error(sino), error(striped), error(cleaned)
    # Measured: 0.011 (no stripes), 0.034 (stripes), 0.015 (removed): >= 80 % of the ring error is gone.
    assert with_rings > 2.5 * base
    assert without - base < 0.25 * (with_rings - base)
    # The stripe offsets themselves leave the sinogram columns (measured: 11 % of them remain on average).
    residual = np.abs((cleaned - sino)[:, columns].mean(axis=0))
    assert residual.mean() < 0.2 * np.abs((striped - sino)[:, columns].mean(axis=0)).mean()
    # A stack of sinograms is filtered row by row.
    stack = remove_stripes_sorting(np.stack([striped, striped[:, ::-1]]), size=5)
    np.testing.assert_array_equal(stack[0], cleaned)


@pytest.mark.parametrize(
    ("data", "size", "message"),
    [
        (np.zeros(10), 5, "sinograms must have shape"),
        (np.zeros((10, 20), dtype=complex), 5, "real numeric"),
        (np.full((10, 20), np.nan), 5, "NaN"),
        (np.zeros((10, 20)), 4, "odd integer"),
        (np.zeros((10, 20)), 21, "smaller than the number of detector columns"),
    ],
)
def test_stripe_removal_rejects_bad_input(data, size, message):
    with pytest.raises(ValueError, match=message):
        remove_stripes_sorting(data, size=size)


# ---------------------------------------------------------------- Paganin phase retrieval


def test_paganin_inverts_the_transport_of_intensity_forward_model_exactly():
    # TIE for a homogeneous object: I_z = (1 - (z delta/mu) lap) exp(-mu T), in Fourier space
    # (1 + 4 pi² z delta/mu |f|²) = (1 + pi lambda z (delta/beta) |f|²). A smooth periodic mu T pins
    # the constants (lambda from keV, mm -> um, 4 pi² vs pi) independently of the code under test.
    energy_keV, distance_mm, pixel_um, delta_beta = 20.0, 250.0, 1.3, 800.0
    n = 128
    y, x = np.mgrid[0:n, 0:n] * (2 * np.pi / n)
    mu_t = 0.6 + 0.3 * np.sin(3 * x) * np.cos(2 * y) + 0.2 * np.cos(5 * x + y)
    wavelength = 1.239841984e-3 / energy_keV  # um
    mu_per_um = 1e-3  # any: only delta/beta enters
    beta = mu_per_um * wavelength / (4 * np.pi)
    z_delta_over_mu = distance_mm * 1e3 * (delta_beta * beta) / mu_per_um
    f2 = scipy.fft.fftfreq(n, d=pixel_um)[:, None] ** 2 + scipy.fft.fftfreq(n, d=pixel_um)[None, :] ** 2
    intensity = scipy.fft.ifft2(scipy.fft.fft2(np.exp(-mu_t)) * (1 + 4 * np.pi**2 * z_delta_over_mu * f2)).real
    got = paganin(intensity, energy_keV=energy_keV, distance_mm=distance_mm, pixel_size_um=pixel_um,
                  delta_beta=delta_beta)
    assert got.dtype == np.float32 and got.shape == (n, n)
    np.testing.assert_allclose(got, mu_t, atol=2e-5)
    assert wavelength_um(energy_keV) == pytest.approx(wavelength)
    # No propagation (or no phase) is plain -ln.
    plain = paganin(np.exp(-mu_t), energy_keV=energy_keV, distance_mm=0.0, pixel_size_um=pixel_um,
                    delta_beta=delta_beta)
    np.testing.assert_allclose(plain, mu_t, atol=2e-6)


def test_paganin_recovers_the_thickness_of_a_propagated_sphere():
    # Forward physics from the simulator: exit wave exp(-mu T/2 - i k delta T) of a sphere, Fresnel-
    # propagated 100 mm at 25 keV (4 um pixels); Paganin with the material's delta/beta must give the
    # chord length 2 sqrt(R² - r²) (the simulators suite checks the propagator against the TIE).
    radius, material = 120.0, MATERIALS["matrix"]
    feature = Feature("precipitate", "matrix", (0.0, 0.0, 0.0), (radius,) * 3)
    sphere = Phantom(features=(feature,), temperature_K=293.15)
    model = XrayDetectorModel(shape_px=(96, 96), pixel_size_um=4.0, incident_photons_per_s=1.0,
                              propagation_distance_mm=100.0)
    intensity = xray_transmission(sphere, model, angle_deg=0.0, x_um=0.0, y_um=0.0, z_um=0.0)
    mu_per_um = material.mu_per_mm * 1e-3
    delta_beta = material.delta / (mu_per_um * model.wavelength_um / (4 * np.pi))
    coords = (np.arange(96) - 47.5) * 4.0
    r = np.hypot(coords[None, :], coords[:, None])
    truth = 2 * np.sqrt(np.maximum(radius**2 - r**2, 0))
    inner = r < 0.8 * radius
    for pad_px in (0, 40):
        mu_t = paganin(intensity, energy_keV=model.energy_keV, distance_mm=100.0, pixel_size_um=4.0,
                       delta_beta=delta_beta, pad_px=pad_px)
        thickness = mu_t / mu_per_um
        # Measured 0.6 % (max, inner 80 %) and 0.7 % (rms, whole frame incl. the edge fringes).
        assert np.abs(thickness - truth)[inner].max() < 0.02 * 2 * radius
        assert np.sqrt(np.mean((thickness - truth) ** 2)) < 0.02 * 2 * radius
    # Without retrieval the edge fringes dominate: 29 % rms (the test above can fail).
    plain = -np.log(intensity) / mu_per_um
    assert np.sqrt(np.mean((plain - truth) ** 2)) > 0.1 * 2 * radius
    assert 5.0 < paganin_length_um(energy_keV=25.0, distance_mm=100.0, delta_beta=delta_beta) < 30.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(energy_keV=0.0), "energy_keV"),
        (dict(distance_mm=-1.0), "distance_mm"),
        (dict(pixel_size_um=np.nan), "pixel_size_um"),
        (dict(delta_beta=-5.0), "delta_beta"),
        (dict(pad_px=-1), "pad_px"),
        (dict(min_transmission=1.0), "min_transmission"),
        (dict(transmission=np.ones(5)), "transmission must have shape"),
        (dict(transmission=np.full((4, 4), np.inf)), "NaN or infinite"),
    ],
)
def test_paganin_rejects_bad_input(kwargs, message):
    args = dict(transmission=np.ones((8, 8)), energy_keV=25.0, distance_mm=100.0, pixel_size_um=1.0, delta_beta=500.0)
    args.update(kwargs)
    transmission = args.pop("transmission")
    with pytest.raises(ValueError, match=message):
        paganin(transmission, **args)


# ---------------------------------------------------------------- Fourier ring / shell correlation


def _blurred_pair(n, sigma_px, snr, seed, ndim=2):
    """Two copies of one white random object blurred by a Gaussian (exact, periodic), each with its own
    white noise: per Fourier pixel the signal power is snr * exp(-4 pi² sigma² f²), the noise power 1."""
    rng = np.random.default_rng(seed)
    shape = (n,) * ndim
    signal = rng.normal(size=shape)
    grids = [scipy.fft.fftfreq(n)] * (ndim - 1) + [scipy.fft.rfftfreq(n)]
    f2 = sum(g**2 for g in np.meshgrid(*grids, indexing="ij", sparse=True))
    blurred = scipy.fft.irfftn(scipy.fft.rfftn(signal) * np.exp(-2 * np.pi**2 * sigma_px**2 * f2), s=shape)
    noise = 1.0 / np.sqrt(snr)
    return blurred + rng.normal(0, noise, shape), blurred + rng.normal(0, noise, shape)


def _true_resolution_px(curve, sigma_px, snr, threshold):
    """Where the EXPECTED FRC, SNR(f)/(1 + SNR(f)) with SNR(f) = snr exp(-4 pi² sigma² f²), meets the threshold.

    This is how a known blur maps to a resolution: the FRC measures the frequency at which the blurred
    signal's spectral SNR falls to T/(1-T), so the blur alone does not fix it; blur AND noise level do.
    For the fixed 1/7 threshold it is closed-form, f = sqrt(ln(snr (1-T)/T)) / (2 pi sigma).
    """
    f = curve.frequency_per_um  # pixel_size_um = 1: cycles per pixel
    expected = snr * np.exp(-4 * np.pi**2 * sigma_px**2 * f**2)
    margin = expected / (1 + expected) - threshold_curve(curve.n_pixels, threshold=threshold)
    k = int(np.flatnonzero(margin[1:] < 0)[0]) + 1
    crossing = f[k - 1] + margin[k - 1] / (margin[k - 1] - margin[k]) * (f[k] - f[k - 1])
    return 1.0 / crossing


@pytest.mark.parametrize("threshold", ["half-bit", "1/7"])
@pytest.mark.parametrize(("sigma_px", "snr"), [(1.5, 100.0), (3.0, 1000.0), (1.0, 10.0)])
def test_frc_of_a_known_gaussian_blur_gives_its_resolution(threshold, sigma_px, snr):
    for seed in range(3):
        a, b = _blurred_pair(512, sigma_px, snr, seed)
        curve = fourier_correlation(a, b, window="none")
        estimate = resolution_from_curve(curve, threshold=threshold)
        true = _true_resolution_px(curve, sigma_px, snr, threshold)
        # Measured within 5 %; a factor-of-two error in the blur or the noise moves it by > 15 %.
        assert estimate.resolution_um == pytest.approx(true, rel=0.10)
        assert not estimate.reached_nyquist
    if threshold == "1/7":
        closed_form = 2 * np.pi * sigma_px / np.sqrt(np.log(snr * 6.0))
        assert true == pytest.approx(closed_form, rel=0.01)


def test_fsc_of_a_blurred_volume_and_pixel_units():
    a, b = _blurred_pair(64, 1.5, 100.0, 0, ndim=3)
    curve = fourier_correlation(a, b, window="none", pixel_size_um=0.5)
    estimate = resolution_from_curve(curve, threshold="1/7")
    # In pixels 1.5 px blur at SNR 100 -> 2 pi 1.5 / sqrt(ln 600) = 3.73 px = 1.86 um at 0.5 um/px.
    assert estimate.resolution_um == pytest.approx(0.5 * 2 * np.pi * 1.5 / np.sqrt(np.log(600.0)), rel=0.10)
    # Identical inputs correlate perfectly up to Nyquist: the estimate is the 2-pixel limit.
    same = resolution_from_curve(fourier_correlation(a, a, pixel_size_um=0.5))
    assert same.reached_nyquist and same.resolution_um == pytest.approx(1.0)


def test_half_dataset_resolution_worsens_with_noise():
    n, pixel_um = 128, 2.0
    ellipses = scaled(ELLIPSES, 0.42 * n * pixel_um)
    angles = np.arange(400) * 180.0 / 400
    center = (n - 1) / 2
    sino = sinogram_for(center, angles_deg=angles, n_cols=n, pixel_um=pixel_um, ellipses=ellipses)
    rng = np.random.default_rng(5)
    results = [
        half_dataset_resolution(sino + rng.normal(0, level * sino.max(), sino.shape), angles, center_px=center,
                                pixel_size_um=pixel_um)
        for level in (0.002, 0.05)
    ]
    assert results[1].resolution_um > 1.5 * results[0].resolution_um
    assert results[0].resolution_um >= 2 * pixel_um  # never finer than Nyquist
    with pytest.raises(ValueError, match="angles_deg must have shape"):
        half_dataset_resolution(sino, angles[:-1], center_px=center)


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        (np.zeros((16, 16)), np.zeros((16, 17)), {}, "same shape"),
        (np.zeros(16), np.zeros(16), {}, "2-D"),
        (np.zeros((4, 16)), np.zeros((4, 16)), {}, "at least 8"),
        (np.full((16, 16), np.nan), np.zeros((16, 16)), {}, "image_a contains NaN"),
        (np.zeros((16, 16)), np.zeros((16, 16)), {"pixel_size_um": 0}, "pixel_size_um"),
        (np.zeros((16, 16)), np.zeros((16, 16)), {"window": "kaiser"}, "window"),
    ],
)
def test_fourier_correlation_rejects_bad_input(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fourier_correlation(a, b, **kwargs)
