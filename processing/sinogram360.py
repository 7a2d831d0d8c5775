"""360° scans: offset-centre (half-acquisition) sinograms -> equivalent 180° sinograms, and their axis.

Geometry (the contract of :mod:`corrflow.processing.fbp`)
--------------------------------------------------------
``sinogram[k, j] = p(θ_k, u_j)`` with ``u_j = (j - c) * pixel``, ``c`` the rotation-axis column (0-based,
continuous), and a parallel beam gives ``p(θ + 180°, u) = p(θ, -u)``. With the axis near the RIGHT edge
(``c > (n - 1) / 2``) the projection at ``θ`` sees ``u ∈ [-c, n - 1 - c]`` px, the one at ``θ + 180°``,
mirrored, sees ``u ∈ [-(n - 1 - c), c]`` px: together ``[-c, c]``, an object of radius ``c`` px, up to
about twice the detector width. Both see the band ``|u| <= n - 1 - c`` around the axis: the *overlap*,
``overlap_px = n - |2c - (n - 1)|`` detector columns wide (``n`` for a centred axis).

Conversion (:func:`sinogram_360_to_180`)
----------------------------------------
For every angle ``θ`` of the first half turn ``[θ_0, θ_0 + 180°)`` the output row is the projection at
``θ`` on columns ``m = 0 .. W - 1`` (``u = m - c``, ``W = floor(2c) + 1``), continued beyond the detector
edge by the projection at ``θ + 180°`` mirrored about the axis (read at the continuous column ``2c - m``,
resampled band-limited, as FBP itself interpolates; the opposed projection is interpolated linearly in
angle when no projection lies exactly 180° away). Across the overlap the two are blended with linear weights that fall to zero at
each one's detector edge, so neither edge column (often the least reliable) leaves a seam. The output is
an ordinary 180° sinogram with its axis at column ``c`` (right side); :func:`corrflow.processing.fbp.fbp`
reconstructs it on a ``W x W`` grid. An axis near the LEFT edge is the mirror case: the data are flipped,
converted and flipped back, which keeps the angles and the sample orientation.

The same conversion of a centred 360° scan averages opposed projections with a ramp across the whole
detector; a centred 360° scan can also go straight to FBP, whose angular weights fold angles modulo 180°
(:func:`corrflow.processing.fbp.angle_weights`).

Axis (:func:`find_axis_360`)
----------------------------
The mirrored opposed projection ``q[j] = p(θ + 180°)[n - 1 - j]`` equals the direct one shifted by
``d = 2c - (n - 1)`` columns, ``q[j] = p(θ)[j + d]``, on the overlap only. ``d`` is found by maximising the
normalised cross-correlation (zero-mean, so a background or a gain difference does not bias it) of the
two over their common columns, summed over pairs of opposed projections and detector rows: first at every
integer shift (FFT correlation plus running sums), then on a 0.05 px grid around the best one with the
direct projection resampled band-limited (an all-pass shift: interpolation that smooths noise by an amount
depending on the fraction would pull the peak towards some fractions), and a parabola through the peak. Normalisation matters here: an un-normalised
correlation grows with the width of the overlap and would favour a centred axis.

Learned from algotom (``prep.conversion.convert_sinogram_360_to_180``, ``prep.calculation.find_center_360``)
and tomopy (``sino_360_to_180``); no code is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

from corrflow.processing.centering import opposed_pairs

__all__ = [
    "MIN_OVERLAP_PX",
    "AxisEstimate360",
    "HalfAcquisitionGeometry",
    "Sinogram180",
    "covers_full_turn",
    "find_axis_360",
    "half_acquisition_geometry",
    "sinogram_360_to_180",
]

Side = Literal["left", "right"]

MIN_OVERLAP_PX = 2.0
"""Smallest overlap (detector columns) the conversion accepts: the blend needs two columns."""

# Angles closer than this (deg) are the same angle.
_SAME_ANGLE_DEG = 1e-6
# Axis search: pairs and rows used at most (evenly spaced), fine grid step (px) and half-width (px).
_MAX_PAIRS = 180
_MAX_ROWS = 8
_FINE_STEP_PX = 0.05
_FINE_SPAN_PX = 1.0


@dataclass(frozen=True)
class HalfAcquisitionGeometry:
    """Where the axis of a 360° scan sits on an ``n_cols`` detector and what its 180° sinogram looks like.

    Attributes
    ----------
    n_cols
        Detector columns of the 360° data.
    center_px
        Rotation-axis column on the detector (0-based, continuous).
    side
        ``"right"`` when ``center_px >= (n_cols - 1) / 2``, else ``"left"``: the edge the axis is nearer.
    overlap_px
        Detector columns seen by both half turns: ``n_cols - |2 center_px - (n_cols - 1)|``.
    width_px
        Columns of the 180° sinogram: ``floor(2 c') + 1`` with ``c'`` the axis distance (px) from the
        FAR detector edge's first column (``c' = center_px`` on the right side,
        ``n_cols - 1 - center_px`` on the left).
    center_180_px
        Rotation-axis column of the 180° sinogram (``center_px`` on the right side).
    """

    n_cols: int
    center_px: float
    side: Side
    overlap_px: float
    width_px: int
    center_180_px: float


def half_acquisition_geometry(*, n_cols: int, center_px: float) -> HalfAcquisitionGeometry:
    """The geometry of :func:`sinogram_360_to_180` for an axis at ``center_px`` on ``n_cols`` columns.

    Raises
    ------
    ValueError
        ``n_cols < 4``, ``center_px`` not finite or outside ``[0, n_cols - 1]``, or an overlap below
        :data:`MIN_OVERLAP_PX` (the axis too close to an edge for the two halves to be blended).
    """
    if int(n_cols) != n_cols or n_cols < 4:
        raise ValueError(f"n_cols must be an integer >= 4, got {n_cols!r}")
    n_cols = int(n_cols)
    center = float(center_px)
    if not np.isfinite(center) or not 0.0 <= center <= n_cols - 1:
        raise ValueError(f"center_px={center_px!r} must lie on the detector (columns 0 .. {n_cols - 1})")
    shift = 2.0 * center - (n_cols - 1)
    overlap = n_cols - abs(shift)
    if overlap < MIN_OVERLAP_PX:
        raise ValueError(
            f"center_px={center:.3f} leaves an overlap of {overlap:.2f} px between the half turns; at least "
            f"{MIN_OVERLAP_PX:g} px are needed to blend them"
        )
    side: Side = "right" if shift >= 0 else "left"
    reach = center if side == "right" else n_cols - 1 - center  # axis to the far detector edge (px)
    width = int(np.floor(2.0 * reach + 1e-9)) + 1
    center_180 = center if side == "right" else width - 1 - reach
    return HalfAcquisitionGeometry(
        n_cols=n_cols, center_px=center, side=side, overlap_px=float(overlap), width_px=width,
        center_180_px=float(center_180),
    )


@dataclass(frozen=True, eq=False)
class Sinogram180:
    """A 180° sinogram made from a 360° one.

    Attributes
    ----------
    sinograms
        Shape ``(n_rows, n_half, width_px)`` (or ``(n_half, width_px)`` for a 2-D input), float32, same
        units as the input.
    angles_deg
        The first-half-turn angles, shape ``(n_half,)`` (deg), in input order.
    geometry
        Axis, side, overlap and width (:class:`HalfAcquisitionGeometry`); ``geometry.center_180_px`` is
        the axis column to reconstruct with.
    """

    sinograms: NDArray[np.float32]
    angles_deg: NDArray[np.float64]
    geometry: HalfAcquisitionGeometry

    @property
    def center_px(self) -> float:
        """Rotation-axis column of the 180° sinogram (px)."""
        return self.geometry.center_180_px


@dataclass(frozen=True)
class AxisEstimate360:
    """The rotation axis of a 360° scan found from its data.

    Attributes
    ----------
    center_px
        Rotation-axis column on the detector (0-based, continuous).
    overlap_px, side
        As in :class:`HalfAcquisitionGeometry`.
    correlation
        Normalised cross-correlation of the two half turns over the overlap at the axis found (1 =
        identical; below ~0.9 the overlap holds too little structure to trust the axis).
    """

    center_px: float
    overlap_px: float
    side: Side
    correlation: float


# ------------------------------------------------------------------ angles


def covers_full_turn(angles_deg: ArrayLike) -> bool:
    """Whether projection angles cover a full turn: no gap modulo 360° wider than 3 median steps.

    Parameters
    ----------
    angles_deg : array_like, shape (n_angles,)
        Rotation-stage angles (deg), any order and offset.

    Returns
    -------
    bool
        True for e.g. ``[0, 360)`` in equal steps; False for a half turn ``[0, 180]``.
    """
    angles = _angles(angles_deg)
    folded = np.unique(np.round(np.mod(angles, 360.0), 9))
    if folded.size < 4:
        return False
    gaps = np.diff(np.concatenate([folded, [folded[0] + 360.0]]))
    return bool(gaps.max() <= 3.0 * np.median(gaps))


def _angles(angles_deg: ArrayLike, n_angles: int | None = None) -> NDArray[np.float64]:
    angles = np.asarray(angles_deg, dtype=np.float64)
    if angles.ndim != 1 or (n_angles is not None and angles.shape[0] != n_angles):
        expected = "(n_angles,)" if n_angles is None else f"({n_angles},) to match axis -2 of the sinograms"
        raise ValueError(f"angles_deg must have shape {expected}, got {angles.shape}")
    if not np.all(np.isfinite(angles)):
        raise ValueError("angles_deg contains NaN or infinite values")
    return angles


def _half_turn_pairs(angles: NDArray[np.float64]) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp], NDArray[np.float64]]:
    """First-half-turn indices ``k`` and, per ``k``, the opposed projection ``(1 - w) p[a] + w p[b]``."""
    if not covers_full_turn(angles):
        raise ValueError(
            "angles_deg must cover a full turn (360 deg, no gap wider than 3 angular steps) for a 360 -> 180 "
            "conversion"
        )
    first = np.flatnonzero(angles - angles.min() < 180.0 - _SAME_ANGLE_DEG)
    pairs = {k: (a, b, w) for k, a, b, w in opposed_pairs(angles)}
    missing = [int(k) for k in first if k not in pairs]
    if missing:
        raise ValueError(f"no projection about 180 deg from angles {angles[missing[:5]].tolist()} deg")
    a = np.array([pairs[k][0] for k in first], dtype=np.intp)
    b = np.array([pairs[k][1] for k in first], dtype=np.intp)
    w = np.array([pairs[k][2] for k in first], dtype=np.float64)
    return first, a, b, w


def _sinogram_stack(sinograms: ArrayLike) -> tuple[NDArray[np.float32], bool]:
    data = np.asarray(sinograms)
    if data.dtype == np.bool_ or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ValueError(f"sinograms must be a real numeric array, got dtype {data.dtype}")
    if data.ndim not in (2, 3):
        raise ValueError(f"sinograms must have shape (n_rows, n_angles, n_cols) or (n_angles, n_cols), got {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError("sinograms contain NaN or infinite values")
    flat = data.ndim == 2
    return (data[None] if flat else data).astype(np.float32, copy=False), flat


# ------------------------------------------------------------------ conversion


def sinogram_360_to_180(sinograms: ArrayLike, angles_deg: ArrayLike, *, center_px: float) -> Sinogram180:
    """Convert a 360° sinogram with the axis anywhere on the detector into a 180° sinogram.

    Parameters
    ----------
    sinograms : array_like, shape (n_rows, n_angles, n_cols) or (n_angles, n_cols)
        Line integrals (dimensionless), one sinogram per detector row; axis -2 is the angle, axis -1 the
        detector column. Any real dtype, computed in float32.
    angles_deg : array_like, shape (n_angles,)
        Rotation-stage angles (deg) covering a full turn (see :func:`covers_full_turn`), any order; a
        projection without an exact opposite gets one interpolated linearly in angle.
    center_px : float
        Rotation-axis column on the detector (0-based, continuous), e.g. from :func:`find_axis_360`.

    Returns
    -------
    Sinogram180
        ``sinograms`` of shape ``(n_rows, n_half, width_px)`` (2-D in, 2-D out), the first-half-turn
        ``angles_deg`` and the ``geometry`` (``geometry.center_180_px`` is the axis to reconstruct with;
        reconstruct on a ``width_px`` grid).

    Raises
    ------
    ValueError
        Bad shapes or dtypes, NaN/inf, angles not covering a full turn, ``center_px`` off the detector or
        too close to its edge (overlap below :data:`MIN_OVERLAP_PX`).
    """
    data, flat = _sinogram_stack(sinograms)
    n_rows, n_angles, n_cols = data.shape
    angles = _angles(angles_deg, n_angles)
    geometry = half_acquisition_geometry(n_cols=n_cols, center_px=center_px)
    first, a, b, w = _half_turn_pairs(angles)
    if geometry.side == "left":
        # Mirror case: flipping the columns puts the axis at n - 1 - c on the right.
        data = data[..., ::-1]
        center = n_cols - 1 - geometry.center_px
    else:
        center = geometry.center_px
    width = geometry.width_px
    direct = data[:, first, :]
    opposed = (1.0 - w[None, :, None]).astype(np.float32) * data[:, a, :] + w[None, :, None].astype(np.float32) * data[:, b, :]

    m = np.arange(width, dtype=np.float64)
    low, high = 2.0 * center - (n_cols - 1), float(n_cols - 1)  # the overlap, in output columns
    # Weight of the direct projection: 1 left of the overlap, 0 beyond the detector, linear in between.
    weight = np.clip((high - m) / (high - low), 0.0, 1.0).astype(np.float32)
    out = np.zeros((n_rows, first.size, width), dtype=np.float32)
    out[..., :n_cols] = direct * weight[:n_cols]
    # The mirrored opposed projection is read at the columns 2c - m = i + frac(2c), i integer: shift it
    # by frac(2c) once (band-limited, as FBP interpolates), then index.
    top = int(np.floor(2.0 * center + 1e-9))
    shifted = _subpixel_shift(opposed, 2.0 * center - top)
    start = int(np.ceil(low - 1e-9))
    index = top - np.arange(start, width)  # in [0, n_cols - 1]
    out[..., start:] += shifted[..., index] * (1.0 - weight[start:])
    if geometry.side == "left":
        out = np.ascontiguousarray(out[..., ::-1])
    return Sinogram180(sinograms=out[0] if flat else out, angles_deg=angles[first], geometry=geometry)


def _subpixel_shift(values: NDArray[np.float32], fraction: float) -> NDArray[np.float32]:
    """``values`` (..., n) resampled at the positions ``i + fraction`` (``0 <= fraction < 1``).

    Band-limited (Fourier) interpolation, so the mirrored half is not blurred relative to the direct
    one (linear interpolation by 0.4 px raised the reconstruction error by half). The signal is
    edge-extended by its own length first, so the periodic transform does not fold one edge onto the other.
    """
    if fraction < 1e-6:
        return values
    n = values.shape[-1]
    n_fft = scipy.fft.next_fast_len(3 * n, real=True)
    left = n
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(left, n_fft - n - left)], mode="edge")
    frequency = scipy.fft.rfftfreq(n_fft)
    spectrum = scipy.fft.rfft(padded, axis=-1) * np.exp(2j * np.pi * frequency * fraction).astype(np.complex64)
    return scipy.fft.irfft(spectrum, n_fft, axis=-1)[..., left : left + n].astype(np.float32)


# ------------------------------------------------------------------ axis


def _window_sums(values: NDArray[np.float64], shifts: NDArray[np.intp], *, of_first: bool) -> NDArray[np.float64]:
    """Sum of ``values[j + d]`` (``of_first``) or ``values[j]`` over the common columns, per shift ``d``."""
    n = values.size
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    if of_first:  # indices i = j + d with j in [max(0, -d), min(n - 1, n - 1 - d)] -> i in [max(0, d), min(n - 1, n - 1 + d)]
        lo, hi = np.maximum(0, shifts), np.minimum(n - 1, n - 1 + shifts)
    else:
        lo, hi = np.maximum(0, -shifts), np.minimum(n - 1, n - 1 - shifts)
    return cumulative[hi + 1] - cumulative[lo]


def _ncc(sum_xy, sum_x, sum_y, sum_xx, sum_yy, count):  # type: ignore[no-untyped-def]
    mean_x, mean_y = sum_x / count, sum_y / count
    covariance = sum_xy / count - mean_x * mean_y
    variance = np.clip(sum_xx / count - mean_x**2, 0.0, None) * np.clip(sum_yy / count - mean_y**2, 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(variance > 0, covariance / np.sqrt(variance), -np.inf)


class _FineShifter:
    """``direct`` resampled at ``i + f`` for any ``0 <= f < 1`` from one edge-extended spectrum."""

    def __init__(self, direct: NDArray[np.float64]) -> None:
        n = direct.shape[-1]
        self.n, self.left = n, n
        self.n_fft = scipy.fft.next_fast_len(3 * n, real=True)
        padded = np.pad(direct, ((0, 0), (self.left, self.n_fft - n - self.left)), mode="edge")
        self.spectrum = scipy.fft.rfft(padded, axis=-1)
        self.frequency = scipy.fft.rfftfreq(self.n_fft)
        self.direct = direct

    def at(self, fraction: float) -> NDArray[np.float64]:
        if fraction < 1e-9:
            return self.direct
        phase = np.exp(2j * np.pi * self.frequency * fraction)
        return scipy.fft.irfft(self.spectrum * phase, self.n_fft, axis=-1)[:, self.left : self.left + self.n]


def _fine_ncc(shifter: _FineShifter, mirrored: NDArray[np.float64], shift: float) -> float:
    """NCC of ``direct(j + shift)`` and ``mirrored(j)`` over their common integer columns ``j``.

    Only ``direct`` is resampled, and band-limited: an all-pass shift keeps its noise variance. (Linear
    interpolation smooths noise by an amount that depends on the fraction, which biased the peak by
    0.15 px towards half-integer shifts.)
    """
    n = shifter.n
    base = int(np.floor(shift))
    fraction = shift - base
    moved = shifter.at(fraction)
    last = n - 1 if fraction < 1e-9 else n - 2  # direct(n - 1 + f) would be extrapolated
    j = np.arange(max(0, -base), min(n - 1, last - base) + 1)
    if j.size < 2:
        return -np.inf
    first, second = moved[:, j + base], mirrored[:, j]
    return float(
        _ncc((first * second).sum(), first.sum(), second.sum(), (first**2).sum(), (second**2).sum(), first.size)
    )


def find_axis_360(
    sinograms: ArrayLike,
    angles_deg: ArrayLike,
    *,
    side: Side | None = None,
    min_overlap_px: float = 8.0,
    search_center_px: float | None = None,
    search_radius_px: float | None = None,
) -> AxisEstimate360:
    """Rotation-axis column of a 360° scan from the match of each projection with its mirrored opposite.

    Works for an axis anywhere on the detector, in particular near an edge (offset-centre scans, where
    the two half turns share only a narrow overlap).

    Parameters
    ----------
    sinograms : array_like, shape (n_rows, n_angles, n_cols) or (n_angles, n_cols)
        Line integrals, one sinogram per detector row (a few rows suffice; at most 8, evenly spaced,
        are used). Axis -2 angle, axis -1 detector column.
    angles_deg : array_like, shape (n_angles,)
        Rotation-stage angles (deg) covering a full turn.
    side : {"left", "right"}, optional
        Only consider axes on this half of the detector (e.g. from the scan's nominal axis offset).
    min_overlap_px : float
        Only consider axes leaving at least this many columns seen by both half turns (>= 2): a
        correlation over a handful of columns is noise.
    search_center_px, search_radius_px : float, optional
        Only consider axes within ``search_radius_px`` of ``search_center_px`` (both or neither).

    Returns
    -------
    AxisEstimate360
        ``center_px`` (sub-pixel), ``overlap_px``, ``side`` and the peak ``correlation``.

    Raises
    ------
    ValueError
        Bad shapes, NaN/inf, fewer than 8 columns, angles not covering a full turn, bad options, or no
        candidate axis left by the constraints.
    """
    data, _ = _sinogram_stack(sinograms)
    n_rows, n_angles, n_cols = data.shape
    angles = _angles(angles_deg, n_angles)
    if n_cols < 8:
        raise ValueError(f"need at least 8 detector columns, got {n_cols}")
    if side not in (None, "left", "right"):
        raise ValueError(f"side must be 'left', 'right' or None, got {side!r}")
    if not np.isfinite(min_overlap_px) or not MIN_OVERLAP_PX <= min_overlap_px <= n_cols:
        raise ValueError(f"min_overlap_px must lie in [{MIN_OVERLAP_PX:g}, {n_cols}], got {min_overlap_px!r}")
    if (search_center_px is None) != (search_radius_px is None):
        raise ValueError("give both search_center_px and search_radius_px, or neither")
    if search_radius_px is not None and not (np.isfinite(search_radius_px) and search_radius_px > 0):
        raise ValueError(f"search_radius_px must be a positive finite number, got {search_radius_px!r}")
    if search_center_px is not None and not np.isfinite(search_center_px):
        raise ValueError(f"search_center_px must be finite, got {search_center_px!r}")
    first, a, b, w = _half_turn_pairs(angles)
    if first.size > _MAX_PAIRS:
        keep = np.linspace(0, first.size - 1, _MAX_PAIRS).round().astype(int)
        first, a, b, w = first[keep], a[keep], b[keep], w[keep]
    rows = data if n_rows <= _MAX_ROWS else data[np.linspace(0, n_rows - 1, _MAX_ROWS).round().astype(int)]
    rows = rows.astype(np.float64)
    direct = rows[:, first, :].reshape(-1, n_cols)
    opposed = (1.0 - w[None, :, None]) * rows[:, a, :] + w[None, :, None] * rows[:, b, :]
    mirrored = opposed[..., ::-1].reshape(-1, n_cols)

    # Candidate shifts d = 2c - (n - 1): integers with the constraints.
    limit = int(np.floor(n_cols - min_overlap_px))
    shifts = np.arange(-limit, limit + 1)
    if side == "right":
        shifts = shifts[shifts >= 0]
    elif side == "left":
        shifts = shifts[shifts <= 0]
    if search_center_px is not None:
        centers = ((n_cols - 1) + shifts) / 2.0
        shifts = shifts[np.abs(centers - search_center_px) <= search_radius_px + 0.5]  # type: ignore[operator]
    if shifts.size == 0:
        raise ValueError("side / min_overlap_px / search window leave no candidate axis")

    # Integer shifts: correlation sum_j mirrored[j] direct[j + d] by FFT, window sums by cumulative sums.
    n_fft = scipy.fft.next_fast_len(2 * n_cols)
    cross = (scipy.fft.rfft(direct, n_fft, axis=-1) * np.conj(scipy.fft.rfft(mirrored, n_fft, axis=-1))).sum(axis=0)
    correlation = scipy.fft.irfft(cross, n_fft)
    count = direct.shape[0] * (n_cols - np.abs(shifts)).astype(np.float64)
    score = _ncc(
        correlation[np.mod(shifts, n_fft)],
        _window_sums(direct.sum(axis=0), shifts, of_first=True),
        _window_sums(mirrored.sum(axis=0), shifts, of_first=False),
        _window_sums((direct**2).sum(axis=0), shifts, of_first=True),
        _window_sums((mirrored**2).sum(axis=0), shifts, of_first=False),
        count,
    )
    if not np.any(np.isfinite(score)):
        raise ValueError("the sinograms hold no structure to correlate (constant over the candidate overlaps)")
    coarse = int(shifts[int(np.argmax(score))])

    # Sub-pixel: a fine grid around the best integer shift, then a parabola through the peak.
    low, high = shifts.min() - 0.5, shifts.max() + 0.5
    fine = coarse + np.arange(-_FINE_SPAN_PX, _FINE_SPAN_PX + 1e-9, _FINE_STEP_PX)
    fine = fine[(fine >= low) & (fine <= high)]
    shifter = _FineShifter(direct)
    fine_score = np.array([_fine_ncc(shifter, mirrored, d) for d in fine])
    i = int(np.argmax(fine_score))
    shift = float(fine[i])
    if 0 < i < fine.size - 1:
        left, mid, right = fine_score[i - 1 : i + 2]
        curvature = left - 2.0 * mid + right
        if curvature < 0:
            shift += 0.5 * (left - right) / curvature * _FINE_STEP_PX
    center = ((n_cols - 1) + shift) / 2.0
    return AxisEstimate360(
        center_px=float(center),
        overlap_px=float(n_cols - abs(shift)),
        side="right" if shift >= 0 else "left",
        correlation=float(fine_score[i]),
    )
