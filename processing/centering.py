"""Automatic rotation-centre finding from opposed (θ, θ + 180°) projections.

In the contract's geometry (docs/GEOMETRY.md) a parallel-beam projection satisfies
``p(θ + 180°, u) = p(θ, -u)`` with ``u = (j - c) * pixel``: the opposed projection is the mirror image
of the first about the rotation-axis column ``c``. Flipping the opposed projection left-right
(``j -> n_cols - 1 - j``) therefore turns it into a copy of the first one shifted by
``s = 2c - (n_cols - 1)`` columns; measuring ``s`` by cross-correlation gives ``c = ((n_cols - 1) + s) / 2``.

The cross-power spectra of all available pairs (and detector rows) are summed, the integer peak of the
correlation is located on a zero-padded grid, and the peak is refined to ``1 / upsample`` px with a
matrix-multiply DFT around it (Guizar-Sicairos et al., Opt. Lett. 33, 156 (2008)) plus a parabolic
fit on the fine grid. The correlation is not phase-normalised: whitening amplifies noise and fails on
band-limited, non-periodic data (docs/STACK.md).

Alternatively (``method="vo"``), Vo, Atwood & Drakopoulos, Opt. Express 22, 19078 (2014): the
0-180° sinogram and its mirror image, shifted for a candidate centre, are stacked into a 360° sinogram;
for the right centre it is a consistent sinogram whose 2-D Fourier transform is confined to the
"bow-tie" ``|k| <= 2 pi R |w|`` (``k`` the angular harmonic, ``w`` the detector frequency in cycles/px,
``R`` the object radius in px), while a wrong centre puts a seam into it whose energy spreads
outside. The centre minimising the mean spectral magnitude outside the bow-tie is found on a coarse
grid of binned data, then on a 0.1 px grid with Fourier sub-pixel shifts and a parabolic fit.

When no projection lies exactly 180° from another (e.g. a 0–180° scan without the end point), the
opposed projection is linearly interpolated or extrapolated in angle from the two nearest projections,
if they lie within ``max_angle_gap_deg``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

__all__ = ["find_rotation_center", "opposed_pairs"]

# Angles closer than this (deg) are treated as identical.
_SAME_ANGLE_DEG = 1e-6
# Detector rows used from a projection stack: the axis is one column for all rows, so a few dozen rows
# average the noise down without the cost of all of them.
_MAX_ROWS = 32
# Pairs used at most (evenly spaced among those available).
_MAX_PAIRS = 180
# Vo's method: rows used at most, size of the binned sinogram of the coarse search, fine step (px).
_VO_MAX_ROWS = 4
_VO_COARSE_COLS = 256
_VO_COARSE_ANGLES = 360
_VO_FINE_STEP_PX = 0.1


def opposed_pairs(
    angles_deg: ArrayLike, *, max_angle_gap_deg: float | None = None
) -> list[tuple[int, int, int, float]]:
    """Projections from which the projection opposite to each angle can be formed.

    Parameters
    ----------
    angles_deg : array_like, shape (n_angles,)
    max_angle_gap_deg : float, optional
        Largest angular distance (deg) between the wanted angle ``θ_k + 180°`` and a projection used to
        interpolate it. Default: 2.5 times the median angular step, enough for a two-point
        extrapolation at the end of a 0-180° scan without the end point.

    Returns
    -------
    list of (k, a, b, w)
        The opposed projection of ``k`` is ``(1 - w) * p[a] + w * p[b]`` (``a == b`` and ``w == 0``
        when a projection lies exactly opposite; ``w`` outside [0, 1] means extrapolation).
    """
    angles = np.asarray(angles_deg, dtype=np.float64)
    if angles.ndim != 1 or angles.size < 2:
        raise ValueError(f"angles_deg must be a 1-D array of at least 2 angles, got shape {angles.shape}")
    if not np.all(np.isfinite(angles)):
        raise ValueError("angles_deg contains NaN or infinite values")
    if max_angle_gap_deg is None:
        steps = np.abs(np.diff(np.sort(np.mod(angles, 360.0))))
        steps = steps[steps > _SAME_ANGLE_DEG]
        max_angle_gap_deg = 2.5 * float(np.median(steps)) if steps.size else 0.0
    elif not np.isfinite(max_angle_gap_deg) or max_angle_gap_deg < 0:
        raise ValueError(f"max_angle_gap_deg must be a non-negative finite number, got {max_angle_gap_deg!r}")

    pairs: list[tuple[int, int, int, float]] = []
    for k, theta in enumerate(angles):
        # Signed angular distance of every projection from the wanted opposed angle, in [-180, 180).
        offset = np.mod(angles - (theta + 180.0) + 180.0, 360.0) - 180.0
        distance = np.abs(offset)
        nearest = int(np.argmin(distance))
        if distance[nearest] <= _SAME_ANGLE_DEG:
            pairs.append((k, nearest, nearest, 0.0))
            continue
        candidates = np.flatnonzero(distance <= max_angle_gap_deg)
        if candidates.size < 2:
            continue
        candidates = candidates[np.argsort(distance[candidates], kind="stable")]
        a = int(candidates[0])
        # Second point: the nearest one at a different angle (duplicates give no slope).
        others = candidates[np.abs(offset[candidates] - offset[a]) > _SAME_ANGLE_DEG]
        if others.size == 0:
            continue
        b = int(others[0])
        # Linear in angle: p(0) from p(offset_a) and p(offset_b).
        w = (0.0 - offset[a]) / (offset[b] - offset[a])
        pairs.append((k, a, b, float(w)))
    return pairs


def _background_removed(signals: NDArray[np.float64]) -> NDArray[np.float64]:
    """Subtract the straight line through the mean of the outer 2 % of columns at each edge (narrow, so
    that a sample reaching close to the detector edge does not enter the background estimate)."""
    n = signals.shape[-1]
    edge = max(2, n // 50)
    left = signals[..., :edge].mean(axis=-1, keepdims=True)
    right = signals[..., -edge:].mean(axis=-1, keepdims=True)
    ramp = np.linspace(0.0, 1.0, n)
    return signals - (left + (right - left) * ramp)


def find_rotation_center(
    sinogram_or_projections: ArrayLike,
    angles_deg: ArrayLike,
    *,
    max_angle_gap_deg: float | None = None,
    search_radius_px: float | None = None,
    upsample: int = 100,
    method: Literal["correlation", "vo"] = "correlation",
) -> float:
    """Column ``c`` of the rotation axis (0-based, continuous), from opposed projections.

    Parameters
    ----------
    sinogram_or_projections : array_like, shape (n_angles, n_cols) or (n_angles, n_rows, n_cols)
        Line integrals (``-ln`` of the transmission; transmission works too, since a straight-line
        background is removed) for one detector row or a projection stack. Axis 0 is the angle.
    angles_deg : array_like, shape (n_angles,)
        Rotation-stage angles in degrees. Needs projections about 180° apart (see :func:`opposed_pairs`).
    max_angle_gap_deg : float, optional
        See :func:`opposed_pairs`.
    search_radius_px : float, optional
        Only centres within this many columns of the detector middle ``(n_cols - 1) / 2`` are
        considered. Default: the whole detector (``"correlation"``) or its middle half (``"vo"``,
        whose cost grows with the number of candidates).
    upsample : int
        Sub-pixel resolution of the correlation-peak search, ``1 / upsample`` px before the final
        parabolic interpolation (``method="correlation"``).
    method : {"correlation", "vo"}
        Cross-correlation of opposed projections (default; any angle set with opposed pairs), or
        Vo's Fourier "bow-tie" criterion (needs evenly spaced angles covering at least 180°; uses the
        first 180° of them). Vo's method does not need the background to be flat at the detector edges.

    Returns
    -------
    float
        ``c`` in detector columns, as in ``u_j = (j - c) * pixel_size_um``.

    Raises
    ------
    ValueError
        Bad shapes, NaN/inf, too few columns, or no pair of projections about 180° apart (for
        ``method="vo"``: angles not evenly spaced over at least 180°), or an unknown ``method``.
    """
    if method not in ("correlation", "vo"):
        raise ValueError(f"method must be 'correlation' or 'vo', got {method!r}")
    data = np.asarray(sinogram_or_projections, dtype=np.float64)
    if data.ndim == 2:
        data = data[:, None, :]
    if data.ndim != 3:
        raise ValueError(
            "sinogram_or_projections must have shape (n_angles, n_cols) or (n_angles, n_rows, n_cols), "
            f"got {np.shape(sinogram_or_projections)}"
        )
    n_angles, n_rows, n_cols = data.shape
    angles = np.asarray(angles_deg, dtype=np.float64)
    if angles.shape != (n_angles,):
        raise ValueError(f"angles_deg must have shape ({n_angles},) to match axis 0 of the data, got {angles.shape}")
    if n_cols < 8:
        raise ValueError(f"need at least 8 detector columns, got {n_cols}")
    if int(upsample) != upsample or upsample < 1:
        raise ValueError(f"upsample must be a positive integer, got {upsample!r}")
    if search_radius_px is not None and (not np.isfinite(search_radius_px) or search_radius_px <= 0):
        raise ValueError(f"search_radius_px must be a positive finite number, got {search_radius_px!r}")
    if n_rows > _MAX_ROWS:
        data = data[:, np.linspace(0, n_rows - 1, _MAX_ROWS).round().astype(int), :]
    if not np.all(np.isfinite(data)):
        raise ValueError("sinogram_or_projections contains NaN or infinite values")

    if method == "vo":
        return _center_by_vo(data, angles, search_radius_px=search_radius_px)
    pairs = opposed_pairs(angles, max_angle_gap_deg=max_angle_gap_deg)
    if not pairs:
        raise ValueError(
            "angles_deg has no projections about 180 deg apart; the rotation centre cannot be found "
            "from opposed projections (scan at least 180 deg, or pass a larger max_angle_gap_deg)"
        )
    if len(pairs) > _MAX_PAIRS:
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, _MAX_PAIRS).round().astype(int)]

    k = np.array([p[0] for p in pairs])
    a = np.array([p[1] for p in pairs])
    b = np.array([p[2] for p in pairs])
    w = np.array([p[3] for p in pairs])[:, None, None]
    direct = data[k]
    opposed = (1.0 - w) * data[a] + w * data[b]
    mirrored = opposed[..., ::-1]

    # No apodisation window: a window is fixed to the detector while the two signals are shifted copies,
    # so it biases the shift as soon as the sample reaches into its taper (0.1 px at 15 px off-centre
    # was measured with a 10 % Tukey taper). Removing the straight line through the edge means already
    # brings both ends of every signal to ~0, so zero padding creates no step.
    first = _background_removed(direct).reshape(-1, n_cols)
    second = _background_removed(mirrored).reshape(-1, n_cols)
    # Zero padding to >= 2 n_cols makes the correlation linear (no wrap-around) for every possible shift.
    n_fft = scipy.fft.next_fast_len(2 * n_cols)
    cross = (scipy.fft.fft(first, n_fft, axis=-1) * np.conj(scipy.fft.fft(second, n_fft, axis=-1))).sum(axis=0)
    correlation = np.real(scipy.fft.ifft(cross))
    # correlation[s] = sum_j second[j] first[j + s], peaks at s = 2c - (n_cols - 1).
    shifts = np.fft.fftfreq(n_fft, d=1.0 / n_fft)
    allowed = np.abs(shifts) <= n_cols - 1
    if search_radius_px is not None:
        allowed &= np.abs(shifts) <= 2.0 * search_radius_px
    if not np.any(allowed):
        raise ValueError(f"search_radius_px={search_radius_px} leaves no candidate centre")
    coarse = float(shifts[np.flatnonzero(allowed)[np.argmax(correlation[allowed])]])
    limit = float(n_cols - 1) if search_radius_px is None else min(float(n_cols - 1), 2.0 * search_radius_px)

    # Upsampled DFT of the cross-power spectrum on [coarse - 1, coarse + 1] with step 1/upsample,
    # kept inside the allowed range of shifts.
    fine = coarse + np.arange(-upsample, upsample + 1) / upsample
    fine = fine[np.abs(fine) <= limit]
    frequencies = np.fft.fftfreq(n_fft)
    kernel = np.exp(2j * np.pi * np.outer(fine, frequencies))
    fine_correlation = np.real(kernel @ cross)
    i = int(np.argmax(fine_correlation))
    shift = fine[i]
    if 0 < i < fine.size - 1:
        left, mid, right = fine_correlation[i - 1 : i + 2]
        curvature = left - 2.0 * mid + right
        if curvature < 0:
            shift += 0.5 * (left - right) / curvature / upsample
    shift = float(np.clip(shift, -limit, limit))
    return float(((n_cols - 1) + shift) / 2.0)


# ------------------------------------------------------------------ Vo's method


def _half_turn(angles: NDArray[np.float64]) -> NDArray[np.intp]:
    """Indices of evenly spaced projections covering [a0, a0 + 180) (a0 = first angle), in angle order."""
    order = np.argsort(angles, kind="stable")
    start = angles[order[0]]
    within = order[angles[order] < start + 180.0 - _SAME_ANGLE_DEG]
    steps = np.diff(angles[within])
    if within.size < 8 or steps.min() <= _SAME_ANGLE_DEG:
        raise ValueError("angles_deg must hold at least 8 distinct, evenly spaced angles for method='vo'")
    step = float(np.median(steps))
    if np.abs(steps - step).max() > 0.05 * step:
        raise ValueError("method='vo' needs evenly spaced angles_deg; use method='correlation'")
    if within.size * step < 180.0 - 0.5 * step:
        raise ValueError(
            f"method='vo' needs angles_deg covering 180 deg, got {within.size} steps of {step:.4g} deg; "
            "use method='correlation'"
        )
    return within


def _bow_tie_mask(n_angles_360: int, n_cols: int) -> NDArray[np.bool_]:
    """Fourier region of a 360° sinogram ``(2 n_angles, n_cols)`` that a consistent sinogram leaves empty."""
    harmonic = np.abs(scipy.fft.fftfreq(n_angles_360) * n_angles_360)[:, None]
    frequency = np.abs(scipy.fft.fftfreq(n_cols))[None, :]
    # Objects anywhere in the field of view (radius n/2); 2 harmonics of slack for the discrete sampling;
    # the lowest detector frequencies carry the background and are left out.
    mask = harmonic > 2.0 * np.pi * (n_cols / 2.0) * frequency + 2.0
    mask &= frequency >= 1.5 / n_cols
    return mask


def _vo_metric(sinograms: NDArray[np.float64], centers: NDArray[np.float64]) -> NDArray[np.float64]:
    """Mean spectral magnitude outside the bow-tie for each candidate centre, summed over rows."""
    n_rows, n_angles, n_cols = sinograms.shape
    pad = n_cols // 2
    n_fft = scipy.fft.next_fast_len(n_cols + 2 * pad, real=True)
    # Mirror image of every projection, edge-extended so the Fourier shift does not wrap.
    mirrored = np.pad(sinograms[..., ::-1], ((0, 0), (0, 0), (pad, n_fft - n_cols - pad)), mode="edge")
    spectrum = scipy.fft.rfft(mirrored, axis=-1)
    frequency = scipy.fft.rfftfreq(n_fft)
    mask = _bow_tie_mask(2 * n_angles, n_cols)
    metric = np.zeros(centers.size)
    for i, c in enumerate(centers):
        # Mirroring about column c maps j -> 2c - j; the flip maps j -> n-1-j: shift by 2c - (n-1).
        shift = 2.0 * c - (n_cols - 1)
        opposed = scipy.fft.irfft(spectrum * np.exp(-2j * np.pi * frequency * shift), n=n_fft, axis=-1)
        full = np.concatenate([sinograms, opposed[..., pad : pad + n_cols]], axis=1)
        magnitude = np.abs(scipy.fft.fft2(full, axes=(-2, -1)))
        metric[i] = magnitude[:, mask].mean()
    return metric


def _bin(data: NDArray[np.float64], factor: int, axis: int) -> NDArray[np.float64]:
    if factor <= 1:
        return data
    n = data.shape[axis] // factor * factor
    trimmed = np.take(data, np.arange(n), axis=axis)
    shape = list(trimmed.shape)
    shape[axis : axis + 1] = [n // factor, factor]
    return trimmed.reshape(shape).mean(axis=axis + 1)


def _center_by_vo(
    data: NDArray[np.float64], angles: NDArray[np.float64], *, search_radius_px: float | None
) -> float:
    n_angles, n_rows, n_cols = data.shape
    half = data[_half_turn(angles)]
    if n_rows > _VO_MAX_ROWS:
        half = half[:, np.linspace(0, n_rows - 1, _VO_MAX_ROWS).round().astype(int)]
    sinograms = np.ascontiguousarray(half.transpose(1, 0, 2))  # (rows, angles, cols)
    middle = (n_cols - 1) / 2.0
    radius = n_cols / 4.0 if search_radius_px is None else min(float(search_radius_px), middle)
    # Coarse: binned data, one binned column per step.
    col_factor = max(1, n_cols // _VO_COARSE_COLS)
    angle_factor = max(1, sinograms.shape[1] // _VO_COARSE_ANGLES)
    binned = _bin(_bin(sinograms, col_factor, 2), angle_factor, 1)
    binned_middle = (binned.shape[-1] - 1) / 2.0
    offsets = np.arange(-np.floor(radius / col_factor), np.floor(radius / col_factor) + 1)
    coarse_metric = _vo_metric(binned, binned_middle + offsets)
    coarse = middle + offsets[int(np.argmin(coarse_metric))] * col_factor
    # Fine: full resolution, 0.1 px steps over +-1.5 binned columns, then a parabola through the minimum.
    span = 1.5 * col_factor
    fine = coarse + np.arange(-span, span + 1e-9, _VO_FINE_STEP_PX)
    fine = fine[np.abs(fine - middle) <= radius]
    fine_metric = _vo_metric(sinograms, fine)
    i = int(np.argmin(fine_metric))
    center = float(fine[i])
    if 0 < i < fine.size - 1:
        left, mid, right = fine_metric[i - 1 : i + 2]
        curvature = left - 2.0 * mid + right
        if curvature > 0:
            center += 0.5 * (left - right) / curvature * _VO_FINE_STEP_PX
    return float(np.clip(center, middle - radius, middle + radius))
