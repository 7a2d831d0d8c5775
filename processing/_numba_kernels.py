"""Numba-compiled inner loops of the back-projections (optional: imported only when numba is present).

Private module: the public entry points are :func:`corrflow.processing.fbp.fbp` and
:func:`corrflow.processing.fbp.fbp_volume`, which fall back to NumPy when numba is missing. Every kernel
here has a NumPy twin in :mod:`corrflow.processing.fbp` and the tests check that both agree.

The kernels are compiled on first use and cached on disk (``cache=True``), so only the first process
after an install pays the ~2-5 s compilation.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["backproject_direct", "spread_gridrec"]


@numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False, nogil=True)
def backproject_direct(table, slope, cos_t, sin_t, center, out):  # pragma: no cover - compiled
    """Pixel-driven linear-interpolation back-projection of one slice.

    table, slope : (n_angles, width) float32, weighted filtered projections with zero guard columns
        and their forward differences; ``table[k, i]`` is detector position ``i`` (guard included).
    cos_t, sin_t : (n_angles,) float64
    center : float, rotation-axis position in ``table`` columns (guard included).
    out : (n, n) float32, overwritten; ``out[iy, ix]`` at ``x = ix - (n-1)/2``, ``y = iy - (n-1)/2``.

    Only the pixels whose ray hits ``[0.5, width - 2.5]`` are visited: beyond that the interpolation
    reads only the zero guards (the caller pads >= 2 zero columns on each side), so the clip leaves the
    inner loop, which LLVM then vectorises; the 0.5 px margin absorbs float32 rounding of positions.
    """
    n_angles, width = table.shape
    n = out.shape[0]
    half = (n - 1) / 2.0
    low = 0.5
    high = width - 2.5
    for iy in numba.prange(n):
        y = iy - half
        acc = np.zeros(n, dtype=np.float32)
        for k in range(n_angles):
            c = cos_t[k]
            base = center - y * sin_t[k] - half * c  # detector position of pixel ix = 0
            if abs(c) < 1e-12:
                if base < low or base > high:
                    continue
                i0, i1 = 0, n
            else:
                a = (low - base) / c
                b = (high - base) / c
                if a > b:
                    a, b = b, a
                i0 = max(0, int(math.ceil(a)))
                i1 = min(n, int(math.floor(b)) + 1)
            t = table[k]
            s = slope[k]
            base32 = np.float32(base)
            c32 = np.float32(c)
            for ix in range(i0, i1):
                p = base32 + np.float32(ix) * c32
                i = np.int32(p)
                acc[ix] += t[i] + (p - np.float32(i)) * s[i]
        out[iy, :] = acc


@numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False, nogil=True)
def spread_gridrec(  # pragma: no cover - compiled
    values_re, values_im, grid_x, grid_y, width, offset, kernel_table, table_scale, grids
):
    """Spread complex samples onto per-thread oversampled Fourier grids with a tabulated kernel.

    values_re, values_im : (n_samples,) float32, sample values.
    grid_x, grid_y : (n_samples,) float64, sample positions in fine-grid units (centred on 0).
    width : int, kernel width W (grid cells).
    offset : int, array index of grid position 0 (leaves >= W/2 cells of margin on every side).
    kernel_table : (m,) float32, kernel ``phi(d)`` at ``d = i / table_scale`` cells from its centre.
    grids : (n_threads, P, P, 2) float32, accumulators (real, imaginary), added to.

    Each parallel chunk owns its own grid, so there are no write races; the caller sums them.
    """
    n_samples = values_re.size
    n_chunks = grids.shape[0]
    chunk = (n_samples + n_chunks - 1) // n_chunks
    half = width / 2.0
    for part in numba.prange(n_chunks):
        g = grids[part]
        kx = np.empty(width, np.float32)
        ky = np.empty(width, np.float32)
        for s in range(part * chunk, min(n_samples, (part + 1) * chunk)):
            x = grid_x[s] + offset
            y = grid_y[s] + offset
            x0 = int(math.ceil(x - half))
            y0 = int(math.ceil(y - half))
            for i in range(width):
                d = abs(x0 + i - x) * table_scale
                j = int(d)
                kx[i] = kernel_table[j] + (d - j) * (kernel_table[j + 1] - kernel_table[j])
                d = abs(y0 + i - y) * table_scale
                j = int(d)
                ky[i] = kernel_table[j] + (d - j) * (kernel_table[j + 1] - kernel_table[j])
            vr = values_re[s]
            vi = values_im[s]
            for j in range(width):
                wr = vr * ky[j]
                wi = vi * ky[j]
                row = g[y0 + j]
                for i in range(width):
                    row[x0 + i, 0] += wr * kx[i]
                    row[x0 + i, 1] += wi * kx[i]

