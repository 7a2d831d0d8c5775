"""Score simulated experiments against the simulated world's ground truth.

A dry-run is only a test if reconstructing the simulated scan gives back the phantom and
registering the simulated micrograph gives back the known transform. These functions measure
both; they are meaningful only for simulated instruments (the truth is the simulator's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from corrflow.processing import transforms
from corrflow.simulators.phantom import MATERIALS, Phantom


@dataclass(frozen=True)
class ReconstructionError:
    """Reconstruction vs the voxelized phantom, inside the sample (mu in 1/mm)."""

    rmse_per_mm: float
    nrmse: float  # rmse / matrix mu: error as a fraction of the sample's own attenuation
    matrix_mean_error_pct: float  # bias of the matrix interior (away from every edge)
    matrix_noise_per_mm: float  # std of the matrix interior: the noise floor of the scan
    n_voxels: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def phantom_on_volume_grid(
    phantom: Phantom, *, shape_zyx: tuple[int, int, int], voxel_size_um: float, stage_z_um: float = 0.0
) -> NDArray[np.float32]:
    """The phantom's mu voxelized on the reconstruction grid (rows at detector heights, stage z removed)."""
    return phantom.voxelize(shape_zyx=shape_zyx, voxel_size_um=voxel_size_um, z_offset_um=-stage_z_um)


def reconstruction_error(
    volume: NDArray[np.floating], truth: NDArray[np.floating], *, margin_voxels: int = 2
) -> ReconstructionError:
    """Compare a reconstructed volume ``(z, y, x)`` with the voxelized truth on the same grid.

    The comparison region is the sample (truth > 0, i.e. matrix and inclusions; pores included by
    closing the mask), eroded by ``margin_voxels`` from the sample's outer surface so the edge of
    the whole sample, which no FBP reproduces sharply, does not dominate. Interior inclusion edges
    stay in: they are part of what a reconstruction must get right.
    """
    if volume.shape != truth.shape:
        raise ValueError(f"volume shape {volume.shape} differs from truth shape {truth.shape}")
    matrix_mu = MATERIALS["matrix"].mu_per_mm
    sample = ndimage.binary_fill_holes(truth > 0.5 * matrix_mu, structure=np.ones((1, 3, 3)))
    region = ndimage.binary_erosion(sample, iterations=margin_voxels) if margin_voxels else sample
    if not region.any():
        raise ValueError("no voxels of the sample lie inside the volume")
    diff = volume[region].astype(np.float64) - truth[region]
    rmse = float(np.sqrt(np.mean(diff**2)))
    # Matrix interior: truth within 1 % of the matrix value, 2 voxels away from any other material.
    matrix = np.abs(truth - matrix_mu) < 0.01 * matrix_mu
    interior = ndimage.binary_erosion(matrix & region, iterations=2)
    if not interior.any():
        interior = matrix & region
    values = volume[interior].astype(np.float64)
    return ReconstructionError(
        rmse_per_mm=rmse,
        nrmse=rmse / matrix_mu,
        matrix_mean_error_pct=float(100.0 * (values.mean() - matrix_mu) / matrix_mu),
        matrix_noise_per_mm=float(values.std()),
        n_voxels=int(region.sum()),
    )


@dataclass(frozen=True)
class RegistrationError:
    """Estimated vs true ``sample_from_microscope`` over the micrograph's field of view."""

    rms_um: float  # RMS distance between where each transform puts the field-of-view points
    max_um: float
    rotation_error_deg: float
    scale_error_pct: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def registration_error(
    estimated: NDArray[np.floating], true: NDArray[np.floating], *, field_points_um: NDArray[np.floating]
) -> RegistrationError:
    """Distances between ``estimated @ p`` and ``true @ p`` for points ``p`` (microscope stage frame, (n, 3))."""
    pe = transforms.apply(estimated, field_points_um)
    pt = transforms.apply(true, field_points_um)
    distance = np.linalg.norm(pe - pt, axis=1)
    e = transforms.decompose_similarity(estimated)
    t = transforms.decompose_similarity(true)
    rotation = (e.rotation_deg - t.rotation_deg + 180.0) % 360.0 - 180.0
    return RegistrationError(
        rms_um=float(np.sqrt(np.mean(distance**2))),
        max_um=float(distance.max()),
        rotation_error_deg=float(abs(rotation)),
        scale_error_pct=float(100.0 * abs(e.scale / t.scale - 1.0)),
    )


def field_of_view_points(
    *, shape_px: tuple[int, int], pixel_size_um: float, stage_x_um: float, stage_y_um: float, n: int = 9
) -> NDArray[np.float64]:
    """A grid of ``n x n`` points spanning a micrograph's field of view, in the microscope stage frame."""
    rows, cols = shape_px
    xs = stage_x_um + (np.linspace(0, cols - 1, n) - (cols - 1) / 2) * pixel_size_um
    ys = stage_y_um + (np.linspace(0, rows - 1, n) - (rows - 1) / 2) * pixel_size_um
    gx, gy = np.meshgrid(xs, ys)
    return np.column_stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)])
