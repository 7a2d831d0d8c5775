"""Mutual-information helpers shared by the 2-D and the slice-in-volume intensity registrations (private).

:mod:`~corrflow.processing.intensity_registration` (2-D images) and
:mod:`~corrflow.processing.slice_in_volume` (a 2-D image in a 3-D volume) both optimise SimpleITK's Mattes
mutual information on a robust intensity range and judge their result by normalised mutual information
and its significance against deliberately misplaced copies. The pieces they share live here; each caller
chooses its own optimizer (see ``_mattes`` and ``_mattes3d`` there).

Conventions: images are SimpleITK images in physical units (µm); ITK transforms map FIXED physical points
to MOVING physical points; a metric "value" is ITK's (the negative of the mutual information, nats).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "MAX_SAMPLES",
    "MIN_SIGNIFICANCE",
    "N_NULL",
    "mattes_method",
    "mattes_metric",
    "normalized_mutual_information",
    "null_significance",
    "robust_range",
    "run_mattes",
]

# Mattes metric samples per optimisation (a regular grid over the fixed image).
MAX_SAMPLES = 262144
# Wrong placements sampled for the significance of the NMI confidence (see null_significance).
N_NULL = 20
MIN_SIGNIFICANCE = 8.0


def robust_range(image: NDArray[np.float64]) -> NDArray[np.float64]:
    """Clip to the 0.5-99.5 percentiles before mutual information; any shape, same shape out.

    Mattes MI bins the full intensity range; a few outlier pixels (hot pixels, streaks) would otherwise
    squeeze the sample into a few bins. (Measured on the phantom's slice/micrograph pairs: 0.013 deg
    worst rotation error over 6 cases, against 0.019 deg unclipped and 0.067 deg with full histogram
    equalisation, which spreads the noise of the matrix over all bins.)
    """
    low, high = np.percentile(image, [0.5, 99.5])
    return np.clip(image, low, high) if high > low else image


def normalized_mutual_information(a: ArrayLike, b: ArrayLike, *, bins: int = 32) -> float:
    """Normalised mutual information ``(H(A) + H(B)) / H(A, B)`` of paired samples.

    Parameters
    ----------
    a, b : array_like, same shape
        Paired intensities (e.g. the overlap of two registered images), any real dtype.
    bins : int
        Histogram bins per image (equal-width between each image's 0.5 and 99.5 percentiles, so a few
        outliers do not squeeze the rest into one bin).

    Returns
    -------
    float
        1 for independent images, 2 when one image is a one-to-one function of the other.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same number of samples, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError("at least 2 paired samples are needed")
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")

    def edges(v: NDArray[np.float64]) -> NDArray[np.float64]:
        lo, hi = np.percentile(v, [0.5, 99.5])
        if hi <= lo:
            lo, hi = v.min(), v.max() + 1e-12
        return np.linspace(lo, hi, int(bins) + 1)

    ex, ey = edges(x), edges(y)
    # Bin indices by arithmetic (np.histogram2d is ~10x slower for 10^5 samples).
    ix = np.clip(((x - ex[0]) / (ex[-1] - ex[0]) * bins).astype(np.intp), 0, int(bins) - 1)
    iy = np.clip(((y - ey[0]) / (ey[-1] - ey[0]) * bins).astype(np.intp), 0, int(bins) - 1)
    joint = np.bincount(ix * int(bins) + iy, minlength=int(bins) ** 2).astype(np.float64)
    p = joint.reshape(int(bins), int(bins)) / joint.sum()

    def entropy(q: NDArray[np.float64]) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_joint = entropy(p)
    if h_joint == 0:
        return 1.0  # both constant: no information either way
    return (entropy(p.sum(axis=1)) + entropy(p.sum(axis=0))) / h_joint


def null_significance(
    nmi: float, evaluate: Callable[[NDArray[np.float64]], tuple[float, float]], *, centre_um: NDArray[np.float64],
    extent_um: float, overlap: float, n_null: int = N_NULL,
) -> tuple[float, float]:
    """How far ``nmi`` stands above the NMI of deliberately wrong placements: ``(z score, null mean)``.

    An optimiser with several degrees of freedom finds SOME mutual information even between unrelated
    images (smooth images have few independent samples), so a fixed NMI limit alone cannot tell a weak true
    match from a fitted chance one. The null distribution is sampled by moving the image in its own plane
    (``evaluate`` gets a 3x3 motion of the moving frame, µm: a rotation by 45-315 deg about ``centre_um``
    and a shift of up to a quarter of ``extent_um``) away from the solution, keeping placements whose
    overlap (the second value ``evaluate`` returns) is at least half of ``overlap``; the z score is
    ``(nmi - mean) / std`` (std at least 0.002). NaN (not assessable) if fewer than 5 placements qualify.
    """
    rng = np.random.default_rng(12345)  # fixed: the confidence of a result is reproducible
    values: list[float] = []
    for _ in range(4 * n_null):
        angle = np.radians(rng.uniform(45.0, 315.0))
        c, s = np.cos(angle), np.sin(angle)
        motion = np.eye(3)
        motion[:2, :2] = [[c, -s], [s, c]]
        motion[:2, 2] = centre_um - motion[:2, :2] @ centre_um + rng.uniform(-0.25, 0.25, 2) * extent_um
        value, covered = evaluate(motion)
        if covered >= 0.5 * overlap:
            values.append(value)
        if len(values) >= n_null:
            break
    if len(values) < 5:
        return np.nan, np.nan  # no wrong placement overlaps enough to compare with: cannot assess
    mean = float(np.mean(values))
    return (nmi - mean) / max(float(np.std(values)), 0.002), mean


def mattes_method(fixed: sitk.Image, *, bins: int) -> sitk.ImageRegistrationMethod:
    """A registration method with the Mattes metric as both registrations use it; the caller sets the optimizer.

    Samples: a regular grid of at most :data:`MAX_SAMPLES` fixed pixels (deterministic: no random-sampling
    noise in the optimum, which the accuracy goals need); linear interpolation.
    """
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(min(1.0, MAX_SAMPLES / float(np.prod(fixed.GetSize()))), 1)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def run_mattes(
    method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform,
) -> tuple[sitk.Transform, float]:
    """Run ``method`` from ``initial``; returns (final transform, metric x valid fraction).

    Candidates are compared by total information, MI per sample x fraction of samples inside the other
    image: per-sample MI alone favours starts that barely overlap (few samples, upward-biased estimate).
    Raises ``RuntimeError`` (ITK) when too few samples overlap.
    """
    method.SetInitialTransform(initial, inPlace=False)
    final = method.Execute(fixed, moving)
    sampled = method.GetMetricSamplingPercentagePerLevel()[-1] * float(np.prod(fixed.GetSize()))
    fraction = min(1.0, method.GetMetricNumberOfValidPoints() / max(sampled, 1.0))
    return final, float(method.GetMetricValue()) * fraction


def mattes_metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, *, bins: int) -> float:
    """ITK's Mattes metric (negative MI, nats) at ``transform`` over every fixed pixel."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))
