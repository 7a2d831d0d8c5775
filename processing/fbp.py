"""Filtered back-projection (parallel beam) in the corrflow geometry.

Geometry (INTERFACES.md, "Geometry conventions")
-----------------------------------------------
* ``sinogram[k, j] = ∫ f(x, y) dt`` along ``x = u_j cosθ_k + t sinθ_k, y = -u_j sinθ_k + t cosθ_k``
  with ``u_j = (j - c) * pixel_size_um``; ``c`` (``center_px``) is the detector column of the rotation
  axis, 0-based and continuous. A sample point ``(x, y)`` therefore projects onto
  ``u = x cosθ - y sinθ``, i.e. detector column ``j = c + u / pixel_size_um``.
* Output grid, ``n x n``: ``slice[iy, ix]`` is at ``x = (ix - (n-1)/2) * pixel``,
  ``y = (iy - (n-1)/2) * pixel`` (voxel = detector pixel). Volumes are ``(z, y, x)`` with z index =
  detector row index.
* Units: a sinogram of dimensionless line integrals (``mu_per_mm * mm``) reconstructs to the linear
  attenuation coefficient in 1/mm.

Algorithm
---------
Ramp filtering in the Fourier domain (scipy.fft) with the spatially band-limited discrete ramp of
Kak & Slaney (which has the correct DC value, so no cupping offset), optionally apodised
(Shepp-Logan, cosine, Hann); each projection is edge-extended to a fast FFT length ``>= 2 * cols`` so
truncated projections do not wrap around. Back-projection is vectorised over the output grid, one
angle at a time, with linear interpolation; rays that miss the detector contribute zero. Each angle
is weighted by its share of the half circle (half the gaps to its neighbours modulo 180°), so
0-180°, 0-360° and irregular angle sets are all handled.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

__all__ = ["FILTERS", "angle_weights", "fbp", "fbp_volume", "filter_sinogram", "ramp_filter"]

FilterName = Literal["ramp", "shepp-logan", "cosine", "hann"]
FILTERS: tuple[str, ...] = ("ramp", "shepp-logan", "cosine", "hann")

# Rows of a volume back-projected together: the per-angle interpolation indices are computed once and
# reused for these rows; 8 rows of 1024² float32 keep the working set near 100 MB.
_ROWS_PER_CHUNK = 8


def ramp_filter(n_padded: int, *, filter_name: FilterName = "ramp") -> NDArray[np.float64]:
    """Frequency response of the discrete ramp filter, optionally apodised.

    Parameters
    ----------
    n_padded : int
        FFT length (samples).
    filter_name : {"ramp", "shepp-logan", "cosine", "hann"}
        Apodisation window applied to the ramp, with ``f`` in cycles per sample (|f| <= 1/2):
        ramp 1; shepp-logan ``sinc(f)``; cosine ``cos(pi f)``; hann ``cos²(pi f)``.

    Returns
    -------
    ndarray, shape (n_padded // 2 + 1,), float64
        Response for :func:`scipy.fft.rfft` frequencies, for unit sample spacing (multiply the filtered
        projection by ``1 / pixel`` for physical units).
    """
    if filter_name not in FILTERS:
        raise ValueError(f"filter_name must be one of {FILTERS}, got {filter_name!r}")
    if n_padded < 2:
        raise ValueError(f"n_padded must be >= 2, got {n_padded}")
    # Spatial ramp kernel (Kak & Slaney eq. 61, unit spacing): h[0] = 1/4, h[odd n] = -1/(pi n)^2.
    n = np.concatenate([np.arange(0, n_padded // 2 + 1), np.arange(-((n_padded - 1) // 2), 0)])
    h = np.zeros(n_padded)
    h[0] = 0.25
    odd = n % 2 == 1
    h[odd] = -1.0 / (np.pi * n[odd]) ** 2
    response = np.real(scipy.fft.rfft(h))
    f = scipy.fft.rfftfreq(n_padded)
    if filter_name == "shepp-logan":
        response *= np.sinc(f)
    elif filter_name == "cosine":
        response *= np.cos(np.pi * f)
    elif filter_name == "hann":
        response *= np.cos(np.pi * f) ** 2
    return response


def angle_weights(angles_deg: ArrayLike) -> NDArray[np.float64]:
    """Quadrature weights (radians) of projection angles for back-projection over the half circle.

    Each angle gets half the gap to its two neighbours once all angles are folded modulo 180°
    (``p(θ + 180°, u) = p(θ, -u)``, so a half circle of data is complete). The weights sum to pi.

    Parameters
    ----------
    angles_deg : array_like, shape (n_angles,)

    Returns
    -------
    ndarray, shape (n_angles,), float64
    """
    angles = np.asarray(angles_deg, dtype=np.float64)
    folded = np.mod(angles, 180.0)
    order = np.argsort(folded, kind="stable")
    sorted_deg = folded[order]
    gaps = np.diff(np.concatenate([sorted_deg, [sorted_deg[0] + 180.0]]))  # gap to the next, circular
    share = 0.5 * (gaps + np.roll(gaps, 1))
    weights = np.empty_like(angles)
    weights[order] = np.radians(share)
    return weights


def _validate_geometry(
    n_angles: int, n_cols: int, angles_deg: ArrayLike, center_px: float, pixel_size_um: float,
    output_size: int | None,
) -> tuple[NDArray[np.float64], int]:
    angles = np.asarray(angles_deg, dtype=np.float64)
    if angles.ndim != 1 or angles.shape[0] != n_angles:
        raise ValueError(f"angles_deg must have shape ({n_angles},) to match the sinogram, got {angles.shape}")
    if not np.all(np.isfinite(angles)):
        raise ValueError("angles_deg contains NaN or infinite values")
    if np.unique(np.round(np.mod(angles, 180.0), 9)).size < 2:
        raise ValueError("angles_deg must contain at least two distinct directions (modulo 180 deg)")
    if n_cols < 2:
        raise ValueError(f"the sinogram needs at least 2 detector columns, got {n_cols}")
    if not np.isfinite(center_px):
        raise ValueError(f"center_px must be finite, got {center_px!r}")
    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be a positive finite number, got {pixel_size_um!r}")
    n = n_cols if output_size is None else int(output_size)
    if output_size is not None and (n != output_size or n < 1):
        raise ValueError(f"output_size must be a positive integer, got {output_size!r}")
    return angles, n


def filter_sinogram(
    sinogram: ArrayLike, *, filter_name: FilterName = "ramp", workers: int | None = None
) -> NDArray[np.float32]:
    """Ramp-filter projections along the last axis (unit pixel spacing).

    Parameters
    ----------
    sinogram : array_like, shape (..., n_cols)
        Projections; the last axis is the detector column.
    filter_name : {"ramp", "shepp-logan", "cosine", "hann"}
    workers : int, optional
        Threads for :mod:`scipy.fft`.

    Returns
    -------
    ndarray, same shape, float32
        Filtered projections in units of (input units) / pixel.
    """
    data = np.asarray(sinogram, dtype=np.float32)
    n_cols = data.shape[-1]
    n_padded = scipy.fft.next_fast_len(2 * n_cols, real=True)
    left = (n_padded - n_cols) // 2
    pad_width = [(0, 0)] * (data.ndim - 1) + [(left, n_padded - n_cols - left)]
    # Edge extension instead of zeros: a projection that does not fall to zero at the detector edge
    # (sample wider than the field of view) would otherwise see a step and get a bright rim + cupping.
    padded = np.pad(data, pad_width, mode="edge")
    spectrum = scipy.fft.rfft(padded, axis=-1, workers=workers)
    spectrum *= ramp_filter(n_padded, filter_name=filter_name).astype(np.float32)
    filtered = scipy.fft.irfft(spectrum, n=n_padded, axis=-1, workers=workers)
    return np.ascontiguousarray(filtered[..., left : left + n_cols], dtype=np.float32)


def _backproject(
    filtered: NDArray[np.float32],
    angles_deg: NDArray[np.float64],
    weights_rad: NDArray[np.float64],
    *,
    center_px: float,
    n: int,
) -> NDArray[np.float32]:
    """Back-project filtered projections ``(rows, n_angles, n_cols)`` onto ``(rows, n, n)`` grids."""
    n_rows, n_angles, n_cols = filtered.shape
    # Zero guard columns on both sides: interpolation positions are clipped into the guards, so rays
    # that miss the detector add exactly zero without a mask.
    guard = 2
    width = n_cols + 2 * guard + 1
    table = np.zeros((n_rows, n_angles, width), dtype=np.float32)
    table[:, :, guard : guard + n_cols] = filtered * weights_rad[None, :, None].astype(np.float32)
    slope = np.zeros_like(table)
    slope[:, :, :-1] = table[:, :, 1:] - table[:, :, :-1]

    grid = np.arange(n, dtype=np.float64) - (n - 1) / 2.0  # x (or y) in pixels
    theta = np.radians(angles_deg)
    out = np.zeros((n_rows, n, n), dtype=np.float32)
    position = np.empty((n, n), dtype=np.float32)
    index = np.empty((n, n), dtype=np.intp)
    value = np.empty((n, n), dtype=np.float32)
    for k in range(n_angles):
        # Column hit by (x, y): j = c + x cosθ - y sinθ; separable, so one broadcast add per angle.
        along_x = (center_px + guard + grid * np.cos(theta[k])).astype(np.float32)
        along_y = (-grid * np.sin(theta[k])).astype(np.float32)
        np.add(along_y[:, None], along_x[None, :], out=position)
        np.clip(position, 0.0, width - 2, out=position)
        index[...] = position  # truncation == floor, positions are >= 0 after the clip
        position -= index  # fractional part, the linear-interpolation weight
        for r in range(n_rows):
            np.take(slope[r, k], index, out=value)
            value *= position
            out[r] += value
            out[r] += np.take(table[r, k], index)
    return out


def fbp(
    sinogram: ArrayLike,
    angles_deg: ArrayLike,
    *,
    center_px: float,
    filter_name: FilterName = "ramp",
    output_size: int | None = None,
    pixel_size_um: float = 1.0,
) -> NDArray[np.float32]:
    """Reconstruct one slice by filtered back-projection.

    Parameters
    ----------
    sinogram : array_like, shape (n_angles, n_cols)
        Dimensionless line integrals of one detector row (axis 0 angle, axis 1 detector column).
    angles_deg : array_like, shape (n_angles,)
        Rotation-stage angles in degrees, any range (half or full turns, irregular steps).
    center_px : float
        Detector column of the rotation axis, ``c`` of the contract (0-based, continuous).
    filter_name : {"ramp", "shepp-logan", "cosine", "hann"}
        Ramp filter apodisation; later ones are smoother (less noise, less resolution).
    output_size : int, optional
        ``n`` of the ``n x n`` output grid (default ``n_cols``), centred on the rotation axis.
    pixel_size_um : float
        Detector pixel (= voxel) size in micrometres. Only scales the values: the output is
        ``mu`` in 1/mm for a sinogram of line integrals. The default 1.0 means 1 µm pixels.

    Returns
    -------
    ndarray, shape (n, n), float32
        ``slice[iy, ix]`` at ``x = (ix - (n-1)/2) * pixel_size_um``, ``y = (iy - (n-1)/2) * pixel_size_um``;
        linear attenuation in 1/mm.

    Raises
    ------
    ValueError
        Wrong shapes, NaN/inf input, fewer than two distinct directions, bad ``center_px``,
        ``pixel_size_um``, ``output_size`` or ``filter_name``.
    """
    sino = np.asarray(sinogram, dtype=np.float32)
    if sino.ndim != 2:
        raise ValueError(f"sinogram must have shape (n_angles, n_cols), got {sino.shape}")
    return fbp_volume(
        sino[None], angles_deg, center_px=center_px, filter_name=filter_name,
        output_size=output_size, pixel_size_um=pixel_size_um,
    )[0]


def fbp_volume(
    sinograms: ArrayLike,
    angles_deg: ArrayLike,
    *,
    center_px: float,
    filter_name: FilterName = "ramp",
    output_size: int | None = None,
    pixel_size_um: float = 1.0,
) -> NDArray[np.float32]:
    """Reconstruct a stack of slices (one per detector row) by filtered back-projection.

    Parameters
    ----------
    sinograms : array_like, shape (n_rows, n_angles, n_cols)
        Dimensionless line integrals, one sinogram per detector row (row 0 = lowest).
        Projections ``(n_angles, n_rows, n_cols)`` become this with ``np.swapaxes(p, 0, 1)``.
    angles_deg, center_px, filter_name, output_size, pixel_size_um
        As in :func:`fbp`; one rotation centre for all rows (an untilted axis).

    Returns
    -------
    ndarray, shape (n_rows, n, n), float32
        Volume ``(z, y, x)`` in 1/mm, z index = detector row index.
    """
    sino = np.asarray(sinograms, dtype=np.float32)
    if sino.ndim != 3:
        raise ValueError(f"sinograms must have shape (n_rows, n_angles, n_cols), got {sino.shape}")
    if filter_name not in FILTERS:
        raise ValueError(f"filter_name must be one of {FILTERS}, got {filter_name!r}")
    n_rows, n_angles, n_cols = sino.shape
    angles, n = _validate_geometry(n_angles, n_cols, angles_deg, float(center_px), float(pixel_size_um), output_size)
    if not np.all(np.isfinite(sino)):
        raise ValueError("sinograms contain NaN or infinite values")
    weights = angle_weights(angles)
    # Filtered values are per pixel; 1/pixel_mm turns them into 1/mm.
    per_mm = np.float32(1000.0 / float(pixel_size_um))
    volume = np.empty((n_rows, n, n), dtype=np.float32)
    for start in range(0, n_rows, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, n_rows)
        filtered = filter_sinogram(sino[start:stop], filter_name=filter_name)
        volume[start:stop] = _backproject(filtered, angles, weights, center_px=float(center_px), n=n)
    volume *= per_mm
    return volume
