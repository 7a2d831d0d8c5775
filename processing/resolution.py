"""Resolution estimates by Fourier ring / shell correlation (FRC / FSC) of two independent halves.

Two reconstructions of the same object from disjoint halves of the data (e.g. the even and the odd
projections) share the signal and have independent noise. Their correlation in each ring (2-D) or
shell (3-D) of spatial frequency,

    FRC(f) = Re Σ_ring A B*  /  sqrt(Σ_ring |A|² Σ_ring |B|²),

is ``SNR(f) / (1 + SNR(f))`` in expectation (SNR of one half), and the resolution is the period ``1 / f``
where the curve first drops below a threshold. Thresholds (van Heel & Schatz, J. Struct. Biol. 151,
250 (2005)):

* ``"half-bit"``: the curve at which each ring/shell of ``n`` Fourier pixels carries half a bit of
  information, ``T(n) = (0.2071 + 1.9102 / sqrt(n_eff)) / (1.2071 + 0.9102 / sqrt(n_eff))``, the right
  criterion for the FRC between two half-datasets (it adapts to the number of pixels per ring);
* ``"1/7"``: the fixed 0.143 level (Rosenthal & Henderson 2003), which van Heel & Schatz discuss as the
  common fixed-value criterion; kept for comparison with the literature.

``n_eff`` is the number of INDEPENDENT Fourier pixels in the ring: half of them for real images, whose
spectrum is Hermitian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "THRESHOLDS",
    "FourierCorrelation",
    "ResolutionEstimate",
    "fourier_correlation",
    "half_dataset_resolution",
    "resolution_from_curve",
    "threshold_curve",
]

Threshold = Literal["half-bit", "1/7"]
THRESHOLDS: tuple[str, ...] = ("half-bit", "1/7")


@dataclass(frozen=True)
class FourierCorrelation:
    """An FRC (2-D) or FSC (3-D) curve.

    Attributes
    ----------
    frequency_per_um : ndarray, shape (n_rings,)
        Centre frequency of each ring/shell (cycles per µm), from 0 up to the Nyquist frequency.
    correlation : ndarray, shape (n_rings,)
        FRC/FSC value in [-1, 1] (NaN where a ring has no power in either input).
    n_pixels : ndarray, shape (n_rings,)
        Fourier pixels in each ring/shell (full spectrum).
    """

    frequency_per_um: NDArray[np.float64]
    correlation: NDArray[np.float64]
    n_pixels: NDArray[np.int64]


@dataclass(frozen=True)
class ResolutionEstimate:
    """Where an FRC/FSC curve first falls below its threshold.

    Attributes
    ----------
    resolution_um : float
        Resolved period ``1 / frequency_per_um`` (µm). When the curve never crosses the threshold this is
        the Nyquist period (2 pixels) and ``reached_nyquist`` is True: the resolution is at least that.
    frequency_per_um : float
        Crossing frequency (cycles per µm), linearly interpolated between rings.
    threshold : str
    reached_nyquist : bool
    curve : FourierCorrelation
    """

    resolution_um: float
    frequency_per_um: float
    threshold: str
    reached_nyquist: bool
    curve: FourierCorrelation


def _check_pair(a: ArrayLike, b: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x = np.asarray(a)
    y = np.asarray(b)
    for name, arr in (("image_a", x), ("image_b", y)):
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
        if arr.ndim not in (2, 3):
            raise ValueError(f"{name} must be 2-D (FRC) or 3-D (FSC), got shape {arr.shape}")
        if min(arr.shape) < 8:
            raise ValueError(f"{name} needs at least 8 pixels along every axis, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or infinite values")
    if x.shape != y.shape:
        raise ValueError(f"image_a and image_b must have the same shape, got {x.shape} and {y.shape}")
    return x.astype(np.float64), y.astype(np.float64)


def fourier_correlation(
    image_a: ArrayLike,
    image_b: ArrayLike,
    *,
    pixel_size_um: float = 1.0,
    ring_width_px: float = 1.0,
    window: Literal["hann", "none"] = "hann",
) -> FourierCorrelation:
    """Fourier ring (2-D) or shell (3-D) correlation of two images of the same object.

    Parameters
    ----------
    image_a, image_b : array_like, shape (ny, nx) or (nz, ny, nx), same shape
        Independent reconstructions (e.g. from the even and the odd projections); any axis order as long
        as both agree. Pixels are cubic with edge ``pixel_size_um``.
    pixel_size_um : float
        Pixel (voxel) size in µm.
    ring_width_px : float
        Ring/shell width in units of the finest frequency step of the shortest axis (``1 / n_min``).
    window : {"hann", "none"}
        Apodisation applied to both inputs (after removing their means) before the FFT: a separable
        Hann window suppresses the cross-shaped leakage of the image edges, which otherwise correlates
        at all frequencies and inflates the curve. Use "none" for periodic data.

    Returns
    -------
    FourierCorrelation
        Rings from 0 up to the Nyquist frequency of the shortest axis.
    """
    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be a positive finite number, got {pixel_size_um!r}")
    if not np.isfinite(ring_width_px) or ring_width_px < 1.0:
        raise ValueError(f"ring_width_px must be >= 1, got {ring_width_px!r}")
    if window not in ("hann", "none"):
        raise ValueError(f"window must be 'hann' or 'none', got {window!r}")
    a, b = _check_pair(image_a, image_b)
    a -= a.mean()
    b -= b.mean()
    if window == "hann":
        taper = np.ones(a.shape)
        for axis, n in enumerate(a.shape):
            shape = [1] * a.ndim
            shape[axis] = n
            taper = taper * np.hanning(n).reshape(shape)
        a *= taper
        b *= taper
    spectrum_a = scipy.fft.rfftn(a)
    spectrum_b = scipy.fft.rfftn(b)
    # Radial frequency in cycles per pixel on the rfftn grid (last axis one-sided).
    grids = [scipy.fft.fftfreq(n) for n in a.shape[:-1]] + [scipy.fft.rfftfreq(a.shape[-1])]
    radius = np.sqrt(sum(g**2 for g in np.meshgrid(*grids, indexing="ij", sparse=True)))
    # Full-spectrum pixel count: the one-sided last axis stands for two pixels except at 0 and Nyquist.
    multiplicity = np.full(spectrum_a.shape[-1], 2.0)
    multiplicity[0] = 1.0
    if a.shape[-1] % 2 == 0:
        multiplicity[-1] = 1.0
    multiplicity = np.broadcast_to(multiplicity, spectrum_a.shape)
    step = ring_width_px / min(a.shape)
    n_rings = int(np.floor(0.5 / step)) + 1
    ring = np.round(radius / step).astype(np.int64)
    inside = ring < n_rings
    index = ring[inside]
    weights = multiplicity[inside]
    cross = np.bincount(index, weights=(spectrum_a * np.conj(spectrum_b)).real[inside] * weights, minlength=n_rings)
    power_a = np.bincount(index, weights=np.abs(spectrum_a[inside]) ** 2 * weights, minlength=n_rings)
    power_b = np.bincount(index, weights=np.abs(spectrum_b[inside]) ** 2 * weights, minlength=n_rings)
    counts = np.bincount(index, weights=weights, minlength=n_rings).round().astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = cross / np.sqrt(power_a * power_b)
    frequency = np.arange(n_rings) * step / float(pixel_size_um)
    return FourierCorrelation(frequency_per_um=frequency, correlation=correlation, n_pixels=counts)


def threshold_curve(n_pixels: ArrayLike, *, threshold: Threshold = "half-bit") -> NDArray[np.float64]:
    """Threshold value per ring/shell (van Heel & Schatz 2005).

    Parameters
    ----------
    n_pixels : array_like of int, shape (n_rings,)
        Fourier pixels per ring/shell (full spectrum, as :attr:`FourierCorrelation.n_pixels`).
    threshold : {"half-bit", "1/7"}

    Returns
    -------
    ndarray, shape (n_rings,), float64
    """
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    n = np.asarray(n_pixels, dtype=np.float64)
    if threshold == "1/7":
        return np.full(n.shape, 1.0 / 7.0)
    # Real data: a ring's Fourier pixels come in conjugate pairs, so half of them are independent.
    root = np.sqrt(np.maximum(n / 2.0, 1.0))
    return (0.2071 + 1.9102 / root) / (1.2071 + 0.9102 / root)


def resolution_from_curve(
    curve: FourierCorrelation, *, threshold: Threshold = "half-bit", persistence: int = 3
) -> ResolutionEstimate:
    """First crossing of the FRC/FSC below the threshold, interpolated linearly between rings.

    Parameters
    ----------
    curve : FourierCorrelation
    threshold : {"half-bit", "1/7"}
    persistence : int
        The curve must stay below the threshold for this many consecutive rings for a crossing to count.
        The innermost rings hold only a handful of Fourier pixels, so their correlation scatters by
        ~1/sqrt(n) and can dip below the (high) half-bit level by chance; a real loss of signal stays
        below. The DC ring is always skipped (it carries no resolution information).

    Returns
    -------
    ResolutionEstimate
    """
    if int(persistence) != persistence or persistence < 1:
        raise ValueError(f"persistence must be a positive integer, got {persistence!r}")
    level = threshold_curve(curve.n_pixels, threshold=threshold)
    with np.errstate(invalid="ignore"):
        below = ~(curve.correlation >= level)  # NaN (no power) counts as no correlation
    frequency = curve.frequency_per_um
    nyquist = float(frequency[-1])
    for k in range(1, below.size):
        if not below[k]:
            continue
        run = below[k : k + int(persistence)]
        if not (run.all() and (run.size == persistence or k + run.size == below.size)):
            continue
        margin_prev = curve.correlation[k - 1] - level[k - 1]
        margin_here = curve.correlation[k] - level[k]
        if k > 1 and np.isfinite(margin_prev) and np.isfinite(margin_here) and margin_prev >= 0:
            t = margin_prev / (margin_prev - margin_here)
            crossing = float(frequency[k - 1] + t * (frequency[k] - frequency[k - 1]))
        else:
            crossing = float(frequency[k])
        return ResolutionEstimate(1.0 / crossing, crossing, threshold, False, curve)
    return ResolutionEstimate(1.0 / nyquist, nyquist, threshold, True, curve)


def half_dataset_resolution(
    sinograms: ArrayLike,
    angles_deg: ArrayLike,
    *,
    center_px: float,
    pixel_size_um: float = 1.0,
    filter_name: str = "ramp",
    threshold: Threshold = "half-bit",
    method: str = "gridrec",
) -> ResolutionEstimate:
    """Resolution of a tomographic scan from the FRC/FSC of its even- and odd-projection reconstructions.

    Parameters
    ----------
    sinograms : array_like, shape (n_angles, n_cols) or (n_rows, n_angles, n_cols)
        Line integrals of one row (FRC of two slices) or several rows (FSC of two volumes).
    angles_deg : array_like, shape (n_angles,)
        Projection angles (deg); each half keeps every other projection, so each half must still cover
        180 deg.
    center_px, pixel_size_um, filter_name, method
        As in :func:`corrflow.processing.fbp.fbp_volume`.
    threshold : {"half-bit", "1/7"}

    Returns
    -------
    ResolutionEstimate
        Of ONE half-dataset (half the projections: the full scan's SNR is twice as high, so its
        resolution is at least as good).
    """
    from corrflow.processing.fbp import fbp_volume  # local: keeps this module importable on its own

    data = np.asarray(sinograms)
    if data.ndim not in (2, 3):
        raise ValueError(
            f"sinograms must have shape (n_angles, n_cols) or (n_rows, n_angles, n_cols), got {data.shape}"
        )
    stack = data if data.ndim == 3 else data[None]
    angles = np.asarray(angles_deg, dtype=np.float64)
    if angles.shape != (stack.shape[1],):
        raise ValueError(
            f"angles_deg must have shape ({stack.shape[1]},) to match the sinograms' projections, got {angles.shape}"
        )
    if stack.shape[1] < 4:
        raise ValueError(f"need at least 4 projections to split into halves, got {stack.shape[1]}")
    halves = [
        fbp_volume(stack[:, part::2], angles[part::2], center_px=center_px, pixel_size_um=pixel_size_um,
                   filter_name=filter_name, method=method)  # type: ignore[arg-type]
        for part in (0, 1)
    ]
    if data.ndim == 2:
        halves = [h[0] for h in halves]
    else:
        halves = list(halves)
    # Only the reconstruction circle holds data: crop to its inscribed square so the corners (rays that
    # miss the detector) do not enter the correlation.
    n = halves[0].shape[-1]
    side = int(np.floor(n / np.sqrt(2.0))) - 2
    lo = (n - side) // 2
    crop = (Ellipsis, slice(lo, lo + side), slice(lo, lo + side))
    curve = fourier_correlation(halves[0][crop], halves[1][crop], pixel_size_um=pixel_size_um)
    return resolution_from_curve(curve, threshold=threshold)
