"""Sub-voxel height of a sectioned plane in a volume, once its in-plane registration is known.

A micrograph registered in-plane to a reconstructed slice fixes x, y, rotation and scale, but the
slice search only fixes the plane's height to the nearest voxel. The similarity between the
registered micrograph and the volume around that height peaks at the true height; searching it
on a fine grid of heights, with the volume interpolated between slices, gives the height to a
fraction of a voxel.

The similarity is a rank (Spearman) correlation inside the sample (see :func:`sample_support`): the two modalities map
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


def sample_support(slices_mean: NDArray[np.floating], *, erosion_px: int = 3) -> NDArray[np.bool_]:
    """Pixels inside the sample, from the (smoothed) mean of the volume's slices.

    The sample is where the attenuation exceeds half of its typical level (the median of the upper
    half of the values): this holds whether or not vacuum is in view, unlike a two-class split,
    which on an all-sample image separates the dense inclusions instead. Pores are filled; the
    erosion keeps the sample's outline, identical in every slice, out of the comparison.
    """
    values = slices_mean[np.isfinite(slices_mean)]
    if values.size == 0:
        return np.zeros(slices_mean.shape, dtype=bool)
    typical = np.median(values[values >= np.median(values)])
    inside = ndimage.binary_fill_holes(np.nan_to_num(slices_mean, nan=-np.inf) > 0.5 * typical)
    return ndimage.binary_erosion(inside, iterations=erosion_px) if erosion_px else inside


def _bandpass(image: NDArray[np.floating], low_sigma: float, high_sigma: float) -> NDArray[np.float32]:
    """Difference of Gaussians; NaNs (outside a field of view) are filled with the mean first."""
    finite = np.isfinite(image)
    filled = np.where(finite, image, np.mean(image[finite]) if finite.any() else 0.0).astype(np.float32)
    smooth = ndimage.gaussian_filter(filled, low_sigma) if low_sigma > 0 else filled
    return smooth - ndimage.gaussian_filter(filled, high_sigma)


def estimate_section_height(
    registered_image: NDArray[np.floating],
    slices: NDArray[np.floating],
    z_um: NDArray[np.floating],
    *,
    refine_steps: int = 8,
    fit_half_width_voxels: float = 2.0,
    bandpass_voxels: tuple[float, float] = (0.6, 3.0),
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
    refine_steps : int
        Sub-voxel steps per voxel of the continuous refinement.
    fit_half_width_voxels : float
        Half-width (voxels) of the height range around the coarse peak that the parabola is fitted to.
    bandpass_voxels : (float, float)
        In-plane difference-of-Gaussians band-pass (sigmas in voxels) applied to the image and the
        slices first. The low cut removes reconstruction noise (white at the voxel scale); the high
        cut removes what does not depend on height but would dominate a rank correlation of smooth
        images: shading across the micrograph and slow trends across the sample.

    Returns
    -------
    SectionHeight
        Peak of the correlation, refined continuously between the neighbouring slices; at the ends
        of the window the peak slice's own height is returned (the true plane may lie outside:
        widen the window).

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
    mask = sample_support(slices.mean(axis=0)) & np.isfinite(registered_image)
    registered_image = _bandpass(registered_image, *bandpass_voxels)
    slices = np.stack([_bandpass(s, *bandpass_voxels) for s in slices])
    if mask.sum() < 16:
        raise ValueError("the registered image shows no sample to compare (support after erosion is empty)")
    scores = np.array([rank_correlation(registered_image, s, mask=mask) for s in slices])
    if not np.isfinite(scores).any():
        raise ValueError("no slice correlates with the registered image (flat images)")
    k = int(np.nanargmax(scores))
    z_est = float(z[k])
    # Continuous refinement over +-fit_half_width_voxels around the coarse peak (inside the window):
    # the volume between slice centres by linear interpolation (a voxel averages its slab), the
    # correlation on a grid of 1/refine_steps voxel. The peak is flat-topped (features cut near
    # their middle change only to second order), so its argmax wanders with noise; the vertex of a
    # least-squares parabola through the whole curve uses every sample and is the stable estimate.
    lo = max(0.0, k - fit_half_width_voxels)
    hi = min(len(z) - 1.0, k + fit_half_width_voxels)
    positions = np.arange(lo, hi + 1e-9, 1.0 / refine_steps)
    if positions.size >= 3:
        fine = []
        for p in positions:
            j = min(int(np.floor(p)), len(z) - 2)
            w = p - j
            fine.append(rank_correlation(registered_image, (1.0 - w) * slices[j] + w * slices[j + 1], mask=mask))
        fine = np.asarray(fine)
        ok = np.isfinite(fine)
        if ok.sum() >= 3:
            a, b, _ = np.polyfit(positions[ok] - k, fine[ok], 2)
            if a < 0:
                offset = float(np.clip(-b / (2 * a), lo - k, hi - k))
            else:
                offset = float(positions[ok][int(np.argmax(fine[ok]))] - k)
            z_est = float(z[k] + offset * (z[1] - z[0]))
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
    antialias: bool = True,
) -> NDArray[np.float32]:
    """Resample a micrograph onto a reconstruction slice's grid through ``sample_from_microscope``.

    With ``antialias`` (default), a micrograph finer than the voxels is first smoothed with a
    Gaussian of sigma = half a voxel (in micrograph pixels), so each output value represents the
    voxel's area as the reconstruction does, rather than one noisy point.

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
    image = micrograph.astype(np.float32)
    scale = float(np.sqrt(abs(np.linalg.det(np.asarray(sample_from_microscope)[:2, :2]))))
    sigma_px = 0.5 * voxel_size_um / (micrograph_pixel_size_um * scale)
    if antialias and sigma_px > 0.5:
        image = ndimage.gaussian_filter(image, sigma_px)
    values = ndimage.map_coordinates(image, [row, col], order=1, cval=np.nan)
    return values.reshape(ny, nx).astype(np.float32)
