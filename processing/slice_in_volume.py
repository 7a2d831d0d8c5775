"""Find the plane of a 3-D volume that a 2-D image shows (position, tilt, in-plane rotation and shift).

Conventions
-----------
* The volume is ``(z, y, x)`` on the reconstruction grid of docs/GEOMETRY.md: voxel ``[k, iy, ix]`` is the
  ``beamline_sample`` point ``((ix - (nx-1)/2) v, (iy - (ny-1)/2) v, (k - (nz-1)/2) v + z_offset_um)``.
* The image is ``(rows, cols)``; pixel ``(r, c)`` is the image-frame point
  ``(cx + (c - (cols-1)/2) px, cy + (r - (rows-1)/2) px, 0)`` (for a micrograph: the microscope-stage
  point, ``(cx, cy)`` = the stage position).
* The result ``sample_from_image`` is a 4x4 rigid (or similarity) transform mapping image-frame points
  (z = 0) to ``beamline_sample`` points: the general, tilted form of ``sample_from_microscope``.
  The plane's unit normal is its third column; ``tilt_x_deg`` / ``tilt_y_deg`` are the rotations about
  the sample x / y axes that carry +z to the normal (``n = (sin ty, -sin tx cos ty, cos tx cos ty)``
  to first order), and ``tilt_deg`` the angle between the normal and +z.

Method
------
1. **Global search.** The volume is cut into slabs perpendicular to z (thickness ``slab_um``, default 6
   voxels, stepping by half a slab); the exhaustive search of
   :mod:`~corrflow.processing.intensity_registration` (all rotations, all translations, masked normalised
   cross-correlation of smoothed intensity and of smoothed gradient magnitude on a ~96 px grid) runs
   against every slab at once, the rotated image spectra computed once. The best distinct
   (height, rotation, shift) starts of both features are kept.
2. **Candidate selection.** Each start is optimised by SimpleITK (Mattes mutual information) with the tilt
   HELD (rotations about x and y weighted 0; a ~40 px image constrains the tilt too weakly) on the
   half-resolution level, the image treated as a one-voxel-thick 3-D image mapped into the volume by a
   3-D rigid transform (``Euler3DTransform``; ``Similarity3DTransform`` for ``model="similarity"``). The
   best by MI x overlap goes on.
3. **Refinement.** Tilt, height, rotation and shift all free, half and full resolution, plain gradient
   descent whose learning rate is set so that no image point moves more than half a voxel per step (the
   regular-step optimizer's normalised steps turn the plane by tens of degrees once the shifts have
   converged; see ``_mattes3d``).
4. **Fallback.** If the result is below the limits, steps 1-3 are repeated with slabs tilted by
   ``max_tilt_deg`` about x and about y (both ways) and the better result kept: a horizontal slab can
   miss a plane tilted through several voxels over the field of view.
5. **Final least-squares refinement** (``final_refinement``). The image is compared pixel by pixel with a
   smooth function of the volume sampled on the plane (a degree-9 Legendre polynomial plus a linear
   shading across the image, refitted at every pose; the sampled volume blurred in the plane to the
   image's own blur), and all pose parameters are fitted by Levenberg-Marquardt
   (:func:`_refine_least_squares`); voxels far outside the robust range (metal fiducials) are left out.
   Mutual information from a 32-bin histogram of a ~128 px image is a noisy criterion: on the
   benchmark's SEM images its optimum lay up to 0.66 deg of tilt from the truth, the least-squares
   optimum within 0.31 deg. The move is local (at most 2 voxels at the image corners) and kept only if it
   lowers the residual.
6. **Confidence.** Normalised mutual information between the image and the volume resampled on the found
   plane, its significance against the image misplaced within that plane, and the fraction of the image
   inside the volume; below the limits -> ``RegistrationError``. The result also reports the fraction of
   the image variance that the fitted mapping of step 5 leaves unexplained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
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
from corrflow.processing.intensity_registration import _Grid, _pair, _positive, _search_starts
from corrflow.processing.intensity_registration import _as_image as _as_image_2d
from corrflow.processing.registration import RegistrationError

__all__ = ["PlaneParameters", "SliceInVolumeResult", "find_slice_in_volume", "plane_parameters"]

SliceModel = Literal["rigid", "similarity"]
_MODELS = ("rigid", "similarity")
# Coarse grid of the global search (pixels across the larger field of view): heights x rotations makes
# this search much bigger than the 2-D one, so it runs on a coarser grid.
_SEARCH_SIZE = 96
# Pyramid levels (volume voxels per level pixel) on which every start is optimised with the tilt held; at
# 4 the image is ~20 px across and mutual information ranks chance placements above the right one.
_CANDIDATE_LEVELS = (2,)
# Step 5 (final least-squares refinement): degree of the Legendre polynomial that maps volume values to image
# values (a kinked relation such as X-ray attenuation -> backscatter yield needs more than a cubic: measured
# on the benchmark's SEM cases, cubic 0.68 deg worst tilt error, degree 9 0.40 deg, degrees 7 and 13 alike),
# at most this many image pixels (binned beyond), and the largest move of the plane it may make at the image
# corners, in voxels (beyond it the mutual-information result is kept: the refinement is local).
_MAPPING_DEGREE = 9
_LS_MAX_SAMPLES = 65536
_LS_MAX_MOVE_VOXELS = 2.0
# In-plane blurs (image pixels) of the sampled volume among which step 5 chooses the best-matching one.
_LS_BLURS_PX = (0.0, 0.5, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class PlaneParameters:
    """Geometric description of an image plane placed in the sample frame."""

    normal: NDArray[np.float64]
    tilt_deg: float
    tilt_x_deg: float
    tilt_y_deg: float
    height_um: float
    rotation_deg: float
    scale: float


def plane_parameters(sample_from_image: ArrayLike, *, image_center_um: ArrayLike = (0.0, 0.0)) -> PlaneParameters:
    """Normal, tilts, height and in-plane rotation of the plane ``sample_from_image`` maps z = 0 to.

    Parameters
    ----------
    sample_from_image : array_like, shape (4, 4)
        Image frame (z = 0 plane) -> sample frame.
    image_center_um : (float, float)
        Image-frame point whose sample-frame height is reported as ``height_um`` (the image centre).

    Returns
    -------
    PlaneParameters
        ``normal`` (3,), unit, with ``n_z >= 0``; ``tilt_deg`` = angle(normal, +z); ``tilt_x_deg`` =
        ``atan2(-n_y, n_z)``; ``tilt_y_deg`` = ``atan2(n_x, n_z)``; ``height_um`` = sample z of the image
        centre; ``rotation_deg`` = direction of the image x axis projected on the sample x-y plane;
        ``scale`` = length of the image x axis in the sample frame (µm per image µm).
    """
    m = np.asarray(sample_from_image, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"sample_from_image must be a finite 4x4 matrix, got shape {m.shape}")
    centre = _pair(image_center_um, "image_center_um")
    ex, ey = m[:3, 0], m[:3, 1]
    normal = np.cross(ex, ey)
    length = float(np.linalg.norm(normal))
    if length == 0:
        raise ValueError("sample_from_image maps the image plane to a line")
    normal /= length
    if normal[2] < 0:
        normal = -normal
    point = m[:3, :3] @ np.array([centre[0], centre[1], 0.0]) + m[:3, 3]
    return PlaneParameters(
        normal=normal,
        tilt_deg=float(np.degrees(np.arccos(np.clip(normal[2], -1.0, 1.0)))),
        tilt_x_deg=float(np.degrees(np.arctan2(-normal[1], normal[2]))),
        tilt_y_deg=float(np.degrees(np.arctan2(normal[0], normal[2]))),
        height_um=float(point[2]),
        rotation_deg=float(np.degrees(np.arctan2(ex[1], ex[0]))),
        scale=float(np.linalg.norm(ex)),
    )


@dataclass(frozen=True, eq=False)
class SliceInVolumeResult:
    """Where a 2-D image lies in a 3-D volume.

    Attributes
    ----------
    sample_from_image : ndarray, shape (4, 4), float64
        Image-frame points ``(x, y, 0)`` (µm) -> volume (``beamline_sample``) points (µm).
    plane : PlaneParameters
        Normal, tilts, height at the image centre, in-plane rotation and scale (:func:`plane_parameters`).
    center_um : ndarray, shape (3,)
        Sample-frame point imaged at the image centre.
    mattes_mi : float
        Mattes mutual information (nats) between the image and the volume on the plane.
    nmi : float
        Normalised mutual information, in [1, 2]; the confidence measure.
    overlap_fraction : float
        Fraction of the image's pixels whose plane point lies inside the volume.
    n_candidates : int
        Starts from the global search that were optimised.
    ok : bool
        ``nmi >= min_nmi`` and ``significance >= min_significance`` (too little overlap always raises).
    message : str
    significance : float
        How many standard deviations the NMI stands above that of the image deliberately misplaced in the
        found plane (rotated and shifted); NaN if no misplacement overlaps the volume enough.
    null_nmi : float
        Mean NMI of those misplacements.
    unexplained_variance : float
        Fraction of the image's variance (pixels inside the volume) that no smooth function of the volume
        values on the plane explains (the residual of step 5, 1 - correlation ratio): near 0 for a
        one-to-one match, near 1 for unrelated images; NaN if it could not be evaluated.
    """

    sample_from_image: NDArray[np.float64] = field(repr=False)
    plane: PlaneParameters
    center_um: NDArray[np.float64]
    mattes_mi: float
    nmi: float
    overlap_fraction: float
    n_candidates: int
    ok: bool
    message: str = ""
    significance: float = float("nan")
    null_nmi: float = float("nan")
    unexplained_variance: float = float("nan")


def _as_volume(volume: ArrayLike) -> NDArray[np.float64]:
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be a 3-D array (z, y, x), got shape {vol.shape}")
    if vol.size == 0 or not np.issubdtype(vol.dtype, np.number) or np.iscomplexobj(vol):
        raise ValueError(f"volume must be a non-empty real numeric array, got dtype {vol.dtype}, shape {vol.shape}")
    if min(vol.shape) < 8:
        raise ValueError(f"volume must be at least 8 voxels along each axis, got shape {vol.shape}")
    vol = vol.astype(np.float64)
    if not np.all(np.isfinite(vol)):
        raise ValueError("volume contains NaN or infinite values")
    return vol


def _volume_origin(shape: tuple[int, int, int], voxel_um: float, z_offset_um: float) -> tuple[float, float, float]:
    nz, ny, nx = shape
    return (-(nx - 1) / 2 * voxel_um, -(ny - 1) / 2 * voxel_um, -(nz - 1) / 2 * voxel_um + z_offset_um)


def _sitk_volume(volume: NDArray[np.float64], voxel_um: float, z_offset_um: float) -> sitk.Image:
    out = sitk.GetImageFromArray(volume.astype(np.float32))  # ITK index (i, j, k) = (x, y, z)
    out.SetOrigin(_volume_origin(volume.shape, voxel_um, z_offset_um))
    out.SetSpacing((voxel_um,) * 3)
    return out


def _sitk_plane(image: NDArray[np.float64], grid: _Grid) -> sitk.Image:
    """The image as a one-voxel-thick 3-D image on the plane z = 0 of its frame."""
    out = sitk.GetImageFromArray(image.astype(np.float32)[None])  # size (cols, rows, 1)
    out.SetOrigin((*grid.origin_um, 0.0))
    out.SetSpacing((grid.pixel_um,) * 3)
    return out


def _to_itk3d(matrix: NDArray[np.float64], model: str, center: NDArray[np.float64]) -> sitk.Transform:
    """ITK transform for ``matrix`` (4x4 image -> volume; ITK maps fixed=image to moving=volume directly)."""
    linear, offset = matrix[:3, :3], matrix[:3, 3]
    translation = offset + linear @ center - center
    if model == "rigid":
        t = sitk.Euler3DTransform()
    else:
        t = sitk.Similarity3DTransform()
    t.SetCenter(tuple(float(v) for v in center))
    if model == "rigid":
        u, _, vt = np.linalg.svd(linear)
        t.SetMatrix(tuple((u @ vt).ravel()))
    else:
        scale = float(np.cbrt(abs(np.linalg.det(linear))))
        u, _, vt = np.linalg.svd(linear / scale)
        t.SetMatrix(tuple((u @ vt).ravel()))
        t.SetScale(scale)
    t.SetTranslation(tuple(float(v) for v in translation))
    return t


def _from_itk3d(transform: sitk.Transform) -> NDArray[np.float64]:
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0)
    linear = np.array(transform.GetMatrix()).reshape(3, 3)
    center = np.array(transform.GetCenter())
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = np.array(transform.GetTranslation()) + center - linear @ center
    return out


def _cast3d(transform: sitk.Transform, model: str) -> sitk.Transform:
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0)
    return (sitk.Euler3DTransform if model == "rigid" else sitk.Similarity3DTransform)(transform)


def _mattes3d(
    plane: sitk.Image, volume: sitk.Image, initial: sitk.Transform, *, bins: int, iterations: int,
    max_step_um: float, free_tilt: bool,
) -> tuple[sitk.Transform, float]:
    """One Mattes-MI optimisation on one level; returns (transform, metric x valid fraction)."""
    method = mattes_method(plane, bins=bins)
    # Plain gradient descent whose learning rate is set once so that the first step moves no image point by
    # more than max_step_um. (The regular-step optimizer normalises the scaled gradient: when the shifts
    # have converged and only the tilt gradient is left, its first step turns the plane by a whole
    # "learning rate" in RADIANS, tens of degrees, and lands on a wrong optimum.)
    method.SetOptimizerAsGradientDescent(
        learningRate=1.0, numberOfIterations=int(iterations), convergenceMinimumValue=1e-6, convergenceWindowSize=10,
        estimateLearningRate=method.Once, maximumStepSizeInPhysicalUnits=float(max_step_um),
    )
    method.SetOptimizerScalesFromPhysicalShift()
    if not free_tilt:
        # Rotations about x and y held (weight 0): on the coarse levels a ~20-40 px image constrains the
        # tilt too weakly, and a free tilt lets a right start drift away. Euler3D parameters are
        # (angle_x, angle_y, angle_z, tx, ty, tz); Similarity3D (versor_x, versor_y, versor_z, tx, ty, tz, s).
        n = len(initial.GetParameters())
        method.SetOptimizerWeights([0.0, 0.0] + [1.0] * (n - 2))
    return run_mattes(method, plane, volume, initial)


def _tilt_rotation(tilt_x_deg: float, tilt_y_deg: float) -> NDArray[np.float64]:
    """``Ry(tilt_y) @ Rx(tilt_x)``: carries +z to a normal tilted by tilt_x about x, then tilt_y about y."""
    cx, sx = np.cos(np.radians(tilt_x_deg)), np.sin(np.radians(tilt_x_deg))
    cy, sy = np.cos(np.radians(tilt_y_deg)), np.sin(np.radians(tilt_y_deg))
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    return ry @ rx


def _rotate_volume(volume: NDArray[np.float64], rotation: NDArray[np.float64]) -> NDArray[np.float64]:
    """``out(q) = volume(c + R (q - c))`` on the same grid (isotropic voxels, c the centre voxel).

    Slab ``k`` of the output is then the plane through height ``k`` of the volume rotated by ``R`` about
    its centre. Outside the volume the nearest voxel is used (no artificial edge).
    """
    centre = (np.array(volume.shape, dtype=np.float64) - 1) / 2.0
    matrix = rotation[::-1, ::-1]  # (x, y, z) -> (z, y, x) index order
    return ndimage.affine_transform(volume, matrix, centre - matrix @ centre, order=1, mode="nearest")


def _plane_samples(
    volume: NDArray[np.float64], voxel_um: float, z_offset_um: float, grid: _Grid, matrix: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Volume values (trilinear) at every image pixel's plane point, and whether it lies inside the volume."""
    p = grid.points_um().reshape(-1, 2)
    q = np.column_stack([p, np.zeros(len(p))]) @ matrix[:3, :3].T + matrix[:3, 3]
    origin = np.array(_volume_origin(volume.shape, voxel_um, z_offset_um))
    index = (q - origin) / voxel_um  # (x, y, z) index
    nz, ny, nx = volume.shape
    inside = np.all((index >= 0) & (index <= np.array([nx - 1, ny - 1, nz - 1])), axis=1)
    values = ndimage.map_coordinates(volume, index[inside][:, ::-1].T, order=1)
    return values, inside


def _image_motion(q: NDArray[np.float64], centre: NDArray[np.float64], lever_um: float) -> NDArray[np.float64]:
    """4x4 motion of the image frame about ``centre`` (3,), from the refinement parameters ``q``.

    ``q[:3]``: rotation vector times ``lever_um`` (µm moved at ``lever_um`` from the centre); ``q[3:6]``:
    translation (µm); ``q[6]`` (similarity): log scale times ``lever_um``. All parameters are then in µm of
    image-point motion, which keeps the least-squares problem well scaled.
    """
    angle = float(np.linalg.norm(q[:3])) / lever_um
    rotation = np.eye(3)
    if angle > 0:
        k = q[:3] / (angle * lever_um)
        cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
        rotation = rotation + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross
    linear = rotation * (np.exp(q[6] / lever_um) if q.size > 6 else 1.0)
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ centre + q[3:6]
    return out


def _saturated_voxels(volume: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Voxels far outside the robust range, shape of ``volume``: above ``hi + (hi - median) / 2`` or below
    ``lo - (median - lo) / 2`` (``lo, hi`` its 0.5 / 99.5 percentiles), e.g. metal fiducials in a light alloy.

    None in a volume whose extremes are a population of inclusions (the dense benchmark phantom).
    """
    low, median, high = np.percentile(volume, [0.5, 50.0, 99.5])
    return (volume > high + 0.5 * (high - median)) | (volume < low - 0.5 * (median - low))


def _refine_least_squares(
    volume: NDArray[np.float64], voxel_um: float, z_offset_um: float, image: NDArray[np.float64], grid: _Grid,
    matrix: NDArray[np.float64], *, model: str, refine: bool, saturated: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.float64], float, float, str]:
    """Step 5: local least-squares refinement of the plane with a fitted intensity mapping.

    The image (standardised) is compared with ``g(v) + (a + b v) x + (c + d v) y``: ``v`` is the volume
    sampled (trilinear) at the plane point of every image pixel and blurred in the plane by ``s`` image pixels,
    ``g`` a Legendre polynomial of degree :data:`_MAPPING_DEGREE` over the range of ``v`` on the starting
    plane, and the terms in the image coordinates ``x, y`` (centred, in half-extents) a gentle linear
    shading of the image (a backscatter detector's, +-4 % in the simulated SEM); all of it refitted by
    linear least squares at every pose (variable projection: the residual is what no smooth function of the
    volume explains). The 6 (rigid) or 7 (similarity) pose parameters of a motion of the image frame about
    its centre (:func:`_image_motion`) are then fitted by Levenberg-Marquardt with forward differences.
    ``s`` is chosen once, at the start, as the blur in [0, 2] px that best explains the image (parabola
    through 0, 0.5, ..., 2): an SEM image is blurred by its probe, the volume on the plane only by its
    voxels, and an unmatched blur biases the tilt. (An image sharper than the volume is left as it is.)

    Why: the Mattes histogram of 32 bins spends its information on the noise of a 128 px image, a cubic
    mapping cannot follow the kink of attenuation -> backscatter yield at the matrix value, and shading and
    blur not modelled pull a weakly constrained tilt. Measured on the benchmark's SEM cases (seed 7000, 50
    planes): worst tilt error 0.66 deg (median 0.16) after the MI stages; 0.40 deg with a degree-9 mapping
    alone; 0.31 deg (median 0.11) with mapping, shading and blur, and 0.28 deg on 50 more planes (seed 7001).

    Parameters
    ----------
    volume : ndarray, shape (nz, ny, nx)
        Volume on its robust intensity range.
    voxel_um, z_offset_um : float
        Volume geometry (see the module conventions).
    image : ndarray, shape (rows, cols)
        Image on its robust intensity range, geometry ``grid``. Images of more than :data:`_LS_MAX_SAMPLES`
        pixels are binned (block means) to fewer.
    matrix : ndarray, shape (4, 4)
        Starting ``sample_from_image``.
    model : {"rigid", "similarity"}
    refine : bool
        False: only evaluate the residual at ``matrix`` (no blur, ``s = 0``).
    saturated : ndarray of bool, shape (nz, ny, nx), optional
        Voxels far outside the robust range (:func:`_saturated_voxels`). Image pixels whose plane point lies
        within a voxel of one are left out: clipping flattened those objects (metal fiducials, 30 times the
        matrix's attenuation), so their partial-volume edges have no one-to-one relation with the image, and
        their extent in height is quantised by the voxels; on a section through the fiducials' equators they
        pulled the tilt 0.6 deg off. (Their in-plane positions were used by steps 1-3.)

    Returns
    -------
    matrix : ndarray, shape (4, 4)
        Refined (or the start, if the refinement failed, did not lower the residual or moved an image corner
        by more than :data:`_LS_MAX_MOVE_VOXELS` voxels).
    unexplained : float
        Fraction of the image variance (pixels inside the volume) left unexplained by the fitted mapping; in
        [0, 1], 0 for a perfect one-to-one match, near 1 for unrelated images.
    moved_um : float
        Largest move of an image corner by the refinement (µm; 0 if the start is kept).
    note : str
        What happened, for the result message.
    """
    from scipy.optimize import least_squares  # local: only this stage needs it

    rows, cols = grid.shape
    k = max(1, int(np.ceil(np.sqrt(rows * cols / _LS_MAX_SAMPLES))))
    if k > 1:  # bin k x k: the grid stays regular (for the blur) with at most _LS_MAX_SAMPLES pixels
        rows, cols = rows // k, cols // k
        image = image[: rows * k, : cols * k].reshape(rows, k, cols, k).mean(axis=(1, 3))
        origin = np.array(grid.origin_um) + (k - 1) / 2 * grid.pixel_um
        grid = _Grid((rows, cols), grid.pixel_um * k, origin + np.array([cols - 1, rows - 1]) / 2 * grid.pixel_um * k)
    points = grid.points_um().reshape(-1, 2)
    points = np.column_stack([points, np.zeros(points.shape[0])])
    volume_origin = np.array(_volume_origin(volume.shape, voxel_um, z_offset_um))
    upper = np.array(volume.shape[::-1], dtype=np.float64) - 1.0
    centre = np.array([grid.center_um[0], grid.center_um[1], 0.0])
    lever = 0.5 * grid.extent_um

    def sample(m: NDArray[np.float64], blur_px: float) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
        index = (points @ m[:3, :3].T + m[:3, 3] - volume_origin) / voxel_um  # (x, y, z) index
        inside = np.all((index >= 0) & (index <= upper), axis=1)
        values = ndimage.map_coordinates(volume, index[:, ::-1].T, order=1, mode="nearest")
        if blur_px > 0:
            values = ndimage.gaussian_filter(values.reshape(rows, cols), blur_px, mode="nearest").ravel()
        return values, inside

    start_values, inside = sample(matrix, 0.0)
    if saturated is not None and saturated.any():
        index = (points @ matrix[:3, :3].T + matrix[:3, 3] - volume_origin) / voxel_um
        near = ndimage.map_coordinates(saturated.astype(np.float32), index[:, ::-1].T, order=1, mode="nearest")
        inside &= near == 0  # not within a voxel of a saturated one
    n_columns = _MAPPING_DEGREE + 5
    if inside.sum() < 4 * n_columns + 64:
        return matrix, float("nan"), 0.0, "; least-squares refinement skipped (too little overlap)"
    y = image.ravel()[inside]
    spread = float(np.std(y))
    if spread == 0:
        return matrix, float("nan"), 0.0, "; least-squares refinement skipped (constant image)"
    y = (y - float(np.mean(y))) / spread
    low, high = np.percentile(start_values[inside], [0.5, 99.5])
    if not high > low:
        low, high = float(start_values[inside].min()), float(start_values[inside].max()) + 1e-12
    shading = (points[inside, :2] - centre[:2]) / lever  # (x, y) in half-extents
    root_n = np.sqrt(float(y.size))
    n_parameters = 7 if model == "similarity" else 6

    def residuals_at(m: NDArray[np.float64], blur_px: float) -> NDArray[np.float64]:
        values, _ = sample(m, blur_px)
        t = (np.clip(values[inside], low, high) - low) / (high - low) * 2.0 - 1.0
        basis = np.column_stack([np.polynomial.legendre.legvander(t, _MAPPING_DEGREE), shading,
                                 shading * t[:, None]])
        # Normal equations (the Legendre and shading columns are well conditioned; SVD-based lstsq is ~30x
        # slower), with a negligible ridge so that an empty Legendre order cannot make them singular.
        normal = basis.T @ basis
        normal[np.diag_indices_from(normal)] += 1e-9 * np.trace(normal)
        coefficients = np.linalg.solve(normal, basis.T @ y)
        return (y - basis @ coefficients) / root_n

    if not refine:
        return matrix, float(np.sum(residuals_at(matrix, 0.0) ** 2)), 0.0, ""
    blurs = np.asarray(_LS_BLURS_PX, dtype=np.float64)
    costs = np.array([np.sum(residuals_at(matrix, b) ** 2) for b in blurs])
    best = int(np.argmin(costs))
    blur = float(blurs[best])
    if 0 < best < blurs.size - 1:  # vertex of the parabola through the best and its neighbours
        curvature = costs[best - 1] - 2.0 * costs[best] + costs[best + 1]
        if curvature > 0:
            blur += 0.5 * (blurs[1] - blurs[0]) * (costs[best - 1] - costs[best + 1]) / curvature
    before = float(np.sum(residuals_at(matrix, blur) ** 2))

    def residuals(q: NDArray[np.float64]) -> NDArray[np.float64]:
        return residuals_at(matrix @ _image_motion(q, centre, lever), blur)

    try:
        solution = least_squares(residuals, np.zeros(n_parameters), method="lm", diff_step=1e-3,
                                 max_nfev=100 * n_parameters)
    except (ValueError, np.linalg.LinAlgError) as error:
        return matrix, before, 0.0, f"; least-squares refinement failed ({error})"
    after = float(np.sum(solution.fun**2))
    refined = matrix @ _image_motion(solution.x, centre, lever)
    corners = np.array([[grid.origin_um[0] + i * (cols - 1) * grid.pixel_um,
                         grid.origin_um[1] + j * (rows - 1) * grid.pixel_um, 0.0, 1.0] for i in (0, 1) for j in (0, 1)])
    moved = float(np.linalg.norm((corners @ refined.T - corners @ matrix.T)[:, :3], axis=1).max())
    if not (np.all(np.isfinite(refined)) and after < before):
        return matrix, before, 0.0, "; least-squares refinement kept the mutual-information result (no improvement)"
    if moved > _LS_MAX_MOVE_VOXELS * voxel_um:
        return matrix, before, 0.0, (f"; least-squares refinement discarded (it moved the plane by {moved:.1f} um, "
                                     f"limit {_LS_MAX_MOVE_VOXELS * voxel_um:.1f} um)")
    return refined, after, moved, (f"; least-squares refinement (matched blur {blur:.2f} px) moved the plane by "
                                   f"{moved:.2f} um")


def find_slice_in_volume(
    volume: ArrayLike,
    image: ArrayLike,
    *,
    voxel_size_um: float,
    image_pixel_size_um: float,
    z_offset_um: float = 0.0,
    image_center_um: ArrayLike = (0.0, 0.0),
    model: SliceModel = "rigid",
    height_range_um: tuple[float, float] | None = None,
    slab_um: float | None = None,
    rotation_range_deg: tuple[float, float] = (-180.0, 180.0),
    rotation_step_deg: float = 10.0,
    n_candidates: int = 10,
    max_tilt_deg: float = 3.0,
    histogram_bins: int = 32,
    min_overlap: float = 0.5,
    min_nmi: float = 1.03,
    min_significance: float = MIN_SIGNIFICANCE,
    final_refinement: bool = True,
    raise_on_failure: bool = True,
) -> SliceInVolumeResult:
    """Find the (possibly tilted) plane of ``volume`` that ``image`` shows, by mutual information.

    See the module notes for the method. The image may be of another modality (e.g. a backscatter
    micrograph of a section through the sample imaged by X-ray tomography).

    Parameters
    ----------
    volume : array_like, shape (nz, ny, nx)
        Volume on the reconstruction grid (at least 8 voxels per axis).
    image : array_like, shape (rows, cols)
        The 2-D image (at least 16 px per side).
    voxel_size_um : float
        Volume voxel edge (µm).
    image_pixel_size_um : float
        Image pixel size (µm, in the image's own frame).
    z_offset_um : float
        Sample height of the volume centre (µm).
    image_center_um : (float, float)
        Image-frame position of the image centre (µm), e.g. the microscope stage position.
    model : {"rigid", "similarity"}
        "similarity" also fits an isotropic scale (sample µm per image µm).
    height_range_um : (float, float), optional
        Sample heights searched in step 1. Default: the whole volume.
    slab_um : float, optional
        Slab thickness of the global search. Default: 6 voxels (tolerates tilts of a few degrees over the
        field of view).
    rotation_range_deg : (float, float)
        In-plane rotations searched in step 1. Default: all.
    rotation_step_deg : float
        Rotation step of step 1.
    n_candidates : int
        Starts refined in step 2.
    max_tilt_deg : float
        If the search with horizontal slabs gives a result below the limits, it is repeated with slabs tilted
        by this angle about x and about y, both ways, and the better result kept. 0 disables the retry.
    histogram_bins : int
        Bins of the Mattes metric and the NMI confidence.
    min_overlap : float
        Smallest accepted fraction of the image inside the volume.
    min_nmi : float
        Smallest accepted normalised mutual information.
    min_significance : float
        Smallest accepted significance of the NMI against misplacements (see the result's ``significance``).
    final_refinement : bool
        Run the least-squares refinement of step 5 (module notes). False keeps the mutual-information result.
    raise_on_failure : bool
        If False, a low-NMI result is returned with ``ok=False``. Too little overlap always raises.

    Returns
    -------
    SliceInVolumeResult

    Raises
    ------
    RegistrationError
        No overlap (the image cannot lie in the volume), low NMI, a constant input, or an ITK failure.
    ValueError
        Wrong dimensionality (``volume`` not 3-D, ``image`` not 2-D), too small, NaN, or bad options.
    """
    vol = _as_volume(volume)
    img = _as_image_2d(image, "image")
    voxel = _positive(voxel_size_um, "voxel_size_um")
    grid = _Grid(img.shape, _positive(image_pixel_size_um, "image_pixel_size_um"),
                 _pair(image_center_um, "image_center_um"))
    if not np.isfinite(z_offset_um):
        raise ValueError(f"z_offset_um must be finite, got {z_offset_um!r}")
    if model not in _MODELS:
        raise ValueError(f"model must be one of {_MODELS}, got {model!r}")
    nz, ny, nx = vol.shape
    z_lo = -(nz - 1) / 2 * voxel + z_offset_um
    z_hi = (nz - 1) / 2 * voxel + z_offset_um
    if height_range_um is None:
        height_range_um = (z_lo, z_hi)
    h_lo, h_hi = (float(v) for v in height_range_um)
    if not (np.isfinite(h_lo) and np.isfinite(h_hi) and h_lo <= h_hi):
        raise ValueError(f"height_range_um must be (low, high) with low <= high, got {height_range_um!r}")
    if h_hi < z_lo or h_lo > z_hi:
        raise RegistrationError(
            f"no overlap: height_range_um {height_range_um} lies outside the volume's heights "
            f"[{z_lo:.1f}, {z_hi:.1f}] um"
        )
    slab = 6.0 * voxel if slab_um is None else _positive(slab_um, "slab_um")
    low_angle, high_angle = (float(v) for v in rotation_range_deg)
    if not (np.isfinite(low_angle) and np.isfinite(high_angle) and low_angle <= high_angle):
        raise ValueError(f"rotation_range_deg must be (low, high) with low <= high, got {rotation_range_deg!r}")
    step = _positive(rotation_step_deg, "rotation_step_deg")
    if int(n_candidates) != n_candidates or n_candidates < 1:
        raise ValueError(f"n_candidates must be a positive integer, got {n_candidates!r}")
    if int(histogram_bins) != histogram_bins or histogram_bins < 4:
        raise ValueError(f"histogram_bins must be an integer >= 4, got {histogram_bins!r}")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap must lie in (0, 1], got {min_overlap!r}")
    if not (np.isfinite(max_tilt_deg) and 0 <= max_tilt_deg < 45):
        raise ValueError(f"max_tilt_deg must lie in [0, 45), got {max_tilt_deg!r}")
    if np.ptp(vol) == 0 or np.ptp(img) == 0:
        raise RegistrationError("the volume or the image is constant: there is nothing to register")

    span = high_angle - low_angle
    n_angles = max(1, int(np.ceil(span / step)) + (0 if span >= 360 - 1e-9 else 1))
    angles = low_angle + np.arange(n_angles) * step
    half = max(1, int(round(slab / voxel / 2)))
    k_lo = max(0, int(np.floor((h_lo - z_lo) / voxel)))
    k_hi = min(nz - 1, int(np.ceil((h_hi - z_lo) / voxel)))
    centres_k = list(range(k_lo, k_hi + 1, half)) or [k_lo]
    slab_grid = _Grid((ny, nx), voxel, np.zeros(2))
    volume_centre = np.array([0.0, 0.0, float(z_offset_um)])

    # SimpleITK images and pyramid, shared by every start.
    # Mutual information on a robust intensity range (see _mutual_information.robust_range).
    vol_eq, img_eq = robust_range(vol), robust_range(img)
    sitk_volume = _sitk_volume(vol_eq, voxel, float(z_offset_um))
    sitk_plane = _sitk_plane(img_eq, grid)
    centre = np.array([grid.center_um[0], grid.center_um[1], 0.0])
    # Levels in units of the volume voxel: smoothing sigma f/2 voxels on both, the image subsampled to match.
    levels = [f for f in (4, 2, 1) if min(ny, nx) / f >= 16]
    pyramid: dict[int, tuple[sitk.Image, sitk.Image]] = {}
    for f in levels:
        if f == 1:
            pyramid[f] = (sitk_plane, sitk_volume)
            continue
        sigma_um = 0.5 * f * voxel
        smooth_img = ndimage.gaussian_filter(img_eq, sigma_um / grid.pixel_um)
        k = max(1, int(round(f * voxel / grid.pixel_um)))
        small = smooth_img[::k, ::k]
        small_grid = _Grid(small.shape, grid.pixel_um * k, grid.center_um
                           + np.array([((small.shape[1] - 1) * k - (img.shape[1] - 1)) / 2,
                                       ((small.shape[0] - 1) * k - (img.shape[0] - 1)) / 2]) * grid.pixel_um)
        smooth_vol = sitk.SmoothingRecursiveGaussian(sitk_volume, sigma_um)
        pyramid[f] = (_sitk_plane(small, small_grid), sitk.Shrink(smooth_vol, [f, f, f]))

    def optimise(transform: sitk.Transform, factors: list[int], free_tilt: bool) -> tuple[sitk.Transform, float]:
        value = np.inf
        for f in factors:
            plane_img, vol_img = pyramid[f]
            transform, value = _mattes3d(plane_img, vol_img, transform, bins=histogram_bins, iterations=200,
                                         max_step_um=0.5 * f * voxel, free_tilt=free_tilt)
            transform = _cast3d(transform, model)
        return transform, value

    def attempt(tilts_deg: list[tuple[float, float]]) -> tuple[NDArray[np.float64], float, float, int]:
        """Steps 1-3 for slabs perpendicular to the given tilts; returns (matrix, nmi, overlap, n starts)."""
        # Step 1: slabs every half slab over the height range, for every tilt, all searched at once.
        slabs, origin = [], []
        for tilt in tilts_deg:
            rotation = _tilt_rotation(*tilt)
            tilted = vol if tilt == (0.0, 0.0) else _rotate_volume(vol, rotation)
            for k in centres_k:
                slabs.append(tilted[max(0, k - half) : min(nz, k + half + 1)].mean(axis=0))
                origin.append((rotation, z_lo + k * voxel))
        candidates = _search_starts(slabs, slab_grid, img, grid, angles, np.array([1.0]), int(n_candidates),
                                    coarse_size=_SEARCH_SIZE)
        if not candidates:
            raise RegistrationError("no overlap: the image overlaps no slab of the volume by at least 25 %")
        # Step 2: every start on the candidate levels with its tilt held (in-plane rotation, shift and height
        # free); the best, by mutual information x overlap, goes on.
        coarse = [f for f in levels if f in _CANDIDATE_LEVELS] or levels[:1]
        best_transform: sitk.Transform | None = None
        best_value = np.inf
        errors: list[str] = []
        for candidate in candidates:
            rotation, height = origin[candidate.fixed_index]
            start = np.eye(4)
            start[:2, :2] = candidate.matrix[:2, :2]
            start[:2, 3] = candidate.matrix[:2, 2]
            start[2, 3] = height
            # The slab lives in the volume rotated about its centre: sample = c + R (slab point - c).
            to_sample = np.eye(4)
            to_sample[:3, :3] = rotation
            to_sample[:3, 3] = volume_centre - rotation @ volume_centre
            try:
                transform, value = optimise(_to_itk3d(to_sample @ start, model, centre), coarse, free_tilt=False)
            except RuntimeError as error:  # ITK: e.g. the plane left the volume for this start
                errors.append(str(error).strip().splitlines()[-1])
                continue
            if value < best_value:
                best_value, best_transform = value, transform
        if best_transform is None:
            raise RegistrationError(f"no overlap: SimpleITK could not evaluate any start ({'; '.join(errors)})")
        # Step 3: the tilt is freed from the last candidate level down to full resolution.
        try:
            transform, _ = optimise(best_transform, [f for f in levels if f <= coarse[-1]], free_tilt=True)
        except RuntimeError as error:
            raise RegistrationError(f"SimpleITK refinement failed: {str(error).strip().splitlines()[-1]}") from error
        matrix = _from_itk3d(transform)
        values, inside = _plane_samples(vol_eq, voxel, float(z_offset_um), grid, matrix)
        nmi = normalized_mutual_information(img_eq.ravel()[inside], values, bins=int(histogram_bins)) \
            if inside.sum() > 64 else 1.0
        return matrix, float(nmi), float(inside.mean()), len(candidates)

    first_error: RegistrationError | None = None
    try:
        matrix, nmi, overlap, n_starts = attempt([(0.0, 0.0)])
    except RegistrationError as error:
        if max_tilt_deg == 0:
            raise
        first_error, matrix, nmi, overlap, n_starts = error, np.eye(4), -np.inf, 0.0, 0
    if (nmi < min_nmi or overlap < min_overlap) and max_tilt_deg > 0:
        # Fallback: the slabs were too far from the plane's tilt for the search; search slabs tilted by
        # max_tilt_deg about x and about y, both ways (a 2-3 deg tilt over the field moves the plane through
        # several voxels of height, which a horizontal slab can miss).
        t = float(max_tilt_deg)
        try:
            retry = attempt([(t, 0.0), (-t, 0.0), (0.0, t), (0.0, -t)])
        except RegistrationError:
            if first_error is not None:
                raise first_error from None
            retry = None
        if retry is not None and retry[1] > nmi:
            matrix, nmi, overlap, n_starts = retry[0], retry[1], retry[2], n_starts + retry[3]

    # Step 5: least-squares refinement of the plane with a fitted intensity mapping (a local move).
    matrix, unexplained, moved_um, refinement_note = _refine_least_squares(
        vol_eq, voxel, float(z_offset_um), img_eq, grid, matrix, model=model,
        refine=final_refinement and overlap >= min_overlap, saturated=_saturated_voxels(vol),
    )
    if moved_um > 0:
        values, inside = _plane_samples(vol_eq, voxel, float(z_offset_um), grid, matrix)
        nmi = normalized_mutual_information(img_eq.ravel()[inside], values, bins=int(histogram_bins)) \
            if inside.sum() > 64 else 1.0
        overlap = float(inside.mean())

    def nmi_moved(motion: NDArray[np.float64]) -> tuple[float, float]:
        moved = np.eye(4)
        moved[:2, :2], moved[:2, 3] = motion[:2, :2], motion[:2, 2]
        values, inside = _plane_samples(vol_eq, voxel, float(z_offset_um), grid, matrix @ moved)
        if inside.sum() <= 64:
            return 1.0, float(inside.mean())
        return normalized_mutual_information(img_eq.ravel()[inside], values, bins=int(histogram_bins)), \
            float(inside.mean())

    significance, null_nmi = null_significance(nmi, nmi_moved, centre_um=grid.center_um, extent_um=grid.extent_um,
                                                overlap=overlap)
    plane = plane_parameters(matrix, image_center_um=grid.center_um)
    center = matrix[:3, :3] @ centre + matrix[:3, 3]
    value = -mattes_metric(sitk_plane, sitk_volume, _to_itk3d(matrix, model, centre), bins=histogram_bins)
    message = (
        f"plane at height {plane.height_um:.2f} um (image centre -> ({center[0]:.1f}, {center[1]:.1f}, "
        f"{center[2]:.1f}) um), tilt {plane.tilt_deg:.2f} deg (about x {plane.tilt_x_deg:.2f}, about y "
        f"{plane.tilt_y_deg:.2f}), in-plane rotation {plane.rotation_deg:.2f} deg, scale {plane.scale:.4f}; "
        f"NMI {nmi:.3f} (limit {min_nmi}; wrong placements {null_nmi:.3f}, significance {significance:.1f} sigma, "
        f"limit {min_significance}), overlap {overlap:.2f} (limit {min_overlap}), {n_starts} start(s), "
        f"unexplained variance {unexplained:.3f}{refinement_note}"
    )
    if overlap < min_overlap:
        raise RegistrationError(f"no overlap: {message}")
    ok = nmi >= min_nmi and significance >= min_significance  # NaN (not assessable) fails
    if not ok and raise_on_failure:
        raise RegistrationError(f"slice-in-volume registration rejected (image and volume do not match): {message}")
    return SliceInVolumeResult(
        sample_from_image=matrix, plane=plane, center_um=center, mattes_mi=float(value), nmi=float(nmi),
        overlap_fraction=overlap, n_candidates=n_starts, ok=bool(ok), message=message,
        significance=float(significance), null_nmi=float(null_nmi), unexplained_variance=float(unexplained),
    )
