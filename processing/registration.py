"""Fiducial detection, landmark matching and microscope-to-tomography-slice registration.

Conventions
-----------
* 2-D image points are ``(x, y) = (column, row)`` in pixels, float64, shape ``(n, 2)``; the
  centre of pixel ``[row, col]`` is at ``(col, row)``.
* Physical points are ``(x, y)`` in micrometres. A micrograph pixel ``(r, c)`` images the
  microscope-stage point ``(stage_x_um + (c - (cols-1)/2) * px, stage_y_um + (r - (rows-1)/2) * px)``;
  a reconstructed-slice pixel ``[iy, ix]`` is the beamline-sample point
  ``((ix - (nx-1)/2) * voxel, (iy - (ny-1)/2) * voxel, slice_z_um)`` (docs/GEOMETRY.md).
* 2-D transforms are 3x3 homogeneous matrices mapping MOVING points to FIXED points,
  ``[x_f, y_f, 1] = M @ [x_m, y_m, 1]``; the 4x4 result follows :mod:`corrflow.processing.transforms`.

Every failure that would otherwise produce a wrong transform raises :class:`RegistrationError`
(a ``ValueError``): too few matches, collinear fiducials, ambiguous correspondences, or residuals above
the limit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.filters import threshold_otsu
from skimage.morphology import disk, white_tophat
from skimage.transform import AffineTransform, EuclideanTransform, SimilarityTransform

__all__ = [
    "MIN_SPREAD_RATIO",
    "LandmarkFit",
    "RegistrationError",
    "RegistrationResult",
    "detect_fiducials",
    "fit_landmarks",
    "match_landmarks",
    "register_microscope_to_slice",
]

Model = Literal["similarity", "rigid", "affine"]
_MODELS: tuple[str, ...] = ("similarity", "rigid", "affine")
_MINIMAL_POINTS = {"similarity": 2, "rigid": 2, "affine": 3}
_ESTIMATORS = {"similarity": SimilarityTransform, "rigid": EuclideanTransform, "affine": AffineTransform}

# Point sets whose smaller principal spread is below this fraction of the larger one are treated as
# collinear: a fit through them is poorly constrained across the line (and undetermined for affine).
MIN_SPREAD_RATIO = 0.05
# Minimal-sample hypotheses evaluated exhaustively up to this many, randomly (fixed seed) beyond.
_MAX_HYPOTHESES = 5000
# match_landmarks evaluates O(n_moving² n_fixed²) hypotheses; beyond this many points per set the
# caller should pre-select (detect_fiducials(max_count=...)).
_MAX_MATCH_POINTS = 40


class RegistrationError(ValueError):
    """Registration cannot give a trustworthy transform (too few/collinear/ambiguous matches, large residuals)."""


# --------------------------------------------------------------------------------------------------
# Fiducial detection
# --------------------------------------------------------------------------------------------------


def _as_image(image: ArrayLike, name: str) -> NDArray[np.float64]:
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, cols), got shape {img.shape}")
    if img.size == 0 or not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        raise ValueError(f"{name} must be a non-empty real numeric array, got dtype {img.dtype}, shape {img.shape}")
    img = img.astype(np.float64)
    if not np.all(np.isfinite(img)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return img


def _positive(value: float, name: str) -> float:
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def detect_fiducials(
    image: ArrayLike,
    *,
    pixel_size_um: float,
    radius_um: float,
    polarity: Literal["bright", "dark"] = "bright",
    max_count: int | None = None,
    size_tolerance: float = 0.5,
    min_snr: float = 5.0,
    exclude_border: bool = True,
    localization: Literal["disk_fit", "centroid"] = "disk_fit",
) -> NDArray[np.float64]:
    """Find round fiducial markers (spheres, their sections or projections) with sub-pixel centroids.

    Method: light Gaussian smoothing; white top-hat with a disk larger than the fiducial removes the
    background and every structure too big to be a fiducial; threshold = max(Otsu, ``min_snr`` robust
    noise sigmas); connected blobs whose half-maximum area matches a disk of ``radius_um`` (within
    ``size_tolerance``) are kept; each centroid is the background-subtracted, intensity-weighted mean
    in a disk window, re-centred three times (the clip at a quarter of the peak makes the weights fall
    continuously to zero, so pixel noise at the blob edge does not bias the centroid).

    With ``localization="disk_fit"`` (default) every centroid is then refined by a least-squares fit of a
    blurred disk on a planar background to the UNSMOOTHED image in a window around it (centre, radius, edge
    blur, amplitude and background all free; pixels of a neighbouring inclusion inside the window are
    found as outliers and left out, see :func:`_fit_disk`): the same model in every modality. The edge
    pixels carry all the position information and the fit weighs them as least squares should; the
    intensity-weighted centroid also weighs the noise of the flat interior and is pulled by neighbours.
    Measured on the benchmark's simulated backscatter micrographs (200 electrons per pixel, 16-24 µm Cu
    spheres at 3 µm pixels, 50 images): 0.055 px rms per axis against 0.060 px for the centroid, where the
    Cramér-Rao bound is 0.044 px and the simulator's own 2x2 sub-pixel rendering of the disks puts 0.022 px
    rms into them; with a pore 4 px from every fiducial's edge, 0.07 px (radial) against 0.13 px. A fit
    that does not converge or leaves the blob keeps the centroid.

    Parameters
    ----------
    image : array_like, shape (rows, cols)
        Micrograph or reconstructed slice, any real dtype.
    pixel_size_um : float
        Pixel size in micrometres.
    radius_um : float
        Expected fiducial radius in micrometres (>= 1 px).
    polarity : {"bright", "dark"}
        Whether fiducials are brighter or darker than their surroundings.
    max_count : int, optional
        Keep at most this many, the strongest (integrated signal) first.
    size_tolerance : float
        Accepted half-maximum radius: ``radius * (1 ± size_tolerance)``.
    min_snr : float
        The detection threshold is at least this many robust noise sigmas of the top-hat image.
    exclude_border : bool
        Drop blobs whose centre lies within ``radius + 1`` px of the image border (cut-off blobs have
        biased centroids).
    localization : {"disk_fit", "centroid"}
        Sub-pixel centre: a blurred-disk model fit (see above) or the intensity-weighted centroid alone.

    Returns
    -------
    ndarray, shape (n, 2), float64
        Centroids ``(x, y) = (column, row)`` in pixels, strongest first; ``n`` may be 0.
    """
    img = _as_image(image, "image")
    pixel = _positive(pixel_size_um, "pixel_size_um")
    radius_px = _positive(radius_um, "radius_um") / pixel
    if radius_px < 1.0:
        raise ValueError(
            f"radius_um={radius_um} is {radius_px:.2f} px at pixel_size_um={pixel_size_um}: "
            "fiducials must be at least 1 px in radius to be detected"
        )
    if polarity not in ("bright", "dark"):
        raise ValueError(f"polarity must be 'bright' or 'dark', got {polarity!r}")
    if max_count is not None and (int(max_count) != max_count or max_count < 1):
        raise ValueError(f"max_count must be a positive integer or None, got {max_count!r}")
    if not 0 < size_tolerance < 1:
        raise ValueError(f"size_tolerance must lie in (0, 1), got {size_tolerance!r}")
    if not np.isfinite(min_snr) or min_snr <= 0:
        raise ValueError(f"min_snr must be a positive finite number, got {min_snr!r}")
    if localization not in ("disk_fit", "centroid"):
        raise ValueError(f"localization must be 'disk_fit' or 'centroid', got {localization!r}")
    if polarity == "dark":
        img = -img

    smooth_sigma = max(0.5, radius_px / 4.0)
    smoothed = ndimage.gaussian_filter(img, smooth_sigma)
    opening_radius = int(np.ceil(1.5 * radius_px + 2.0 * smooth_sigma))
    tophat = white_tophat(smoothed, footprint=disk(opening_radius, decomposition="sequence"))

    median = float(np.median(tophat))
    noise = 1.4826 * float(np.median(np.abs(tophat - median)))
    floor = median + min_snr * noise
    try:
        otsu = float(threshold_otsu(tophat))
    except ValueError:  # constant image: nothing to find
        return np.empty((0, 2))
    threshold = max(otsu, floor)
    labels, n_labels = ndimage.label(tophat > threshold, structure=np.ones((3, 3)))
    if n_labels == 0:
        return np.empty((0, 2))

    rows, cols = np.indices(img.shape, dtype=np.float64)
    window_radius = radius_px + 2.0 * smooth_sigma + 2.0
    margin = radius_px + 1.0
    min_radius, max_radius = radius_px * (1 - size_tolerance), radius_px * (1 + size_tolerance)
    found: list[tuple[float, float, float]] = []  # (strength, x, y)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        # Work in a padded bounding box; the window never needs more than window_radius around the blob.
        pad = int(np.ceil(window_radius)) + 1
        r0, r1 = max(region[0].start - pad, 0), min(region[0].stop + pad, img.shape[0])
        c0, c1 = max(region[1].start - pad, 0), min(region[1].stop + pad, img.shape[1])
        patch = tophat[r0:r1, c0:c1]
        inside = labels[r0:r1, c0:c1] == index
        peak = float(patch[inside].max())
        # Half-maximum area of this blob alone (connected to its own label) measures its size
        # independently of where the global threshold happened to fall.
        half, _ = ndimage.label(patch >= 0.5 * peak)
        own = np.unique(half[inside & (patch >= 0.5 * peak)])
        half_area = float(np.isin(half, own[own > 0]).sum())
        half_radius = np.sqrt(half_area / np.pi)
        if not min_radius <= half_radius <= max_radius:
            continue
        pr, pc = rows[r0:r1, c0:c1], cols[r0:r1, c0:c1]
        weights = np.where(inside, patch, 0.0)
        y = float((weights * pr).sum() / weights.sum())
        x = float((weights * pc).sum() / weights.sum())
        for _ in range(3):
            window = (pr - y) ** 2 + (pc - x) ** 2 <= window_radius**2
            weights = np.where(window, np.clip(patch - 0.25 * peak, 0.0, None), 0.0)
            total = weights.sum()
            if total <= 0:
                break
            y = float((weights * pr).sum() / total)
            x = float((weights * pc).sum() / total)
        if exclude_border and not (
            margin <= x <= img.shape[1] - 1 - margin and margin <= y <= img.shape[0] - 1 - margin
        ):
            continue
        strength = float(weights.sum())
        if localization == "disk_fit":
            fitted = _fit_disk(img, x, y, radius_px=radius_px)
            if fitted is not None:
                x, y = fitted
        found.append((strength, x, y))
    found.sort(key=lambda item: -item[0])
    if max_count is not None:
        found = found[: int(max_count)]
    return np.array([(x, y) for _, x, y in found], dtype=np.float64).reshape(-1, 2)


_SQRT2 = float(np.sqrt(2.0))
_SQRT_PI = float(np.sqrt(np.pi))
# Residuals beyond this many robust sigmas of the Cauchy fit mark a neighbour's pixels in _fit_disk (4: a pore
# next to every fiducial costs nothing, measured 0.073 px with and without; 5 lets its blurred edge pull).
_DISK_OUTLIER_SIGMAS = 4.0


def _fit_disk(image: NDArray[np.float64], x0: float, y0: float, *, radius_px: float) -> tuple[float, float] | None:
    """Least-squares centre ``(x, y)`` (px) of one bright disk near ``(x0, y0)``, or None if the fit fails.

    Model over a disk window of radius ``R0 + 3 s0 + 2`` px (``R0 = radius_px``, ``s0 = 1`` px) around the
    start: ``b0 + b1 (x - x0) + b2 (y - y0) + a * erfc((|p - c| - R) / (sqrt(2) s)) / 2``, a disk of radius
    ``R`` with a Gaussian edge of width ``s`` on a planar background; all 8 parameters free. The model is
    radially symmetric, so an error in its profile (a small disk is not exactly an erfc edge; pixel
    averaging, probe or reconstruction blur) does not move the centre. Three fits: plain least squares; a
    Cauchy loss at 3 robust residual sigmas, which discounts a neighbouring inclusion inside the window; and
    plain least squares again without the pixels more than :data:`_DISK_OUTLIER_SIGMAS` robust sigmas off
    that fit, grown by one pixel (the inclusion and its blurred edge). Rejected (None): no convergence, a
    centre more than half a radius from the start, a radius at a bound, or more than half the window
    rejected.
    """
    from scipy.optimize import least_squares  # local: only the fit needs it
    from scipy.special import erfc

    rows, cols = image.shape
    blur0 = 1.0
    half = int(np.ceil(radius_px + 3.0 * blur0 + 2.0))
    r0, r1 = max(int(round(y0)) - half, 0), min(int(round(y0)) + half + 1, rows)
    c0, c1 = max(int(round(x0)) - half, 0), min(int(round(x0)) + half + 1, cols)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    window = (yy - y0) ** 2 + (xx - x0) ** 2 <= half**2
    x = xx[window].astype(np.float64)
    y = yy[window].astype(np.float64)
    values = image[r0:r1, c0:c1][window]
    dx0, dy0 = x - x0, y - y0
    distance = np.hypot(dx0, dy0)
    inner, outer = distance < 0.5 * radius_px, distance > radius_px + 2.0 * blur0
    if inner.sum() < 1 or outer.sum() < 8:
        return None
    background = float(np.median(values[outer]))
    amplitude = float(np.median(values[inner])) - background
    if not amplitude > 0:
        return None
    low = np.array([x0 - radius_px, y0 - radius_px, 0.3 * radius_px, 0.2, 0.0, -np.inf, -np.inf, -np.inf])
    high = np.array([x0 + radius_px, y0 + radius_px, 2.5 * radius_px, max(3.0, radius_px), np.inf, np.inf,
                     np.inf, np.inf])
    start = np.clip(np.array([x0, y0, radius_px, blur0, amplitude, background, 0.0, 0.0]), low + 1e-9, high - 1e-9)

    def edge(p: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        r = np.hypot(x - p[0], y - p[1])
        return r, (r - p[2]) / (_SQRT2 * p[3])

    use = np.ones(x.size, dtype=bool)  # pixels in the fit (neighbouring structures are dropped below)

    def residuals(p: NDArray[np.float64]) -> NDArray[np.float64]:
        _, u = edge(p)
        return (p[5] + p[6] * dx0 + p[7] * dy0 + p[4] * 0.5 * erfc(u) - values)[use]

    def jacobian(p: NDArray[np.float64]) -> NDArray[np.float64]:
        r, u = edge(p)
        slope = -np.exp(-u * u) / _SQRT_PI  # d erfc(u)/2 / du
        k = p[4] * slope / (_SQRT2 * p[3])
        safe = np.maximum(r, 1e-9)
        return np.column_stack([k * (p[0] - x) / safe, k * (p[1] - y) / safe, -k, -p[4] * slope * u / p[3],
                                0.5 * erfc(u), np.ones_like(x), dx0, dy0])[use]

    try:
        solution = least_squares(residuals, start, jac=jacobian, bounds=(low, high), method="trf", x_scale="jac")
        residual = residuals(solution.x)
        sigma = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
        if sigma > 0:
            # A Cauchy loss at 3 robust sigmas discounts a neighbouring inclusion inside the window ...
            solution = least_squares(residuals, solution.x, jac=jacobian, bounds=(low, high), method="trf",
                                     loss="cauchy", f_scale=3.0 * sigma, x_scale="jac")
            # ... and its pixels (more than _DISK_OUTLIER_SIGMAS off the model, grown by one pixel, which
            # takes in their blurred edge) are then dropped for a last plain least-squares fit.
            residual = residuals(solution.x)
            sigma = max(1.4826 * float(np.median(np.abs(residual - np.median(residual)))), 1e-12 * amplitude)
            box = np.zeros((r1 - r0, c1 - c0), dtype=bool)
            box[yy[window] - r0, xx[window] - c0] = np.abs(residual) > _DISK_OUTLIER_SIGMAS * sigma
            box = ndimage.binary_dilation(box, structure=np.ones((3, 3), dtype=bool))
            use[:] = ~box[yy[window] - r0, xx[window] - c0]
            if use.sum() < 0.5 * use.size:
                return None
            if not use.all():
                solution = least_squares(residuals, solution.x, jac=jacobian, bounds=(low, high), method="trf",
                                         x_scale="jac")
    except (ValueError, np.linalg.LinAlgError):
        return None
    cx, cy, radius = solution.x[:3]
    if (not solution.success or not np.all(np.isfinite(solution.x)) or np.hypot(cx - x0, cy - y0) > 0.5 * radius_px
            or not 0.31 * radius_px < radius < 2.49 * radius_px):
        return None
    return float(cx), float(cy)


# --------------------------------------------------------------------------------------------------
# Landmark fitting
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LandmarkFit:
    """A 2-D transform fitted to point correspondences.

    Attributes
    ----------
    matrix : ndarray, shape (3, 3), float64
        Homogeneous transform mapping moving to fixed points.
    model : str
        "similarity", "rigid" or "affine".
    moving_index, fixed_index : ndarray of int, shape (m,)
        The correspondences: ``moving_xy[moving_index[i]]`` <-> ``fixed_xy[fixed_index[i]]``.
    residuals : ndarray, shape (m,), float64
        Distance ``|M(moving) - fixed|`` for each correspondence, in the units of the points.
    inliers : ndarray of bool, shape (m,)
        Correspondences used in the final least-squares fit.
    rms : float
        Root-mean-square residual over the inliers.
    inlier_moving_xy : ndarray, shape (k, 2), optional
        The moving points of the inliers (the design of the fit), for :meth:`position_uncertainty`.
    """

    matrix: NDArray[np.float64]
    model: str
    moving_index: NDArray[np.intp]
    fixed_index: NDArray[np.intp]
    residuals: NDArray[np.float64]
    inliers: NDArray[np.bool_]
    rms: float
    inlier_moving_xy: NDArray[np.float64] | None = field(default=None, repr=False)

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())

    @property
    def scale(self) -> float:
        """Isotropic scale (for "affine": the square root of the determinant)."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix[:2, :2]))))

    @property
    def rotation_deg(self) -> float:
        """Counter-clockwise rotation in degrees (for "affine": of the first column)."""
        return float(np.degrees(np.arctan2(self.matrix[1, 0], self.matrix[0, 0])))

    @property
    def translation(self) -> NDArray[np.float64]:
        """Translation ``(tx, ty)``, shape (2,)."""
        return self.matrix[:2, 2].copy()

    def apply(self, points_xy: ArrayLike) -> NDArray[np.float64]:
        """Map moving points ``(n, 2)`` into the fixed frame."""
        p = _as_points(points_xy, "points_xy", minimum=0)
        return p @ self.matrix[:2, :2].T + self.matrix[:2, 2]

    @property
    def redundancy(self) -> int:
        """Degrees of freedom left to check the fit: ``2 * n_inliers - n_parameters`` (0: exactly determined)."""
        return 2 * self.n_inliers - _N_PARAMETERS[self.model]

    def position_uncertainty(self, points_xy: ArrayLike) -> NDArray[np.float64]:
        """Predicted 1-sigma error of mapped moving points (confidence of the fit), same units as the points.

        Least-squares propagation: the residual variance ``sigma^2 = sum(r^2) / redundancy`` over the
        inliers, the parameter covariance ``sigma^2 (J^T J)^-1`` from the inlier design, and at each point
        the radial error ``sqrt(trace(J_p C J_p^T))``. It grows away from the fiducials (extrapolation) and
        with few, noisy or nearly collinear fiducials.

        Parameters
        ----------
        points_xy : array_like, shape (n, 2)
            Moving points.

        Returns
        -------
        ndarray, shape (n,)
            ``inf`` where the fit has no redundancy (exactly determined: its error cannot be estimated).
        """
        p = _as_points(points_xy, "points_xy", minimum=0)
        if self.inlier_moving_xy is None or self.redundancy <= 0:
            return np.full(p.shape[0], np.inf)
        sigma2 = float((self.residuals[self.inliers] ** 2).sum()) / self.redundancy
        design = _jacobian(self.inlier_moving_xy, self.matrix, self.model)  # (k, 2, n_params)
        normal = np.einsum("kij,kil->jl", design, design)
        covariance = sigma2 * np.linalg.pinv(normal)
        at = _jacobian(p, self.matrix, self.model)
        return np.sqrt(np.einsum("nij,jl,nil->n", at, covariance, at))


def _as_points(points: ArrayLike, name: str, *, minimum: int = 3) -> NDArray[np.float64]:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) as (x, y), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if p.shape[0] < minimum:
        raise RegistrationError(f"{name} has {p.shape[0]} point(s); at least {minimum} are needed")
    return p


_N_PARAMETERS = {"rigid": 3, "similarity": 4, "affine": 6}


def _jacobian(points: NDArray[np.float64], matrix: NDArray[np.float64], model: str) -> NDArray[np.float64]:
    """d(mapped point)/d(parameters), shape (n, 2, n_parameters), linearised at ``matrix``.

    Parameters: rigid (angle, tx, ty); similarity (a, b, tx, ty) with linear part [[a, -b], [b, a]];
    affine (a11, a12, tx, a21, a22, ty).
    """
    x, y = points[:, 0], points[:, 1]
    one, zero = np.ones_like(x), np.zeros_like(x)
    if model == "rigid":
        angle = np.arctan2(matrix[1, 0], matrix[0, 0])
        c, s = np.cos(angle), np.sin(angle)
        rows = [[-s * x - c * y, one, zero], [c * x - s * y, zero, one]]
    elif model == "similarity":
        rows = [[x, -y, one, zero], [y, x, zero, one]]
    else:
        rows = [[x, y, one, zero, zero, zero], [zero, zero, zero, x, y, one]]
    return np.moveaxis(np.array(rows), -1, 0)


def _check_model(model: str) -> None:
    if model not in _MODELS:
        raise ValueError(f"model must be one of {_MODELS}, got {model!r}")


def _check_spread(points: NDArray[np.float64], what: str) -> None:
    """Raise RegistrationError if the points are (nearly) collinear or coincident."""
    centred = points - points.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    if singular[0] == 0 or singular[-1] / singular[0] < MIN_SPREAD_RATIO:
        ratio = 0.0 if singular[0] == 0 else singular[-1] / singular[0]
        raise RegistrationError(
            f"{what} are collinear or coincident (spread ratio {ratio:.3g} < {MIN_SPREAD_RATIO}); "
            "the transform is not determined across their line"
        )


def _hypotheses(
    moving: NDArray[np.float64], fixed: NDArray[np.float64], subsets: NDArray[np.intp], model: str
) -> NDArray[np.float64]:
    """Exact transforms through minimal subsets, shape (H, 3, 3); rows of ``subsets`` index both sets."""
    if model == "affine":
        src = np.concatenate([moving[subsets], np.ones(subsets.shape + (1,))], axis=-1)  # (H, 3, 3)
        dst = fixed[subsets]  # (H, 3, 2)
        keep = np.abs(np.linalg.det(src)) > 1e-12 * (1 + np.abs(src).max()) ** 2
        solution = np.linalg.solve(src[keep], dst[keep])  # (H, 3, 2): [x y 1] @ X = [x' y']
        out = np.zeros((solution.shape[0], 3, 3))
        out[:, :2, :] = np.swapaxes(solution, 1, 2)
        out[:, 2, 2] = 1.0
        return out
    zm = moving[:, 0] + 1j * moving[:, 1]
    zf = fixed[:, 0] + 1j * fixed[:, 1]
    return _complex_to_matrix(*_pair_similarity(zm[subsets[:, 0]], zm[subsets[:, 1]], zf[subsets[:, 0]],
                                                 zf[subsets[:, 1]], rigid=model == "rigid"))


def _pair_similarity(
    m1: NDArray[np.complex128], m2: NDArray[np.complex128], f1: NDArray[np.complex128], f2: NDArray[np.complex128],
    *, rigid: bool,
) -> tuple[NDArray[np.complex128], NDArray[np.complex128]]:
    """``z_f = a z_m + b`` through two point pairs (complex form of a similarity), vectorised."""
    baseline = m2 - m1
    safe = np.where(baseline == 0, 1.0, baseline)
    a = np.where(baseline == 0, np.nan, (f2 - f1) / safe)
    if rigid:
        a = a / np.abs(a)
        b = 0.5 * (f1 + f2) - a * 0.5 * (m1 + m2)
    else:
        b = f1 - a * m1
    return a, b


def _complex_to_matrix(a: NDArray[np.complex128], b: NDArray[np.complex128]) -> NDArray[np.float64]:
    out = np.zeros(a.shape + (3, 3))
    out[..., 0, 0] = a.real
    out[..., 0, 1] = -a.imag
    out[..., 1, 0] = a.imag
    out[..., 1, 1] = a.real
    out[..., 0, 2] = b.real
    out[..., 1, 2] = b.imag
    out[..., 2, 2] = 1.0
    return out


def _residuals(matrices: NDArray[np.float64], moving: NDArray[np.float64], fixed: NDArray[np.float64]) -> NDArray:
    """|M(moving) - fixed| for each matrix, shape (..., n)."""
    predicted = np.einsum("...ij,nj->...ni", matrices[..., :2, :2], moving) + matrices[..., None, :2, 2]
    return np.linalg.norm(predicted - fixed, axis=-1)


def _least_squares(moving: NDArray[np.float64], fixed: NDArray[np.float64], model: str) -> NDArray[np.float64]:
    estimator = _ESTIMATORS[model]
    if hasattr(estimator, "from_estimate"):  # scikit-image >= 0.26
        transform = estimator.from_estimate(moving, fixed)
        if not transform:
            raise RegistrationError(f"least-squares {model} fit failed: {transform}")
        return np.asarray(transform.params, dtype=np.float64)
    transform = estimator()
    if not transform.estimate(moving, fixed):
        raise RegistrationError(f"least-squares {model} fit failed (degenerate points)")
    return np.asarray(transform.params, dtype=np.float64)


def fit_landmarks(
    moving_xy: ArrayLike,
    fixed_xy: ArrayLike,
    *,
    model: Model = "similarity",
    inlier_tolerance: float | None = None,
    min_inliers: int = 3,
) -> LandmarkFit:
    """Fit a transform to KNOWN correspondences ``moving_xy[i] <-> fixed_xy[i]``, rejecting outliers.

    Robust start by least median of squares over minimal subsets (pairs for similarity/rigid, triples
    for affine; exhaustive up to 5000 subsets, a seeded random sample beyond), which tolerates up to
    half the pairs being wrong; then least squares (scikit-image) on the inliers, repeated until the
    inlier set is stable.

    Parameters
    ----------
    moving_xy, fixed_xy : array_like, shape (n, 2)
        Corresponding points ``(x, y)``, any consistent units (pixels or µm).
    model : {"similarity", "rigid", "affine"}
    inlier_tolerance : float, optional
        Largest residual of an inlier, in the units of ``fixed_xy``. Default: 2.5 robust standard
        deviations from the least-median fit (Rousseeuw & Leroy).
    min_inliers : int
        Fewer inliers raise :class:`RegistrationError` (at least the model's minimal sample + 1 is
        recommended so the fit can be checked).

    Returns
    -------
    LandmarkFit
        ``moving_index == fixed_index == arange(n)``; residuals for all pairs; rms over inliers.

    Raises
    ------
    RegistrationError
        Fewer than ``min_inliers`` points or inliers, or collinear inliers.
    ValueError
        Bad shapes, NaN, mismatched lengths, unknown model.
    """
    _check_model(model)
    p = _MINIMAL_POINTS[model]
    min_inliers = int(min_inliers)
    if min_inliers < p:
        raise ValueError(f"min_inliers must be >= {p} for model {model!r}, got {min_inliers}")
    moving = _as_points(moving_xy, "moving_xy", minimum=0)
    fixed = _as_points(fixed_xy, "fixed_xy", minimum=0)
    if moving.shape != fixed.shape:
        raise ValueError(f"moving_xy and fixed_xy must have the same shape, got {moving.shape} and {fixed.shape}")
    n = moving.shape[0]
    if n < max(min_inliers, p):
        raise RegistrationError(f"{n} correspondence(s) given; at least {max(min_inliers, p)} are needed")
    if inlier_tolerance is not None:
        _positive(inlier_tolerance, "inlier_tolerance")

    subsets = np.array(list(itertools.islice(itertools.combinations(range(n), p), _MAX_HYPOTHESES + 1)))
    if len(subsets) > _MAX_HYPOTHESES:
        rng = np.random.default_rng(0)
        subsets = np.array([rng.choice(n, size=p, replace=False) for _ in range(_MAX_HYPOTHESES)])
    matrices = _hypotheses(moving, fixed, subsets, model)
    matrices = matrices[np.all(np.isfinite(matrices), axis=(1, 2))]
    if matrices.shape[0] == 0:
        raise RegistrationError("every minimal subset of the points is degenerate (coincident points)")
    squared = _residuals(matrices, moving, fixed) ** 2
    median = np.median(squared, axis=1)
    best = int(np.argmin(median))
    if inlier_tolerance is None:
        redundancy = max(n - p, 1)
        sigma = 1.4826 * (1.0 + 5.0 / redundancy) * np.sqrt(median[best])
        # Floor for exact data: numerical noise must not turn good points into outliers.
        spread = float(np.ptp(fixed, axis=0).max()) + 1.0
        tolerance = max(2.5 * sigma, 1e-9 * spread)
    else:
        tolerance = float(inlier_tolerance)

    inliers = np.sqrt(squared[best]) <= tolerance
    matrix = matrices[best]
    for _ in range(10):
        if inliers.sum() < min_inliers:
            raise RegistrationError(
                f"only {int(inliers.sum())} of {n} correspondences agree within {tolerance:.3g}; "
                f"at least {min_inliers} are needed"
            )
        _check_spread(moving[inliers], "the inlier moving points")
        matrix = _least_squares(moving[inliers], fixed[inliers], model)
        residuals = _residuals(matrix, moving, fixed)
        updated = residuals <= tolerance
        if np.array_equal(updated, inliers):
            break
        inliers = updated
    residuals = _residuals(matrix, moving, fixed)
    if inliers.sum() < min_inliers:
        raise RegistrationError(f"only {int(inliers.sum())} inliers after refitting; at least {min_inliers} needed")
    index = np.arange(n)
    return LandmarkFit(
        matrix=matrix, model=model, moving_index=index, fixed_index=index.copy(), residuals=residuals,
        inliers=inliers, rms=float(np.sqrt(np.mean(residuals[inliers] ** 2))), inlier_moving_xy=moving[inliers],
    )


def match_landmarks(
    moving_xy: ArrayLike,
    fixed_xy: ArrayLike,
    *,
    model: Model = "similarity",
    tolerance: float | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    min_matches: int = 3,
) -> LandmarkFit:
    """Find correspondences between two point sets with UNKNOWN pairing and fit a transform.

    Every pair of moving points is hypothesised to correspond to every ordered pair of fixed points;
    each hypothesis is an exact similarity, scored by the truncated squared distance of every moving
    point to its nearest fixed point (MSAC). The best is refined by one-to-one assignment
    (Hungarian algorithm, pairs closer than ``tolerance``) and least squares with ``model``, repeated
    until the matches are stable. Extra and missing points in either set are fine as long as
    ``min_matches`` points are common and the layout is not symmetric.

    Parameters
    ----------
    moving_xy : array_like, shape (n_moving, 2)
    fixed_xy : array_like, shape (n_fixed, 2)
        Points ``(x, y)``; the transform maps moving to fixed. At most 40 points per set (cost grows as
        ``n_moving³ n_fixed³``); pre-select the strongest detections.
    model : {"similarity", "rigid", "affine"}
        Model of the final fit (hypotheses are similarities).
    tolerance : float, optional
        Largest distance, in fixed units, between a mapped moving point and its match. Default: a
        tenth of the median nearest-neighbour distance within ``fixed_xy``.
    scale_range : (float, float)
        Accepted scale of the hypotheses (fixed units per moving unit); prunes the search.
    min_matches : int
        Fewer matches raise :class:`RegistrationError`.

    Returns
    -------
    LandmarkFit
        ``moving_index``/``fixed_index`` list the matches; all of them are inliers.

    Raises
    ------
    RegistrationError
        Fewer than ``min_matches`` matches, collinear matched points, or an ambiguous layout (another,
        different transform explains as many points).
    ValueError
        Bad shapes/values.
    """
    _check_model(model)
    min_matches = int(min_matches)
    if min_matches < _MINIMAL_POINTS[model]:
        raise ValueError(f"min_matches must be >= {_MINIMAL_POINTS[model]} for model {model!r}, got {min_matches}")
    moving = _as_points(moving_xy, "moving_xy", minimum=min_matches)
    fixed = _as_points(fixed_xy, "fixed_xy", minimum=min_matches)
    for name, pts in (("moving_xy", moving), ("fixed_xy", fixed)):
        if pts.shape[0] > _MAX_MATCH_POINTS:
            raise ValueError(
                f"{name} has {pts.shape[0]} points; at most {_MAX_MATCH_POINTS} are supported "
                "(pre-select the strongest detections, e.g. detect_fiducials(max_count=...))"
            )
    low, high = (float(v) for v in scale_range)
    if not (np.isfinite(low) and np.isfinite(high) and 0 < low < high):
        raise ValueError(f"scale_range must be (low, high) with 0 < low < high, got {scale_range!r}")
    if tolerance is None:
        pairwise = np.linalg.norm(fixed[:, None] - fixed[None], axis=-1)
        np.fill_diagonal(pairwise, np.inf)
        tolerance = 0.1 * float(np.median(pairwise.min(axis=1)))
        if not tolerance > 0:
            raise ValueError("fixed_xy has coincident points; pass an explicit tolerance")
    else:
        tolerance = _positive(tolerance, "tolerance")

    zm = moving[:, 0] + 1j * moving[:, 1]
    zf = fixed[:, 0] + 1j * fixed[:, 1]
    mi, mj = np.triu_indices(len(zm), k=1)
    fk, fl = np.nonzero(~np.eye(len(zf), dtype=bool))
    m1, m2 = np.repeat(zm[mi], len(fk)), np.repeat(zm[mj], len(fk))
    f1, f2 = np.tile(zf[fk], len(mi)), np.tile(zf[fl], len(mi))
    a, b = _pair_similarity(m1, m2, f1, f2, rigid=False)
    scale = np.abs(a)
    keep = np.isfinite(scale) & (scale >= low) & (scale <= high)
    a, b = a[keep], b[keep]
    if a.size == 0:
        raise RegistrationError(f"no pair of points is consistent with a scale in {scale_range}")

    # Score all hypotheses (chunked to bound memory): truncated squared nearest-neighbour distances.
    cost = np.empty(a.size)
    count = np.empty(a.size, dtype=np.intp)
    chunk = max(1, 2_000_000 // (len(zm) * len(zf)))
    for start in range(0, a.size, chunk):
        predicted = a[start : start + chunk, None] * zm[None, :] + b[start : start + chunk, None]
        distance = np.abs(predicted[:, :, None] - zf[None, None, :])  # (h, n_moving, n_fixed)
        cost[start : start + chunk] = (np.minimum(distance.min(axis=2), tolerance) ** 2).sum(axis=1)
        # Matches counted one-to-one (the fewer of distinct moving and distinct fixed points within
        # tolerance), so a shrunken hypothesis piling points onto one fixed point does not score high.
        within = distance <= tolerance
        count[start : start + chunk] = np.minimum(within.any(axis=2).sum(axis=1), within.any(axis=1).sum(axis=1))
    best = int(np.argmin(cost))

    matrix = _complex_to_matrix(a[best], b[best])
    pairs: tuple[NDArray[np.intp], NDArray[np.intp]] | None = None
    for _ in range(10):
        distance = np.linalg.norm(
            (moving @ matrix[:2, :2].T + matrix[:2, 2])[:, None, :] - fixed[None, :, :], axis=-1
        )
        big = 1e6 * tolerance + distance.max()
        rows, cols = linear_sum_assignment(np.where(distance <= tolerance, distance, big))
        ok = distance[rows, cols] <= tolerance
        current = (rows[ok], cols[ok])
        if current[0].size < min_matches:
            raise RegistrationError(
                f"only {current[0].size} point(s) match within tolerance {tolerance:.3g} "
                f"(moving {len(moving)}, fixed {len(fixed)} points); at least {min_matches} are needed"
            )
        _check_spread(moving[current[0]], "the matched moving points")
        matrix = _least_squares(moving[current[0]], fixed[current[1]], model)
        if pairs is not None and np.array_equal(pairs[0], current[0]) and np.array_equal(pairs[1], current[1]):
            break
        pairs = current
    assert pairs is not None
    moving_index, fixed_index = pairs
    residuals = _residuals(matrix, moving[moving_index], fixed[fixed_index])

    # Ambiguity: a hypothesis placing the matched moving points elsewhere (by more than 2 tolerances)
    # that explains as many points would make the choice arbitrary, e.g. a symmetric layout.
    rivals = np.flatnonzero(count >= moving_index.size)
    if rivals.size:
        matched = zm[moving_index]
        mapped = moving[moving_index] @ matrix[:2, :2].T + matrix[:2, 2]
        mapped_z = mapped[:, 0] + 1j * mapped[:, 1]
        displacement = np.abs(a[rivals, None] * matched[None, :] + b[rivals, None] - mapped_z[None, :]).max(axis=1)
        if np.any(displacement > 2 * tolerance):
            raise RegistrationError(
                f"ambiguous correspondences: a different transform also matches {moving_index.size} points "
                "(symmetric fiducial layout?)"
            )
    return LandmarkFit(
        matrix=matrix, model=model, moving_index=moving_index, fixed_index=fixed_index, residuals=residuals,
        inliers=np.ones(moving_index.size, dtype=bool), rms=float(np.sqrt(np.mean(residuals**2))),
        inlier_moving_xy=moving[moving_index],
    )


# --------------------------------------------------------------------------------------------------
# Microscope image to reconstructed slice
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RegistrationResult:
    """Microscope-stage frame to beamline-sample frame registration.

    Attributes
    ----------
    sample_from_microscope : ndarray, shape (4, 4), float64
        Maps microscope-stage points ``(x, y, 0)`` (µm) to ``beamline_sample`` points (µm); in-plane
        similarity, z translation = ``slice_z_um``.
    scale, rotation_deg : float
        In-plane scale (sample µm per microscope µm) and counter-clockwise rotation about +z.
    translation_um : tuple of 3 floats
        ``(tx, ty, slice_z_um)``.
    rms_residual_um, worst_residual_um : float
        Fiducial residuals in the sample frame after the fit (of the transform returned).
    n_matches : int
        Fiducials matched between the two images.
    ok : bool
        ``n_matches >= min_matches`` and ``rms_residual_um <= max_residual_um``.
    max_residual_um : float
        The limit applied.
    microscope_points_um, sample_points_um : ndarray, shape (n_matches, 2)
        The matched fiducial centres, in their own frames.
    residuals_um : ndarray, shape (n_matches,)
    method : str
        "fiducials", or "fiducials+mattes_mi" when the intensity refinement was kept.
    n_detected_microscope, n_detected_slice : int
    message : str
        One line for logs and reports.
    uncertainty_um : float
        Confidence of the fiducial fit: the largest predicted 1-sigma position error (µm, sample frame) over
        the micrograph's field of view (:meth:`LandmarkFit.position_uncertainty`); ``inf`` with exactly 2
        matches' worth of redundancy or less.
    """

    sample_from_microscope: NDArray[np.float64]
    scale: float
    rotation_deg: float
    translation_um: tuple[float, float, float]
    rms_residual_um: float
    worst_residual_um: float
    n_matches: int
    ok: bool
    max_residual_um: float
    microscope_points_um: NDArray[np.float64] = field(repr=False)
    sample_points_um: NDArray[np.float64] = field(repr=False)
    residuals_um: NDArray[np.float64] = field(repr=False)
    method: str = "fiducials"
    n_detected_microscope: int = 0
    n_detected_slice: int = 0
    message: str = ""
    uncertainty_um: float = float("nan")


def _micrograph_points_um(xy_px: NDArray[np.float64], shape: tuple[int, int], pixel_um: float,
                          stage_x_um: float, stage_y_um: float) -> NDArray[np.float64]:
    rows, cols = shape
    return np.column_stack([
        stage_x_um + (xy_px[:, 0] - (cols - 1) / 2.0) * pixel_um,
        stage_y_um + (xy_px[:, 1] - (rows - 1) / 2.0) * pixel_um,
    ])


def _slice_points_um(xy_px: NDArray[np.float64], shape: tuple[int, int], voxel_um: float) -> NDArray[np.float64]:
    ny, nx = shape
    return np.column_stack([(xy_px[:, 0] - (nx - 1) / 2.0) * voxel_um, (xy_px[:, 1] - (ny - 1) / 2.0) * voxel_um])


def _sitk_image(image: NDArray[np.float64], origin_um: tuple[float, float], spacing_um: float) -> sitk.Image:
    out = sitk.GetImageFromArray(image.astype(np.float32))  # index (i, j) = (col, row) -> x, y
    out.SetOrigin(origin_um)
    out.SetSpacing((spacing_um, spacing_um))
    return out


def _refine_mattes_mi(
    micrograph: NDArray[np.float64], micrograph_origin_um: tuple[float, float], micrograph_pixel_um: float,
    slice_image: NDArray[np.float64], slice_origin_um: tuple[float, float], slice_voxel_um: float,
    initial: NDArray[np.float64], center_um: NDArray[np.float64],
) -> tuple[NDArray[np.float64], float, float]:
    """Mattes-MI similarity refinement; returns (3x3 matrix, metric before, metric after) (lower is better).

    The micrograph is the fixed image, so the ITK transform (fixed -> moving physical points) is
    directly sample_from_microscope in 2-D.
    """
    fixed = _sitk_image(micrograph, micrograph_origin_um, micrograph_pixel_um)
    moving = _sitk_image(slice_image, slice_origin_um, slice_voxel_um)
    transform = sitk.Similarity2DTransform()
    transform.SetCenter(tuple(float(v) for v in center_um))
    linear = initial[:2, :2]
    scale = float(np.sqrt(abs(np.linalg.det(linear))))
    transform.SetScale(scale)
    transform.SetAngle(float(np.arctan2(linear[1, 0], linear[0, 0])))
    # T(p) = sR (p - c) + c + t'  ==  A p + t   =>   t' = A c + t - c
    translation = linear @ center_um + initial[:2, 2] - center_um
    transform.SetTranslation(tuple(float(v) for v in translation))

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.NONE)  # every pixel: deterministic, 256² is cheap
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=0.5, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=False)
    before = float(method.MetricEvaluate(fixed, moving))
    final = method.Execute(fixed, moving)
    after = float(method.GetMetricValue())
    if isinstance(final, sitk.CompositeTransform):
        final = final.GetNthTransform(0)
    result = sitk.Similarity2DTransform(final)
    matrix = np.eye(3)
    a = np.array(result.GetMatrix()).reshape(2, 2)
    c = np.array(result.GetCenter())
    matrix[:2, :2] = a
    matrix[:2, 2] = np.array(result.GetTranslation()) + c - a @ c
    return matrix, before, after


def register_microscope_to_slice(
    micrograph: ArrayLike,
    *,
    micrograph_pixel_size_um: float,
    stage_x_um: float,
    stage_y_um: float,
    slice_image: ArrayLike,
    slice_voxel_size_um: float,
    slice_z_um: float,
    fiducial_radius_um: float,
    max_residual_um: float | None = None,
    match_tolerance_um: float | None = None,
    fiducial_size_tolerance: float = 0.35,
    scale_range: tuple[float, float] = (0.8, 1.25),
    min_matches: int = 3,
    refine_intensity: bool = False,
    raise_on_failure: bool = True,
) -> RegistrationResult:
    """Register a micrograph of a sectioned plane to the reconstructed tomography slice at that height.

    Bright fiducials are detected in both images, converted to micrometres in their own frames (see the
    module conventions), matched without known correspondences (:func:`match_landmarks`) and fitted with
    a similarity (microscope stage -> beamline sample). Optionally the result is refined by SimpleITK
    intensity registration (Mattes mutual information, which copes with the different contrasts); the
    refinement is kept only if it lowers the MI metric AND keeps the fiducial residual within the limit.

    Parameters
    ----------
    micrograph : array_like, shape (rows, cols)
        Microscope image; fiducials bright.
    micrograph_pixel_size_um : float
    stage_x_um, stage_y_um : float
        Microscope stage position when the image was taken (the image centre).
    slice_image : array_like, shape (ny, nx)
        Reconstructed slice on the contract's grid (``slice[iy, ix]``), fiducials bright (high mu).
    slice_voxel_size_um : float
    slice_z_um : float
        Height of the slice (and of the sectioned plane) in the beamline-sample frame; the z translation.
    fiducial_radius_um : float
        Nominal fiducial radius (a sphere sectioned through its centre shows this radius).
    max_residual_um : float, optional
        Largest acceptable RMS fiducial residual, µm. Default: half a slice voxel.
    match_tolerance_um : float, optional
        Largest distance (sample frame, µm) between a mapped micrograph fiducial and its slice partner
        while matching. Default: ``max(slice_voxel_size_um, fiducial_radius_um / 2)``: several times
        the centroid error of a few-voxel sphere section, yet small enough that chance coincidences of
        unrelated points (which make layouts with only 3 common fiducials ambiguous) stay rare.
    fiducial_size_tolerance : float
        Accepted relative deviation of a detected fiducial's radius from ``fiducial_radius_um``
        (``size_tolerance`` of :func:`detect_fiducials`); 0.35 accepts the 16-24 µm spheres around
        20 µm and rejects smaller precipitates.
    scale_range : (float, float)
        Accepted scale (sample µm per microscope µm).
    min_matches : int
        At least 3.
    refine_intensity : bool
        Try the Mattes-MI refinement.
    raise_on_failure : bool
        If False, a fit whose residual exceeds ``max_residual_um`` is returned with ``ok=False`` instead
        of raising. Too few or ambiguous matches always raise.

    Returns
    -------
    RegistrationResult

    Raises
    ------
    RegistrationError
        Too few fiducials detected or matched, collinear or ambiguous fiducials, or (with
        ``raise_on_failure``) residual above ``max_residual_um``.
    ValueError
        Bad images or parameters.
    """
    micro = _as_image(micrograph, "micrograph")
    slc = _as_image(slice_image, "slice_image")
    px = _positive(micrograph_pixel_size_um, "micrograph_pixel_size_um")
    voxel = _positive(slice_voxel_size_um, "slice_voxel_size_um")
    radius = _positive(fiducial_radius_um, "fiducial_radius_um")
    for name, value in (("stage_x_um", stage_x_um), ("stage_y_um", stage_y_um), ("slice_z_um", slice_z_um)):
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    limit = 0.5 * voxel if max_residual_um is None else _positive(max_residual_um, "max_residual_um")
    tolerance = (
        max(voxel, 0.5 * radius) if match_tolerance_um is None else _positive(match_tolerance_um, "match_tolerance_um")
    )
    if int(min_matches) != min_matches or min_matches < 3:
        raise ValueError(f"min_matches must be an integer >= 3, got {min_matches!r}")

    detect = dict(radius_um=radius, size_tolerance=fiducial_size_tolerance, max_count=_MAX_MATCH_POINTS)
    micro_px = detect_fiducials(micro, pixel_size_um=px, **detect)
    slice_px = detect_fiducials(slc, pixel_size_um=voxel, **detect)
    if len(micro_px) < min_matches or len(slice_px) < min_matches:
        raise RegistrationError(
            f"too few fiducials detected: {len(micro_px)} in the micrograph, {len(slice_px)} in the slice "
            f"(at least {min_matches} each are needed)"
        )
    micro_um = _micrograph_points_um(micro_px, micro.shape, px, float(stage_x_um), float(stage_y_um))
    sample_um = _slice_points_um(slice_px, slc.shape, voxel)
    try:
        fit = match_landmarks(
            micro_um, sample_um, model="similarity", tolerance=tolerance, scale_range=scale_range,
            min_matches=int(min_matches),
        )
    except RegistrationError as error:
        raise RegistrationError(
            f"matching {len(micro_px)} micrograph fiducials to {len(slice_px)} slice fiducials failed: {error}"
        ) from error

    matched_micro = micro_um[fit.moving_index]
    matched_sample = sample_um[fit.fixed_index]
    matrix = fit.matrix
    method = "fiducials"
    refinement_note = ""
    if refine_intensity:
        micro_origin = (float(stage_x_um) - (micro.shape[1] - 1) / 2.0 * px,
                        float(stage_y_um) - (micro.shape[0] - 1) / 2.0 * px)
        slice_origin = (-(slc.shape[1] - 1) / 2.0 * voxel, -(slc.shape[0] - 1) / 2.0 * voxel)
        try:
            refined, before, after = _refine_mattes_mi(
                micro, micro_origin, px, slc, slice_origin, voxel, matrix, matched_micro.mean(axis=0)
            )
        except RuntimeError as error:  # ITK optimizer/metric failure: the fiducial fit stands, and we say so
            refinement_note = f"; MI refinement failed ({str(error).strip().splitlines()[-1]})"
        else:
            refined_rms = float(np.sqrt(np.mean(_residuals(refined, matched_micro, matched_sample) ** 2)))
            # The fiducials are the reference: the MI result is kept only where it agrees with the fiducial
            # fit within 3 of the fit's own predicted standard errors over the field of view. (MI between
            # modalities can have its optimum a fraction of a voxel off, e.g. on a coarse slice: measured
            # 2.5 um median field error at 8 um voxels against 0.4 um for the fiducials.)
            corners = _micrograph_points_um(
                np.array([[0.0, 0.0], [micro.shape[1] - 1.0, 0.0], [0.0, micro.shape[0] - 1.0],
                          [micro.shape[1] - 1.0, micro.shape[0] - 1.0]]), micro.shape, px, float(stage_x_um),
                float(stage_y_um))
            deviation = float(np.linalg.norm(
                (corners @ refined[:2, :2].T + refined[:2, 2]) - (corners @ matrix[:2, :2].T + matrix[:2, 2]), axis=1
            ).max())
            allowed = 3.0 * float(fit.position_uncertainty(corners).max())
            if after < before and refined_rms <= limit and deviation <= allowed:
                matrix, method = refined, "fiducials+mattes_mi"
            else:
                refinement_note = (
                    f"; MI refinement discarded (metric {before:.4f} -> {after:.4f}, fiducial rms "
                    f"{refined_rms:.2f} um, {deviation:.2f} um from the fiducial fit, allowed {allowed:.2f} um)"
                )

    residuals = _residuals(matrix, matched_micro, matched_sample)
    rms = float(np.sqrt(np.mean(residuals**2)))
    ok = rms <= limit and fit.moving_index.size >= min_matches
    last_col, last_row = micro.shape[1] - 1.0, micro.shape[0] - 1.0
    corners_px = np.array([[0.0, 0.0], [last_col, 0.0], [0.0, last_row], [last_col, last_row]])
    field_corners = _micrograph_points_um(corners_px, micro.shape, px, float(stage_x_um), float(stage_y_um))
    uncertainty = float(fit.position_uncertainty(field_corners).max())
    transform = np.eye(4)
    transform[:2, :2] = matrix[:2, :2]
    transform[:2, 3] = matrix[:2, 2]
    transform[2, 3] = float(slice_z_um)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    rotation = float(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])))
    message = (
        f"{fit.moving_index.size} fiducials matched ({len(micro_px)} in micrograph, {len(slice_px)} in slice), "
        f"rms residual {rms:.2f} um (limit {limit:.2f} um), predicted field error {uncertainty:.2f} um (1 sigma), "
        f"scale {scale:.4f}, rotation {rotation:.2f} deg, "
        f"method {method}{refinement_note}"
    )
    if not ok and raise_on_failure:
        raise RegistrationError(f"registration rejected: {message}")
    return RegistrationResult(
        sample_from_microscope=transform, scale=scale, rotation_deg=rotation,
        translation_um=(float(matrix[0, 2]), float(matrix[1, 2]), float(slice_z_um)),
        rms_residual_um=rms, worst_residual_um=float(residuals.max()), n_matches=int(fit.moving_index.size),
        ok=bool(ok), max_residual_um=limit, microscope_points_um=matched_micro, sample_points_um=matched_sample,
        residuals_um=residuals, method=method, n_detected_microscope=len(micro_px), n_detected_slice=len(slice_px),
        message=message, uncertainty_um=uncertainty,
    )
