"""The PNG report of a correlative experiment: slices, micrograph and the registration overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray


def _stretch(image: NDArray[np.floating]) -> NDArray[np.float32]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image, dtype=np.float32)
    lo, hi = np.percentile(finite, [1, 99.5])
    out = np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def write_report(
    path: Path,
    *,
    title: str,
    volume_slice: NDArray[np.floating],
    vertical_slice: NDArray[np.floating],
    truth_slice: NDArray[np.floating] | None,
    micrograph: NDArray[np.floating],
    micrograph_on_slice: NDArray[np.floating],
    voxel_size_um: float,
    micrograph_pixel_size_um: float,
    matched_fiducials_um: NDArray[np.floating] | None,
    lines: list[str],
) -> Path:
    """Write a 2 x 3 panel PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # headless: reports are written by workers without a display
    import matplotlib.pyplot as plt

    ny, nx = volume_slice.shape
    half_x, half_y = (nx - 1) / 2 * voxel_size_um, (ny - 1) / 2 * voxel_size_um
    extent = (-half_x, half_x, -half_y, half_y)
    fig, axes = plt.subplots(2, 3, figsize=(15, 9.5), constrained_layout=True)
    fig.suptitle(title, fontsize=13)

    # Display range from the slice itself: the dense fiducials (~30x the matrix) would otherwise
    # squeeze the matrix, pores and precipitates into a few grey levels.
    vmin, vmax = np.percentile(volume_slice[np.isfinite(volume_slice)], [1.0, 99.0])
    ax = axes[0, 0]
    im = ax.imshow(volume_slice, origin="lower", cmap="gray", extent=extent, vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, label="mu (1/mm)")
    ax.set(title="reconstruction at the sectioned plane", xlabel="x (um)", ylabel="y (um)")

    ax = axes[0, 1]
    if truth_slice is not None:
        im = ax.imshow(truth_slice, origin="lower", cmap="gray", extent=extent, vmin=vmin, vmax=vmax)
        fig.colorbar(im, ax=ax, label="mu (1/mm)")
        ax.set(title="phantom (ground truth)", xlabel="x (um)", ylabel="y (um)")
    else:
        ax.axis("off")

    ax = axes[0, 2]
    nz = vertical_slice.shape[0]
    ax.imshow(vertical_slice, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, extent=(-half_x, half_x, -(nz - 1) / 2 * voxel_size_um, (nz - 1) / 2 * voxel_size_um))
    ax.set(title="vertical section (y = 0)", xlabel="x (um)", ylabel="z (um)")

    ax = axes[1, 0]
    rows, cols = micrograph.shape
    ax.imshow(micrograph, origin="lower", cmap="gray", extent=(0, cols * micrograph_pixel_size_um, 0, rows * micrograph_pixel_size_um))
    ax.set(title="micrograph (microscope stage frame)", xlabel="um", ylabel="um")

    ax = axes[1, 1]
    rgb = np.dstack([_stretch(micrograph_on_slice), _stretch(volume_slice), _stretch(micrograph_on_slice)])
    ax.imshow(rgb, origin="lower", extent=extent)
    if matched_fiducials_um is not None and len(matched_fiducials_um):
        ax.scatter(matched_fiducials_um[:, 0], matched_fiducials_um[:, 1], s=80, facecolors="none", edgecolors="yellow", label="matched fiducials")
        ax.legend(loc="lower right", fontsize=8)
    ax.set(title="overlay: X-ray (green) / registered micrograph (magenta)", xlabel="x (um)", ylabel="y (um)")

    ax = axes[1, 2]
    ax.axis("off")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9, transform=ax.transAxes)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
