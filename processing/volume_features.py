"""Find features (pores, precipitates) in a reconstructed volume: the region of interest for the next instrument.

Conventions
-----------
The volume is ``(z, y, x)`` on the reconstruction grid of docs/GEOMETRY.md: voxel ``[k, iy, ix]`` is the
``beamline_sample`` point ``((ix - (nx-1)/2) v, (iy - (ny-1)/2) v, (k - (nz-1)/2) v + z_offset_um)``, values
are attenuation (1/mm). Centroids and sizes are returned in micrometres in that frame.

Method
------
1. Light Gaussian smoothing (noise) and the host ("matrix") level: the median of the voxels above the
   Otsu threshold of the volume (clipped to its 1-99 percentiles, so a few very dense fiducials do not set
   it): Otsu separates the empty surroundings from the sample, the median of the sample is its matrix.
2. Dark features (pores): voxels below ``threshold`` (default half the matrix level, halfway to an empty
   pore) that are enclosed by the sample (3-D hole filling), so the empty space around the sample is not a
   pore. Bright features (precipitates): voxels above ``threshold`` (default twice the matrix level), and
   below ``exclude_above`` if given (e.g. to leave out the fiducials).
3. Connected components (face connectivity); components touching the volume border are dropped (they are
   cut, their centroid would be biased).
4. Each component is measured with partial-volume weights on its 1-voxel dilation,
   ``w = clip(|value - matrix| / contrast, 0, 1)``, where the contrast is the matrix level for pores and
   (feature core level - matrix) for bright features: the centroid is the weighted mean position (sub-voxel)
   and the volume ``sum(w) v^3``, from which the equivalent-sphere radius follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from skimage.filters import threshold_otsu

from corrflow.processing.registration import RegistrationError
from corrflow.processing.roi import RegionOfInterest

__all__ = ["VolumeFeature", "detect_volume_features", "largest_feature"]

Polarity = Literal["dark", "bright"]


@dataclass(frozen=True, eq=False)
class VolumeFeature:
    """One feature found in a volume (``beamline_sample`` frame, µm).

    Attributes
    ----------
    centroid_um : ndarray, shape (3,)
        Partial-volume-weighted centroid ``(x, y, z)``.
    volume_um3 : float
        Partial-volume-weighted volume.
    equivalent_radius_um : float
        Radius of the sphere of the same volume.
    n_voxels : int
        Voxels in the thresholded component.
    bbox_min_um, bbox_max_um : ndarray, shape (3,)
        Bounding box of the thresholded component (voxel centres).
    mean_value : float
        Mean smoothed value over the component (1/mm).
    contrast : float
        ``|feature level - matrix level|`` (1/mm): its strength against the host, for a confidence cut.
    """

    centroid_um: NDArray[np.float64]
    volume_um3: float
    equivalent_radius_um: float
    n_voxels: int
    bbox_min_um: NDArray[np.float64]
    bbox_max_um: NDArray[np.float64]
    mean_value: float
    contrast: float

    def as_roi(self, *, frame: str = "beamline_sample", margin_um: float = 0.0, label: str = "") -> RegionOfInterest:
        """The feature as a box region (its bounding box grown by ``margin_um``) centred on the centroid."""
        half = np.maximum(self.centroid_um - self.bbox_min_um, self.bbox_max_um - self.centroid_um) + margin_um
        return RegionOfInterest(center_um=self.centroid_um.copy(), half_size_um=np.maximum(half, 0.0), frame=frame,
                                label=label)


def _as_volume(volume: ArrayLike) -> NDArray[np.float64]:
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be a 3-D array (z, y, x), got shape {vol.shape}")
    if vol.size == 0 or not np.issubdtype(vol.dtype, np.number) or np.iscomplexobj(vol):
        raise ValueError(f"volume must be a non-empty real numeric array, got dtype {vol.dtype}, shape {vol.shape}")
    vol = vol.astype(np.float64)
    if not np.all(np.isfinite(vol)):
        raise ValueError("volume contains NaN or infinite values")
    return vol


def detect_volume_features(
    volume: ArrayLike,
    *,
    voxel_size_um: float,
    z_offset_um: float = 0.0,
    polarity: Polarity = "dark",
    threshold: float | None = None,
    exclude_above: float | None = None,
    matrix_level: float | None = None,
    min_voxels: int = 4,
    smooth_sigma_voxels: float = 0.6,
    exclude_border: bool = True,
) -> tuple[VolumeFeature, ...]:
    """Connected features darker (pores) or brighter (precipitates) than the host, largest first.

    See the module notes for the method.

    Parameters
    ----------
    volume : array_like, shape (nz, ny, nx)
        Reconstructed attenuation (1/mm) on the reconstruction grid.
    voxel_size_um : float
        Voxel edge (µm).
    z_offset_um : float
        Sample height of the volume centre (µm).
    polarity : {"dark", "bright"}
        Pores ("dark") or dense inclusions ("bright").
    threshold : float, optional
        Value (1/mm) separating feature from host. Default: ``0.5 * matrix`` for dark, ``2 * matrix`` for
        bright.
    exclude_above : float, optional
        Bright features whose core exceeds this value (1/mm) are dropped (e.g. Cu fiducials at 16 1/mm).
    matrix_level : float, optional
        Host attenuation (1/mm). Default: estimated (module notes, step 1).
    min_voxels : int
        Smaller components are noise.
    smooth_sigma_voxels : float
        Gaussian smoothing before thresholding (0 disables).
    exclude_border : bool
        Drop components touching the volume border.

    Returns
    -------
    tuple of VolumeFeature
        Sorted by ``volume_um3``, largest first; may be empty.

    Raises
    ------
    ValueError
        Wrong dimensionality (not 3-D), NaN, bad options.
    RegistrationError
        The volume has no host level to compare with (constant, or a non-positive matrix level).
    """
    vol = _as_volume(volume)
    voxel = float(voxel_size_um)
    if not (np.isfinite(voxel) and voxel > 0):
        raise ValueError(f"voxel_size_um must be a positive finite number, got {voxel_size_um!r}")
    if not np.isfinite(z_offset_um):
        raise ValueError(f"z_offset_um must be finite, got {z_offset_um!r}")
    if polarity not in ("dark", "bright"):
        raise ValueError(f"polarity must be 'dark' or 'bright', got {polarity!r}")
    if int(min_voxels) != min_voxels or min_voxels < 1:
        raise ValueError(f"min_voxels must be a positive integer, got {min_voxels!r}")
    if not (np.isfinite(smooth_sigma_voxels) and smooth_sigma_voxels >= 0):
        raise ValueError(f"smooth_sigma_voxels must be a non-negative number, got {smooth_sigma_voxels!r}")
    for name, value in (("threshold", threshold), ("exclude_above", exclude_above), ("matrix_level", matrix_level)):
        if value is not None and not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")

    smooth = ndimage.gaussian_filter(vol, smooth_sigma_voxels) if smooth_sigma_voxels > 0 else vol
    if matrix_level is None:
        lo, hi = np.percentile(smooth, [1, 99])
        if hi <= lo:
            raise RegistrationError("the volume is (nearly) constant: there is no host level to find features in")
        clipped = np.clip(smooth, lo, hi)
        sample = smooth > float(threshold_otsu(clipped))
        matrix_level = float(np.median(smooth[sample]))
    matrix = float(matrix_level)
    if matrix <= 0:
        raise RegistrationError(f"the host (matrix) level is {matrix:.3g} 1/mm: features cannot be told from it")

    if polarity == "dark":
        level = 0.5 * matrix if threshold is None else float(threshold)
        candidates = smooth < level
        # Only holes of the sample: the space around it touches the border, holes are enclosed.
        candidates &= ndimage.binary_fill_holes(smooth >= level)
    else:
        level = 2.0 * matrix if threshold is None else float(threshold)
        candidates = smooth > level
    labels, n = ndimage.label(candidates)
    if n == 0:
        return ()

    shape = np.array(vol.shape)
    origin = np.array([-(vol.shape[2] - 1) / 2 * voxel, -(vol.shape[1] - 1) / 2 * voxel,
                       -(vol.shape[0] - 1) / 2 * voxel + float(z_offset_um)])  # (x, y, z) of voxel [0, 0, 0]
    found: list[VolumeFeature] = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        own = labels[region] == index
        n_voxels = int(own.sum())
        if n_voxels < int(min_voxels):
            continue
        starts = np.array([s.start for s in region])
        stops = np.array([s.stop for s in region])
        if exclude_border and (np.any(starts == 0) or np.any(stops == shape)):
            continue
        core_values = smooth[region][own]
        if polarity == "bright":
            core = float(np.percentile(core_values, 90))
            if exclude_above is not None and core > float(exclude_above):
                continue
            contrast = core - matrix
        else:
            contrast = matrix - max(float(np.percentile(core_values, 10)), 0.0)
        if contrast <= 0:
            continue
        # Partial-volume weights on the component grown by one voxel (its blurred boundary), in a padded box.
        lo = np.maximum(starts - 2, 0)
        hi = np.minimum(stops + 2, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grown = ndimage.binary_dilation(labels[box] == index, structure=np.ones((3, 3, 3), dtype=bool))
        # Smoothed values: the smoothing (sigma < 1 voxel) keeps the integral inside the grown region and
        # halves the noise that the clipped weights of the host voxels around the feature would add.
        values = smooth[box]
        difference = (matrix - values) if polarity == "dark" else (values - matrix)
        weights = np.where(grown, np.clip(difference / contrast, 0.0, 1.0), 0.0)
        total = float(weights.sum())
        if total <= 0:
            continue
        kk, jj, ii = np.indices(weights.shape, dtype=np.float64)
        centroid_index = np.array([(weights * ii).sum(), (weights * jj).sum(), (weights * kk).sum()]) / total
        centroid_index += lo[::-1]  # (x, y, z) index
        volume_um3 = total * voxel**3
        component_index = np.argwhere(labels[region] == index) + starts  # (k, j, i)
        found.append(VolumeFeature(
            centroid_um=origin + centroid_index * voxel,
            volume_um3=volume_um3,
            equivalent_radius_um=float(np.cbrt(3.0 * volume_um3 / (4.0 * np.pi))),
            n_voxels=n_voxels,
            bbox_min_um=origin + component_index.min(axis=0)[::-1] * voxel,
            bbox_max_um=origin + component_index.max(axis=0)[::-1] * voxel,
            mean_value=float(core_values.mean()),
            contrast=float(contrast),
        ))
    found.sort(key=lambda f: -f.volume_um3)
    return tuple(found)


def largest_feature(
    volume: ArrayLike,
    *,
    voxel_size_um: float,
    z_offset_um: float = 0.0,
    polarity: Polarity = "dark",
    threshold: float | None = None,
    exclude_above: float | None = None,
    matrix_level: float | None = None,
    min_voxels: int = 4,
    smooth_sigma_voxels: float = 0.6,
    exclude_border: bool = True,
) -> VolumeFeature:
    """The largest feature of :func:`detect_volume_features` (same parameters).

    Raises
    ------
    RegistrationError
        No feature found (nothing to hand off).
    """
    features = detect_volume_features(
        volume, voxel_size_um=voxel_size_um, z_offset_um=z_offset_um, polarity=polarity, threshold=threshold,
        exclude_above=exclude_above, matrix_level=matrix_level, min_voxels=min_voxels,
        smooth_sigma_voxels=smooth_sigma_voxels, exclude_border=exclude_border,
    )
    if not features:
        raise RegistrationError(
            f"no {polarity} feature of at least {min_voxels} voxels found inside the volume (away from its border)"
        )
    return features[0]
