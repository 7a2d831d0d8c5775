"""Analytic ellipse phantoms: closed-form sinograms and area-averaged rasters (ground truth for FBP).

The sinogram of an ellipse is known exactly (the chord length through it), so reconstruction kernels
are tested and benchmarked against data that no projector under test computed. Conventions are the
reconstruction's (see :mod:`corrflow.processing.fbp`): at rotation angle ``theta`` the detector
coordinate of a point ``(x, y)`` is ``u = x cos(theta) - y sin(theta)``; slices are indexed
``[iy, ix]``. Lengths in µm, attenuation ``mu`` in 1/mm, line integrals dimensionless.

An ellipse is ``(mu_per_mm, x0, y0, a, b, phi_deg)``: centre ``(x0, y0)``, semi-axes ``a`` (along x
before rotation) and ``b``, rotated by ``phi_deg``. The phantoms overlap additively.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["SHEPP_LOGAN_HIGH_CONTRAST", "Ellipse", "detector_sinogram", "line_integrals", "rasterise", "scale_ellipses"]

Ellipse = tuple[float, float, float, float, float, float]

SHEPP_LOGAN_HIGH_CONTRAST: tuple[Ellipse, ...] = (
    (2.0, 0.0, 0.0, 0.69, 0.92, 0.0),
    (-1.6, 0.0, -0.0184, 0.6624, 0.874, 0.0),
    (-0.4, 0.22, 0.0, 0.11, 0.31, -18.0),
    (-0.4, -0.22, 0.0, 0.16, 0.41, 18.0),
    (0.4, 0.0, 0.35, 0.21, 0.25, 0.0),
    (0.4, 0.0, 0.1, 0.046, 0.046, 0.0),
    (0.4, 0.0, -0.1, 0.046, 0.046, 0.0),
    (0.4, -0.08, -0.605, 0.046, 0.023, 0.0),
    (0.4, 0.06, -0.605, 0.023, 0.046, 0.0),
    (0.6, 0.35, 0.45, 0.08, 0.05, 30.0),  # off-axis and rotated: pins orientation and handedness
)
"""A Shepp-Logan variant whose small inner ellipses differ by 0.2-0.6 1/mm from their surroundings;
lengths are fractions of the phantom radius (see :func:`scale_ellipses`)."""


def scale_ellipses(
    ellipses: Sequence[Ellipse], radius_um: float, *, shift_um: tuple[float, float] = (0.0, 0.0)
) -> list[Ellipse]:
    """Ellipses given in fractions of a radius -> µm, shifted by ``shift_um`` (x, y)."""
    return [
        (mu, x * radius_um + shift_um[0], y * radius_um + shift_um[1], a * radius_um, b * radius_um, phi)
        for mu, x, y, a, b, phi in ellipses
    ]


def line_integrals(ellipses_um: Sequence[Ellipse], angles_deg: ArrayLike, u_um: ArrayLike) -> NDArray[np.float64]:
    """Exact line integrals ``sum(mu * chord)``, shape ``(n_angles, n_u)``, at detector positions ``u_um``."""
    theta = np.radians(np.asarray(angles_deg, dtype=np.float64))[:, None]
    u = np.asarray(u_um, dtype=np.float64)[None, :]
    nx, ny = np.cos(theta), -np.sin(theta)
    out = np.zeros((theta.shape[0], u.shape[1]))
    for mu, x0, y0, a, b, phi in ellipses_um:
        relative = -theta - np.radians(phi)
        s_max2 = (a * np.cos(relative)) ** 2 + (b * np.sin(relative)) ** 2
        s = u - (x0 * nx + y0 * ny)
        chord_um = 2 * a * b * np.sqrt(np.clip(s_max2 - s**2, 0, None)) / s_max2
        out += mu * chord_um / 1000.0  # 1/mm x µm
    return out


def detector_sinogram(
    ellipses_um: Sequence[Ellipse],
    angles_deg: ArrayLike,
    *,
    n_cols: int,
    center_px: float,
    pixel_um: float,
    aperture: int = 5,
) -> NDArray[np.float64]:
    """Line integrals averaged over each detector pixel's width, shape ``(n_angles, n_cols)``.

    A real pixel integrates over its width; point samples of a sharp edge alias (the chord has an
    infinite slope there), which alone doubles the interior error of a reconstruction. ``aperture``
    sub-samples per pixel; the rotation axis sits at column ``center_px`` (0-based).
    """
    angles = np.asarray(angles_deg, dtype=np.float64)
    offsets = (np.arange(aperture) + 0.5) / aperture - 0.5
    u_um = ((np.arange(n_cols) - center_px)[:, None] + offsets[None, :]).ravel() * pixel_um
    return line_integrals(ellipses_um, angles, u_um).reshape(angles.size, n_cols, aperture).mean(axis=-1)


def rasterise(
    ellipses_um: Sequence[Ellipse],
    n: int,
    *,
    pixel_um: float,
    grid_center_px: float | None = None,
    supersample: int = 4,
    band_rows: int = 512,
) -> NDArray[np.float64]:
    """Area-averaged ``mu`` (1/mm) on an ``(n, n)`` grid ``[iy, ix]``, pixel ``ix`` at ``x = (ix - grid_center_px) * pixel_um``.

    ``grid_center_px`` defaults to ``(n - 1) / 2``; the raster is computed in bands of
    ``band_rows`` supersampled rows to bound the temporaries.
    """
    centre = (n - 1) / 2 if grid_center_px is None else grid_center_px
    m = n * supersample
    g = ((np.arange(m) + 0.5) / supersample - 0.5 - centre) * pixel_um
    out = np.zeros((n, n))
    band_rows -= band_rows % supersample
    for row0 in range(0, m, band_rows):
        y = g[row0 : row0 + band_rows][:, None]
        x = g[None, :]
        band = np.zeros((y.shape[0], m))
        for mu, x0, y0, a, b, phi in ellipses_um:
            c, s = np.cos(np.radians(phi)), np.sin(np.radians(phi))
            xr, yr = (x - x0) * c + (y - y0) * s, -(x - x0) * s + (y - y0) * c
            band += mu * ((xr / a) ** 2 + (yr / b) ** 2 <= 1)
        rows = band.shape[0] // supersample
        out[row0 // supersample : row0 // supersample + rows] = band.reshape(rows, supersample, n, supersample).mean(axis=(1, 3))
    return out
