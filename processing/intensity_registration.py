"""Intensity-based multimodal 2-D registration (mutual information) with a global, exhaustive start.

Conventions
-----------
* Images are ``(rows, cols)`` arrays. Pixel ``(r, c)`` of an image with pixel size ``px`` and centre
  ``(cx, cy)`` (µm) lies at the physical point ``(cx + (c - (cols-1)/2) px, cy + (r - (rows-1)/2) px)``:
  the microscope-stage convention and the reconstructed-slice convention of docs/GEOMETRY.md (a slice has
  centre ``(0, 0)``, a micrograph centre ``(stage_x_um, stage_y_um)``).
* The result's 3x3 ``matrix`` maps MOVING physical points to FIXED physical points,
  ``[x_f, y_f, 1] = M @ [x_m, y_m, 1]`` (:mod:`corrflow.processing.registration`'s convention); with the
  slice as fixed image and the micrograph as moving image it is the in-plane ``sample_from_microscope``.

Method
------
1. **Global start (no initial guess needed).** Both images are resampled to a common coarse grid (~128 px
   over the larger field of view), clipped to their 1-99 percentiles and smoothed. For every rotation in
   ``rotation_range_deg`` (step ``rotation_step_deg``) and every scale of a geometric ladder over
   ``scale_range``, the rotated, scaled moving image is correlated with the fixed one over ALL
   translations at once (FFT), as masked normalised cross-correlation (means and energies over the
   overlap only, Padfield 2012), ranked by significance (coefficient x sqrt(overlap area), so a chance
   match of a small overlap does not win). Two features are searched: the intensity (|coefficient|: a
   contrast inverted as a whole still matches) and the gradient magnitude (edges are shared even when
   only some materials swap contrast between modalities); the best distinct starts of both are kept.
2. **Candidate selection by mutual information.** Every start is optimised on the coarse pyramid levels
   with SimpleITK (Mattes mutual information); the best metric x overlap fraction wins (per-sample MI
   alone favours starts that barely overlap).
3. **Refinement.** SimpleITK registration (Mattes MI on the 0.5-99.5 percentile range, linear
   interpolation, regular-step gradient descent with physical-shift parameter scales and modest steps)
   on the finer levels of a pyramid built once (smoothing sigma f/2 pixels, shrink f = 8-4-2-1) of the
   rigid (Euler), similarity or affine model, started from the winner.
4. **Confidence.** Normalised mutual information ``(H(F) + H(M)) / H(F, M)`` (1 for independent images,
   2 for a one-to-one intensity relation) over the overlap, its significance against deliberately
   misplaced copies of the moving image (an optimiser fits some MI even to unrelated images), and the
   overlap fraction; results below the limits raise :class:`~corrflow.processing.registration.RegistrationError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.fft
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from corrflow.processing._mutual_information import (
    MIN_SIGNIFICANCE,
    mattes_method,
    mattes_metric,
    normalized_mutual_information,
    null_significance,
    robust_range,
    run_mattes,
)
from corrflow.processing.registration import RegistrationError

__all__ = ["IntensityRegistrationResult", "normalized_mutual_information", "register_intensity"]

IntensityModel = Literal["rigid", "similarity", "affine"]
_MODELS = ("rigid", "similarity", "affine")
# Coarse grid for the exhaustive search: the larger field of view is resampled to this many pixels.
_COARSE_SIZE = 128
# Smoothing of the coarse gradient images (coarse pixels): makes the correlation peak wide enough that
# a rotation step of 10 deg cannot step over it.
_COARSE_GRADIENT_SIGMA = 1.5
# Translations whose overlap is below this fraction of the smaller image are not considered in the search
# (a tiny overlap gives a noisy, meaningless normalised correlation).
_SEARCH_MIN_OVERLAP = 0.25
# Refinement steps (see _mattes): the start is within a coarse pixel, so the first step is modest, and the
# last step is a thousandth of the first.
_FINE_LEARNING_RATE = 0.5
_FINE_MIN_STEP = 1e-3


@dataclass(frozen=True, eq=False)
class IntensityRegistrationResult:
    """A 2-D transform from intensity registration.

    Attributes
    ----------
    matrix : ndarray, shape (3, 3), float64
        Maps moving physical points (µm) to fixed physical points (µm).
    model : str
        "rigid", "similarity" or "affine".
    scale : float
        Isotropic scale (fixed µm per moving µm; for "affine" the square root of the determinant).
    rotation_deg : float
        Counter-clockwise rotation (for "affine": of the first column).
    translation_um : ndarray, shape (2,)
        ``matrix[:2, 2]``.
    mattes_mi : float
        Mutual information estimated by the Mattes metric at the solution (nats; the negative of ITK's
        metric value), at full resolution.
    nmi : float
        Normalised mutual information ``(H(F) + H(M)) / H(F, M)`` over the overlap, in [1, 2]; the
        confidence measure.
    overlap_fraction : float
        Fraction of the fixed image's pixels that the transformed moving image covers.
    n_candidates : int
        Start candidates from the exhaustive search that were optimised.
    ok : bool
        ``nmi >= min_nmi`` and ``significance >= min_significance`` (the overlap limit always raises).
    message : str
    significance : float
        ``(nmi - null_nmi) / std``: how many standard deviations the NMI stands above that of the moving
        image deliberately misplaced (rotated and shifted in its plane); NaN if no misplacement overlaps
        enough to compare.
    null_nmi : float
        Mean NMI of those misplacements.
    """

    matrix: NDArray[np.float64] = field(repr=False)
    model: str
    scale: float
    rotation_deg: float
    translation_um: NDArray[np.float64]
    mattes_mi: float
    nmi: float
    overlap_fraction: float
    n_candidates: int
    ok: bool
    message: str = ""
    significance: float = float("nan")
    null_nmi: float = float("nan")

    def as_4x4(self, *, z_um: float = 0.0) -> NDArray[np.float64]:
        """The in-plane transform as a 4x4 homogeneous matrix with z translation ``z_um``."""
        out = np.eye(4)
        out[:2, :2] = self.matrix[:2, :2]
        out[:2, 3] = self.matrix[:2, 2]
        out[2, 3] = float(z_um)
        return out


# --------------------------------------------------------------------------------------------------
# validation and small helpers
# --------------------------------------------------------------------------------------------------


def _as_image(image: ArrayLike, name: str) -> NDArray[np.float64]:
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, cols), got shape {img.shape}")
    if img.size == 0 or not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        raise ValueError(f"{name} must be a non-empty real numeric array, got dtype {img.dtype}, shape {img.shape}")
    if min(img.shape) < 16:
        raise ValueError(f"{name} must be at least 16 px along each axis, got shape {img.shape}")
    img = img.astype(np.float64)
    if not np.all(np.isfinite(img)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return img


def _positive(value: float, name: str) -> float:
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _pair(value: ArrayLike, name: str) -> NDArray[np.float64]:
    v = np.asarray(value, dtype=np.float64)
    if v.shape != (2,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be 2 finite numbers (x, y), got {value!r}")
    return v


@dataclass(frozen=True)
class _Grid:
    """Physical geometry of a 2-D image: pixel (r, c) at ``center + ((c - (cols-1)/2), (r - (rows-1)/2)) * px``."""

    shape: tuple[int, int]
    pixel_um: float
    center_um: NDArray[np.float64]

    @property
    def origin_um(self) -> tuple[float, float]:
        rows, cols = self.shape
        return (float(self.center_um[0] - (cols - 1) / 2 * self.pixel_um),
                float(self.center_um[1] - (rows - 1) / 2 * self.pixel_um))

    @property
    def extent_um(self) -> float:
        return max(self.shape) * self.pixel_um

    def points_um(self) -> NDArray[np.float64]:
        """Physical ``(x, y)`` of every pixel, shape (rows, cols, 2)."""
        rows, cols = self.shape
        x = self.origin_um[0] + np.arange(cols) * self.pixel_um
        y = self.origin_um[1] + np.arange(rows) * self.pixel_um
        xx, yy = np.meshgrid(x, y)
        return np.stack([xx, yy], axis=-1)


def _sitk_image(image: NDArray[np.float64], grid: _Grid) -> sitk.Image:
    out = sitk.GetImageFromArray(image.astype(np.float32))  # ITK index (i, j) = (col, row) -> (x, y)
    out.SetOrigin(grid.origin_um)
    out.SetSpacing((grid.pixel_um, grid.pixel_um))
    return out


def _matrix(scale: float, angle_rad: float, translation: NDArray[np.float64]) -> NDArray[np.float64]:
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    out = np.eye(3)
    out[:2, :2] = scale * np.array([[c, -s], [s, c]])
    out[:2, 2] = translation
    return out


def _rescale(image: NDArray[np.float64], factor: float) -> NDArray[np.float64]:
    """Anti-aliased zoom by ``factor`` (< 1 shrinks)."""
    if factor < 1:
        image = ndimage.gaussian_filter(image, 0.5 / factor)
    return ndimage.zoom(image, factor, order=1, mode="nearest", grid_mode=True)


# --------------------------------------------------------------------------------------------------
# confidence
# --------------------------------------------------------------------------------------------------


def _overlap_nmi(
    fixed: NDArray[np.float64], fixed_grid: _Grid, moving: NDArray[np.float64], moving_grid: _Grid,
    matrix: NDArray[np.float64], bins: int,
) -> tuple[float, float]:
    """(NMI over the overlap, overlap fraction of the fixed image) for ``matrix`` (moving -> fixed)."""
    inverse = np.linalg.inv(matrix)
    p = fixed_grid.points_um().reshape(-1, 2)
    q = p @ inverse[:2, :2].T + inverse[:2, 2]  # fixed pixel -> moving physical point
    col = (q[:, 0] - moving_grid.origin_um[0]) / moving_grid.pixel_um
    row = (q[:, 1] - moving_grid.origin_um[1]) / moving_grid.pixel_um
    rows, cols = moving_grid.shape
    inside = (col >= 0) & (col <= cols - 1) & (row >= 0) & (row <= rows - 1)
    fraction = float(inside.mean())
    if inside.sum() < 64:
        return 1.0, fraction
    sampled = ndimage.map_coordinates(moving, [row[inside], col[inside]], order=1)
    return normalized_mutual_information(fixed.ravel()[inside], sampled, bins=bins), fraction


# --------------------------------------------------------------------------------------------------
# 1. exhaustive start: gradient-magnitude masked NCC over rotations x scales x all translations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    score: float
    matrix: NDArray[np.float64]  # moving physical -> fixed physical (2-D, 3x3)
    angle_deg: float
    scale: float
    fixed_index: int  # which of the fixed images (slabs of a volume in slice-in-volume search)
    coarse_um: float  # pixel of the search grid


def _coarse_feature(image: NDArray[np.float64], grid: _Grid, coarse_um: float, feature: str) -> NDArray[np.float64]:
    """The image on the coarse search grid as smoothed intensity or smoothed gradient magnitude, standardised."""
    small = _rescale(image, grid.pixel_um / coarse_um)
    lo, hi = np.percentile(small, [1, 99])
    small = np.clip(small, lo, hi)  # a few very bright fiducials must not own every value or edge
    if feature == "gradient":
        out = ndimage.gaussian_gradient_magnitude(small, _COARSE_GRADIENT_SIGMA)
    else:
        out = ndimage.gaussian_filter(small, 1.0)
    return (out - out.mean()) / (out.std() + 1e-12)


def _search_starts(
    fixed: list[NDArray[np.float64]], fixed_grid: _Grid, moving: NDArray[np.float64], moving_grid: _Grid,
    angles_deg: NDArray[np.float64], scales: NDArray[np.float64], n_best: int,
    coarse_size: int = _COARSE_SIZE,
) -> list[_Candidate]:
    """Start candidates from two exhaustive searches, intensity and gradient magnitude, best of each first.

    Intensity correlation (absolute value: a contrast inverted as a whole still matches) is the sharper
    criterion when the modalities share most contrasts (X-ray attenuation and backscatter both grow with
    density and atomic number); gradient magnitude survives contrasts that invert for some materials only.
    Mutual information decides between the starts later.
    """
    per_feature = max(1, (n_best + 1) // 2)
    lists = [_exhaustive_search(fixed, fixed_grid, moving, moving_grid, angles_deg, scales, per_feature,
                                coarse_size=coarse_size, feature=feature) for feature in ("intensity", "gradient")]
    merged: list[_Candidate] = []
    for rank in range(per_feature):
        for candidates in lists:
            if rank < len(candidates) and not any(_same_start(candidates[rank], c) for c in merged):
                merged.append(candidates[rank])
    return merged


def _same_start(a: _Candidate, b: _Candidate) -> bool:
    """Starts close enough (fixed image, rotation, scale, translation) to converge to the same optimum."""
    return bool(a.fixed_index == b.fixed_index and _angle_difference(a.angle_deg, b.angle_deg) <= 3.0
                and abs(np.log(a.scale / b.scale)) < 0.02
                and np.abs(a.matrix[:2, 2] - b.matrix[:2, 2]).max() <= 2.0 * a.coarse_um)


def _angle_difference(a_deg: float, b_deg: float) -> float:
    return abs((a_deg - b_deg + 180.0) % 360.0 - 180.0)


def _exhaustive_search(
    fixed: list[NDArray[np.float64]], fixed_grid: _Grid, moving: NDArray[np.float64], moving_grid: _Grid,
    angles_deg: NDArray[np.float64], scales: NDArray[np.float64], n_best: int,
    coarse_size: int = _COARSE_SIZE, feature: str = "gradient",
) -> list[_Candidate]:
    """Best ``n_best`` distinct (fixed image, rotation, scale, translation) starts, by masked NCC.

    ``fixed`` holds one or more images on the same ``fixed_grid`` (e.g. slabs of a volume); every one is
    searched. The rotated, scaled moving spectra are computed once per (rotation, scale) and reused.
    ``feature`` is "gradient" (smoothed gradient magnitude, ranked by NCC) or "intensity" (smoothed
    intensity, ranked by |NCC|).
    """
    coarse_um = max(fixed_grid.extent_um, moving_grid.extent_um) / coarse_size
    gfs = [_coarse_feature(f, fixed_grid, coarse_um, feature) for f in fixed]
    gm = _coarse_feature(moving, moving_grid, coarse_um, feature)
    shape_f = gfs[0].shape
    # Canvas: holds the fixed image and the rotated moving image at every relative shift without
    # wrap-around of the circular correlation.
    size = scipy.fft.next_fast_len(int(np.ceil(np.hypot(*gm.shape) * scales.max() + np.hypot(*shape_f))) + 2,
                                   real=True)
    centre = (size - 1) / 2.0
    r0, c0 = int(round(centre - (shape_f[0] - 1) / 2)), int(round(centre - (shape_f[1] - 1) / 2))
    fixed_centre_px = np.array([c0 + (shape_f[1] - 1) / 2, r0 + (shape_f[0] - 1) / 2])  # (x, y) canvas px
    mask_f = np.zeros((size, size))
    mask_f[r0 : r0 + shape_f[0], c0 : c0 + shape_f[1]] = 1.0
    mf_spec = scipy.fft.rfft2(mask_f)
    f_specs, f2_specs = [], []
    for gf in gfs:
        canvas = np.zeros((size, size))
        canvas[r0 : r0 + shape_f[0], c0 : c0 + shape_f[1]] = gf - gf.mean()  # mean-free over its support
        f_specs.append(scipy.fft.rfft2(canvas))
        f2_specs.append(scipy.fft.rfft2(canvas**2))
    full_area = float(min(gfs[0].size, gm.size * scales.min() ** 2))
    min_area = _SEARCH_MIN_OVERLAP * full_area
    gm_centre = np.array([(gm.shape[1] - 1) / 2, (gm.shape[0] - 1) / 2])  # (x, y)
    canvas_rc = np.indices((size, size), dtype=np.float64).reshape(2, -1)

    candidates: list[tuple[float, int, float, float, NDArray[np.float64]]] = []
    for scale in scales:
        for angle in angles_deg:
            a = np.radians(angle)
            linear = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            # canvas (x, y) = centre + linear @ (moving coarse (x, y) - gm_centre); affine_transform wants the
            # inverse map in (row, col) = (y, x) order.
            matrix_rc = np.linalg.inv(linear)[::-1, ::-1]
            offset_rc = gm_centre[::-1] - matrix_rc @ np.array([centre, centre])
            warped = ndimage.affine_transform(gm, matrix_rc, offset_rc, output_shape=(size, size), order=1, cval=0.0)
            source = matrix_rc @ canvas_rc + offset_rc[:, None]
            support = ((source[0] >= 0) & (source[0] <= gm.shape[0] - 1) & (source[1] >= 0)
                       & (source[1] <= gm.shape[1] - 1)).reshape(size, size)
            warped = np.where(support, warped - warped[support].mean(), 0.0)
            m_spec = np.conj(scipy.fft.rfft2(warped))
            mm_spec = np.conj(scipy.fft.rfft2(support.astype(np.float64)))
            # Masked normalised cross-correlation (Padfield 2012): means and energies over the overlap only,
            # so a partial overlap is scored on its own content, not on the images' global means.
            # Correlations c(t) = sum_p f(p) m(p - t): the moving image displaced by t (canvas px).
            area = scipy.fft.irfft2(mf_spec * mm_spec, s=(size, size))
            sum_m = scipy.fft.irfft2(mf_spec * m_spec, s=(size, size))
            sum_m2 = scipy.fft.irfft2(mf_spec * np.conj(scipy.fft.rfft2(warped**2)), s=(size, size))
            safe_area = np.where(area > 0.5, area, 1.0)
            var_m = sum_m2 - sum_m**2 / safe_area
            base_valid = (area > min_area) & (var_m > 0)
            for index, (f_spec, f2_spec) in enumerate(zip(f_specs, f2_specs)):
                sum_f = scipy.fft.irfft2(f_spec * mm_spec, s=(size, size))
                sum_f2 = scipy.fft.irfft2(f2_spec * mm_spec, s=(size, size))
                cross = scipy.fft.irfft2(f_spec * m_spec, s=(size, size))
                var_f = sum_f2 - sum_f**2 / safe_area
                numerator = cross - sum_f * sum_m / safe_area
                denominator = np.sqrt(np.clip(var_f, 0, None) * np.clip(var_m, 0, None))
                valid = base_valid & (denominator > 1e-6 * (denominator.max() + 1e-300))
                # Rank by significance, not by the coefficient alone: a chance correlation over a small overlap
                # (few independent samples of smoothed images) can exceed the true one, whose significance
                # grows as the square root of the overlap area.
                coefficient = numerator / np.where(valid, denominator, 1.0)
                if feature == "intensity":
                    coefficient = np.abs(coefficient)
                score = np.where(valid, coefficient * np.sqrt(np.clip(area, 0, None) / full_area), -np.inf)
                best = int(np.argmax(score))
                ty, tx = np.unravel_index(best, score.shape)
                shift = np.array([tx if tx <= size // 2 else tx - size, ty if ty <= size // 2 else ty - size], float)
                candidates.append((float(score.flat[best]), index, float(angle), float(scale), shift))

    candidates.sort(key=lambda c: -c[0])
    chosen: list[_Candidate] = []
    step = float(np.min(np.diff(np.sort(angles_deg)))) if angles_deg.size > 1 else 360.0
    for score, index, angle, scale, shift in candidates:
        if not np.isfinite(score):
            break
        # Non-maximum suppression: neighbours of an already chosen start converge to the same optimum.
        if any(abs((angle - c.angle_deg + 180) % 360 - 180) <= 1.5 * step and abs(np.log(scale / c.scale)) < 0.1
               and abs(index - c.fixed_index) <= 1 for c in chosen):
            continue
        a = np.radians(angle)
        linear = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        # moving physical p -> coarse px (p - moving_center) / coarse + gm_centre -> canvas
        # centre + shift + linear @ (that - gm_centre) -> fixed physical center + (canvas - fixed_centre_px) coarse.
        translation = (fixed_grid.center_um + (np.array([centre, centre]) + shift - fixed_centre_px) * coarse_um
                       - linear @ moving_grid.center_um)
        matrix = np.eye(3)
        matrix[:2, :2] = linear
        matrix[:2, 2] = translation
        chosen.append(_Candidate(score=score, matrix=matrix, angle_deg=angle, scale=scale, fixed_index=index,
                                  coarse_um=coarse_um))
        if len(chosen) >= n_best:
            break
    return chosen


# --------------------------------------------------------------------------------------------------
# 2.-3. SimpleITK Mattes MI optimisation
# --------------------------------------------------------------------------------------------------


def _to_itk(matrix: NDArray[np.float64], model: str, center: NDArray[np.float64]) -> sitk.Transform:
    """ITK transform (fixed physical -> moving physical) for our moving -> fixed ``matrix``."""
    inverse = np.linalg.inv(matrix)
    linear, offset = inverse[:2, :2], inverse[:2, 2]
    # ITK: T(p) = A (p - c) + c + t  ==  A p + offset  =>  t = offset + A c - c
    translation = offset + linear @ center - center
    if model == "affine":
        t = sitk.AffineTransform(2)
        t.SetCenter(tuple(center))
        t.SetMatrix(tuple(linear.ravel()))
        t.SetTranslation(tuple(translation))
        return t
    angle = float(np.arctan2(linear[1, 0], linear[0, 0]))
    if model == "rigid":
        t = sitk.Euler2DTransform()
        t.SetCenter(tuple(center))
        t.SetAngle(angle)
        t.SetTranslation(tuple(translation))
        return t
    t = sitk.Similarity2DTransform()
    t.SetCenter(tuple(center))
    t.SetScale(float(np.sqrt(abs(np.linalg.det(linear)))))
    t.SetAngle(angle)
    t.SetTranslation(tuple(translation))
    return t


def _from_itk(transform: sitk.Transform) -> NDArray[np.float64]:
    """Our moving -> fixed 3x3 matrix from an ITK (fixed -> moving) 2-D matrix-offset transform."""
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0)
    linear = np.array(transform.GetMatrix()).reshape(2, 2)
    center = np.array(transform.GetCenter())
    forward = np.eye(3)
    forward[:2, :2] = linear
    forward[:2, 2] = np.array(transform.GetTranslation()) + center - linear @ center
    return np.linalg.inv(forward)


def _cast(transform: sitk.Transform, model: str) -> sitk.Transform:
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0)
    return {"rigid": sitk.Euler2DTransform, "similarity": sitk.Similarity2DTransform,
            "affine": sitk.AffineTransform}[model](transform)


def _mattes(
    fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, *, bins: int, iterations: int,
    learning_rate: float, min_step: float,
) -> tuple[sitk.Transform, float]:
    """One SimpleITK Mattes-MI optimisation on one level; returns (transform, metric x valid fraction)."""
    method = mattes_method(fixed, bins=bins)
    # Regular-step gradient descent with physical-shift parameter scales. It normalises the scaled gradient,
    # so a step is `learning_rate` physical units when the shift dominates the gradient but up to
    # `learning_rate` RADIANS when only the rotation is left: the learning rates stay below one and every
    # start comes from the exhaustive search (within half a search step of the optimum), which keeps
    # rotation-dominated first steps small enough to be undone by the step relaxation (measured: no failure
    # in 100 random cases; slice_in_volume needs a different optimizer for its tilt, see there).
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=min_step, numberOfIterations=int(iterations), relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-10,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    return run_mattes(method, fixed, moving, initial)


def _pyramid(image: sitk.Image, factors: list[int], reference_pixel_um: float) -> dict[int, sitk.Image]:
    """Smoothed, subsampled copies of ``image`` per shrink factor of the FIXED image's pixel.

    Level ``f`` is smoothed with sigma ``f/2`` fixed pixels (physical units, so both images get the same
    blur) and subsampled to about ``f`` fixed pixels, as ITK's own pyramid does, but built once and shared
    by every start candidate.
    """
    pixel = image.GetSpacing()[0]
    out = {}
    for f in factors:
        if f == 1:
            out[f] = image
            continue
        smoothed = sitk.SmoothingRecursiveGaussian(image, 0.5 * f * reference_pixel_um)
        k = max(1, int(round(f * reference_pixel_um / pixel)))
        out[f] = sitk.Shrink(smoothed, [k] * image.GetDimension()) if k > 1 else smoothed
    return out


def _shrink_schedule(grid: _Grid) -> list[int]:
    """Shrink factors per level, coarsest first, down to a ~32 px coarsest level (at most 8)."""
    return [f for f in (8, 4, 2, 1) if max(grid.shape) / f >= 32]


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def register_intensity(
    fixed: ArrayLike,
    moving: ArrayLike,
    *,
    fixed_pixel_size_um: float = 1.0,
    moving_pixel_size_um: float = 1.0,
    fixed_center_um: ArrayLike = (0.0, 0.0),
    moving_center_um: ArrayLike = (0.0, 0.0),
    model: IntensityModel = "rigid",
    initial_matrix: ArrayLike | None = None,
    rotation_range_deg: tuple[float, float] = (-180.0, 180.0),
    rotation_step_deg: float = 10.0,
    scale_range: tuple[float, float] = (1.0, 1.0),
    n_candidates: int = 3,
    histogram_bins: int = 32,
    min_overlap: float = 0.2,
    min_nmi: float = 1.03,
    min_significance: float = MIN_SIGNIFICANCE,
    raise_on_failure: bool = True,
) -> IntensityRegistrationResult:
    """Register two 2-D images of the same plane, possibly of different modalities, by mutual information.

    See the module notes for the method (exhaustive intensity- and gradient-correlation start over rotations,
    scales and translations; Mattes-MI candidate selection; SimpleITK multi-resolution refinement; NMI
    confidence with its significance against misplacements).

    Parameters
    ----------
    fixed, moving : array_like, shape (rows, cols)
        The two images (any real dtype, at least 16 px per side); different sizes, pixel sizes and
        contrasts are fine.
    fixed_pixel_size_um, moving_pixel_size_um : float
        Pixel sizes (µm).
    fixed_center_um, moving_center_um : (float, float)
        Physical position ``(x, y)`` (µm) of each image's centre in its own frame (see the conventions).
    model : {"rigid", "similarity", "affine"}
        Transform refined in step 3 (the search of step 1 is over rotation, the scales of ``scale_range``
        and translation).
    initial_matrix : array_like, shape (3, 3), optional
        A known approximate moving -> fixed transform; skips the exhaustive search (steps 1-2).
    rotation_range_deg : (float, float)
        Rotations searched in step 1 (counter-clockwise, moving -> fixed). Default: all.
    rotation_step_deg : float
        Step of the rotation search (10 deg suffices for the smoothed coarse images; see the benchmark's
        ``accuracy_rotation_180deg`` row).
    scale_range : (float, float)
        Scales searched in step 1 (geometric ladder, 8 % steps). The refinement of "similarity" and
        "affine" adjusts the scale by a few percent on its own; widen this when the scale is unknown.
    n_candidates : int
        Distinct start candidates optimised in step 2 (half from each search feature).
    histogram_bins : int
        Bins of the Mattes metric and of the NMI confidence.
    min_overlap : float
        Smallest accepted fraction of the fixed image covered by the moving image at the solution.
    min_nmi : float
        Smallest accepted normalised mutual information. Registered multimodal phantom images score
        1.06-1.13; unrelated images 1.01-1.03 (finite-sample bias, fitted by the optimiser).
    min_significance : float
        Smallest accepted significance of the NMI against misplacements (see the result's ``significance``).
    raise_on_failure : bool
        If False, a result below the limits is returned with ``ok=False`` instead of raising.

    Returns
    -------
    IntensityRegistrationResult

    Raises
    ------
    RegistrationError
        No overlap, NMI below ``min_nmi`` or significance below ``min_significance`` (with
        ``raise_on_failure``), a constant image, or an ITK failure.
    ValueError
        Bad arrays (not 2-D, too small, NaN) or options.
    """
    fixed_img = _as_image(fixed, "fixed")
    moving_img = _as_image(moving, "moving")
    fixed_grid = _Grid(fixed_img.shape, _positive(fixed_pixel_size_um, "fixed_pixel_size_um"),
                       _pair(fixed_center_um, "fixed_center_um"))
    moving_grid = _Grid(moving_img.shape, _positive(moving_pixel_size_um, "moving_pixel_size_um"),
                        _pair(moving_center_um, "moving_center_um"))
    if model not in _MODELS:
        raise ValueError(f"model must be one of {_MODELS}, got {model!r}")
    low_angle, high_angle = (float(v) for v in rotation_range_deg)
    if not (np.isfinite(low_angle) and np.isfinite(high_angle) and low_angle <= high_angle):
        raise ValueError(f"rotation_range_deg must be (low, high) with low <= high, got {rotation_range_deg!r}")
    step = _positive(rotation_step_deg, "rotation_step_deg")
    low_scale, high_scale = (float(v) for v in scale_range)
    if not (np.isfinite(low_scale) and np.isfinite(high_scale) and 0 < low_scale <= high_scale):
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
    if int(n_candidates) != n_candidates or n_candidates < 1:
        raise ValueError(f"n_candidates must be a positive integer, got {n_candidates!r}")
    if int(histogram_bins) != histogram_bins or histogram_bins < 4:
        raise ValueError(f"histogram_bins must be an integer >= 4, got {histogram_bins!r}")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap must lie in (0, 1], got {min_overlap!r}")
    if not np.isfinite(min_nmi):
        raise ValueError(f"min_nmi must be finite, got {min_nmi!r}")
    for name, img in (("fixed", fixed_img), ("moving", moving_img)):
        if np.ptp(img) == 0:
            raise RegistrationError(f"the {name} image is constant: there is nothing to register")

    # Robust intensity range for the mutual-information stages (see _mutual_information.robust_range).
    fixed_eq, moving_eq = robust_range(fixed_img), robust_range(moving_img)
    sitk_fixed = _sitk_image(fixed_eq, fixed_grid)
    sitk_moving = _sitk_image(moving_eq, moving_grid)
    centre = fixed_grid.center_um.copy()
    search_model = "similarity" if model != "rigid" else "rigid"
    levels = _shrink_schedule(fixed_grid)
    fixed_levels = _pyramid(sitk_fixed, levels, fixed_grid.pixel_um)
    moving_levels = _pyramid(sitk_moving, levels, fixed_grid.pixel_um)

    if initial_matrix is not None:
        start = np.asarray(initial_matrix, dtype=np.float64)
        if start.shape != (3, 3) or not np.all(np.isfinite(start)) or abs(np.linalg.det(start[:2, :2])) < 1e-12:
            raise ValueError(f"initial_matrix must be a finite, invertible 3x3 matrix, got {initial_matrix!r}")
        starts = [start]
    else:
        span = high_angle - low_angle
        n_angles = max(1, int(np.ceil(span / step)) + (0 if span >= 360 - 1e-9 else 1))
        angles = low_angle + np.arange(n_angles) * step
        n_scales = max(1, int(np.ceil(np.log(high_scale / low_scale) / np.log(1.08))) + 1)
        scales = np.geomspace(low_scale, high_scale, n_scales) if n_scales > 1 else np.array([low_scale])
        candidates = _search_starts([fixed_img], fixed_grid, moving_img, moving_grid, angles, scales,
                                    int(n_candidates))
        if not candidates:
            raise RegistrationError(
                "no overlap: at no rotation and translation do the images overlap by at least "
                f"{_SEARCH_MIN_OVERLAP:.0%} of the smaller one"
            )
        starts = [c.matrix for c in candidates]

    def optimise(transform: sitk.Transform, factors: list[int], learning_rate: float, min_step: float,
                 kind: str) -> tuple[sitk.Transform, float]:
        value = np.inf
        for f in factors:
            transform, value = _mattes(fixed_levels[f], moving_levels[f], transform, bins=histogram_bins,
                                       iterations=100, learning_rate=learning_rate, min_step=min_step)
            transform = _cast(transform, kind)
        return transform, value

    # Step 2: coarse optimisation of every start, keep the best Mattes metric (lower is better in ITK).
    best_transform: sitk.Transform | None = None
    best_value = np.inf
    coarse = [f for f in levels if f >= 4] or levels[:1]
    errors: list[str] = []
    for start in starts:
        try:
            transform, value = optimise(_to_itk(start, search_model, centre), coarse, 1.0, 1e-2, search_model)
        except RuntimeError as error:  # ITK: e.g. too few samples overlap for this start
            errors.append(str(error).strip().splitlines()[-1])
            continue
        if value < best_value:
            best_value, best_transform = value, transform
    if best_transform is None:
        raise RegistrationError(f"no overlap: SimpleITK could not evaluate any start ({'; '.join(errors)})")

    # Step 3: refinement of the winner on the finer levels.
    fine = [f for f in levels if f not in coarse] or levels[-1:]
    try:
        transform, _ = optimise(best_transform, fine, _FINE_LEARNING_RATE, _FINE_MIN_STEP, search_model)
        if model == "affine":
            affine = sitk.AffineTransform(2)
            affine.SetCenter(transform.GetCenter())
            affine.SetMatrix(transform.GetMatrix())
            affine.SetTranslation(transform.GetTranslation())
            transform, _ = optimise(affine, fine, 0.5 * _FINE_LEARNING_RATE, _FINE_MIN_STEP, "affine")
    except RuntimeError as error:
        raise RegistrationError(f"SimpleITK refinement failed: {str(error).strip().splitlines()[-1]}") from error

    matrix = _from_itk(transform)
    mattes_mi = -mattes_metric(sitk_fixed, sitk_moving, transform, bins=histogram_bins)
    nmi, overlap = _overlap_nmi(fixed_eq, fixed_grid, moving_eq, moving_grid, matrix, int(histogram_bins))
    significance, null_nmi = null_significance(
        nmi, lambda motion: _overlap_nmi(fixed_eq, fixed_grid, moving_eq, moving_grid, matrix @ motion,
                                         int(histogram_bins)),
        centre_um=moving_grid.center_um, extent_um=moving_grid.extent_um, overlap=overlap,
    )
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    rotation = float(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])))
    message = (
        f"{model} registration: rotation {rotation:.3f} deg, scale {scale:.5f}, translation "
        f"({matrix[0, 2]:.2f}, {matrix[1, 2]:.2f}) um; NMI {nmi:.3f} (limit {min_nmi}; wrong placements "
        f"{null_nmi:.3f}, significance {significance:.1f} sigma, limit {min_significance}), overlap {overlap:.2f} "
        f"(limit {min_overlap}), {len(starts)} start(s)"
    )
    if overlap < min_overlap:
        raise RegistrationError(f"no overlap: {message}")
    ok = nmi >= min_nmi and significance >= min_significance  # NaN (not assessable) fails
    if not ok and raise_on_failure:
        raise RegistrationError(f"intensity registration rejected (images do not share information): {message}")
    return IntensityRegistrationResult(
        matrix=matrix, model=model, scale=scale, rotation_deg=rotation, translation_um=matrix[:2, 2].copy(),
        mattes_mi=mattes_mi, nmi=float(nmi), overlap_fraction=float(overlap), n_candidates=len(starts), ok=bool(ok),
        message=message, significance=float(significance), null_nmi=float(null_nmi),
    )
