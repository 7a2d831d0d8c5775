"""Sub-voxel height of a sectioned plane in a volume, once its in-plane registration is known.

A micrograph registered in-plane to a reconstructed slice fixes x, y, rotation and scale, but the
slice search only fixes the plane's height to the nearest voxel. The similarity between the
registered micrograph and the slices around that height peaks at the true height; a parabola
through the peak and its two neighbours gives it to a fraction of a voxel.

The similarity is a rank (Spearman) correlation inside the sample: the two modalities map
materials to grey levels differently (fiducials are 30x the matrix in X-ray attenuation, 2x in
backscatter), and a plain correlation is then dominated by whichever image has the extreme values,
and by the sample's outline, which is the same in every slice. Ranks only assume that the order
of the grey levels agrees for most of the area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from corrflow.processing import transforms


@dataclass(frozen=True)
class SectionHeight:
    """Height estimate of a sectioned plane.

    Attributes
    ----------
    z_um : float
        Estimated height (um) in the volume's z coordinates.
    peak_index : int
        Slice with the highest similarity.
    similarity : ndarray, shape (n_slices,)
        Rank correlation of the registered image with each slice inside the sample (NaN where undefined).
    """

    z_um: float
    peak_index: int
    similarity: NDArray[np.float64]


def normalized_cross_correlation(a: NDArray[np.floating], b: NDArray[np.floating], *, mask: NDArray[np.bool_]) -> float:
    """Pearson correlation of ``a`` and ``b`` over ``mask`` (same shapes); NaN if either is flat there."""
    if a.shape != b.shape or a.shape != mask.shape:
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, mask {mask.shape}")
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    if x.size < 2:
        return float("nan")
    x -= x.mean()
    y -= y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def rank_correlation(a: NDArray[np.floating], b: NDArray[np.floating], *, mask: NDArray[np.bool_]) -> float:
    """Spearman rank correlation of ``a`` and ``b`` over ``mask``; NaN if either is flat there."""
    from scipy.stats import rankdata

    if a.shape != b.shape or a.shape != mask.shape:
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, mask {mask.shape}")
    if mask.sum() < 2:
        return float("nan")
    ra, rb = rankdata(a[mask]), rankdata(b[mask])
    return normalized_cross_correlation(ra, rb, mask=np.ones(ra.shape, dtype=bool))


def sample_support(image: NDArray[np.floating], *, erosion_px: int = 3) -> NDArray[np.bool_]:
    """Pixels inside the sample: Otsu threshold of the smoothed image, holes filled, eroded.

    Pores are dark like the surroundings, so holes are filled; the erosion keeps the sample's
    outline, identical in every slice, out of the comparison.
    """
    from skimage.filters import threshold_otsu

    finite = np.isfinite(image)
    smooth = ndimage.gaussian_filter(np.where(finite, image, np.nanmedian(image)), 1.5)
    inside = ndimage.binary_fill_holes(smooth > threshold_otsu(smooth[finite])) & finite
    return ndimage.binary_erosion(inside, iterations=erosion_px) if erosion_px else inside


def estimate_section_height(
    registered_image: NDArray[np.floating],
    slices: NDArray[np.floating],
    z_um: NDArray[np.floating],
) -> SectionHeight:
    """Height of the plane imaged by ``registered_image`` among ``slices``.

    Parameters
    ----------
    registered_image : ndarray, shape (ny, nx)
        The micrograph resampled onto the slices' grid (NaN outside its field of view).
    slices : ndarray, shape (n_slices, ny, nx)
        Consecutive slices of the volume around the expected height.
    z_um : ndarray, shape (n_slices,)
        Height of each slice (um), equally spaced.

    Returns
    -------
    SectionHeight
        Parabolic sub-voxel peak of the correlation; at the ends of the window the peak slice's
        own height is returned (the true plane may lie outside: widen the window).

    Raises
    ------
    ValueError
        Shapes disagree, fewer than 3 slices, or the image overlaps no slice.
    """
    slices = np.asarray(slices)
    z = np.asarray(z_um, dtype=np.float64)
    if slices.ndim != 3 or slices.shape[1:] != registered_image.shape:
        raise ValueError(f"slices must be (n, {registered_image.shape}), got {slices.shape}")
    if z.shape != (slices.shape[0],) or slices.shape[0] < 3:
        raise ValueError(f"need >= 3 slices with one height each, got {slices.shape[0]} slices, {z.shape} heights")
    if np.isfinite(registered_image).sum() < 16:
        raise ValueError("the registered image does not overlap the slices")
    mask = sample_support(registered_image)
    if mask.sum() < 16:
        raise ValueError("the registered image shows no sample to compare (support after erosion is empty)")
    scores = np.array([rank_correlation(registered_image, s, mask=mask) for s in slices])
    if not np.isfinite(scores).any():
        raise ValueError("no slice correlates with the registered image (flat images)")
    k = int(np.nanargmax(scores))
    z_est = z[k]
    if 0 < k < len(z) - 1 and np.all(np.isfinite(scores[k - 1 : k + 2])):
        left, centre, right = scores[k - 1 : k + 2]
        curvature = left - 2 * centre + right
        if curvature < 0:
            offset = 0.5 * (left - right) / curvature  # vertex of the parabola, in slices
            z_est = z[k] + float(np.clip(offset, -0.5, 0.5)) * (z[1] - z[0])
    return SectionHeight(z_um=float(z_est), peak_index=k, similarity=scores)


def micrograph_on_slice_grid(
    micrograph: NDArray[np.floating],
    *,
    sample_from_microscope: NDArray[np.floating],
    micrograph_pixel_size_um: float,
    stage_x_um: float,
    stage_y_um: float,
    slice_shape: tuple[int, int],
    voxel_size_um: float,
    slice_z_um: float,
) -> NDArray[np.float32]:
    """Resample a micrograph onto a reconstruction slice's grid through ``sample_from_microscope``.

    Slice pixel ``[iy, ix]`` is the sample point ``((ix-(n-1)/2) v, (iy-(n-1)/2) v, slice_z_um)``;
    it is mapped into the microscope stage frame with the inverse transform and interpolated
    (bilinear) in the micrograph. Points outside the micrograph are NaN.
    """
    ny, nx = slice_shape
    iy, ix = np.mgrid[0:ny, 0:nx]
    points = np.column_stack(
        [
            ((ix - (nx - 1) / 2) * voxel_size_um).ravel(),
            ((iy - (ny - 1) / 2) * voxel_size_um).ravel(),
            np.full(ix.size, slice_z_um),
        ]
    )
    stage = transforms.apply(transforms.invert(sample_from_microscope), points)
    rows, cols = micrograph.shape
    col = (stage[:, 0] - stage_x_um) / micrograph_pixel_size_um + (cols - 1) / 2
    row = (stage[:, 1] - stage_y_um) / micrograph_pixel_size_um + (rows - 1) / 2
    values = ndimage.map_coordinates(micrograph.astype(np.float32), [row, col], order=1, cval=np.nan)
    return values.reshape(ny, nx).astype(np.float32)
