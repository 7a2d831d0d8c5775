"""Ring-artefact (stripe) removal in sinograms.

A detector pixel whose response differs slightly from its flat-field correction adds the same error to
every projection: a vertical stripe in the sinogram, a ring around the rotation axis in the slice.

Method: Vo, Atwood & Drakopoulos, "Superior techniques for eliminating ring artifacts in X-ray
micro-tomography", Opt. Express 26, 28396 (2018), algorithm 3 ("sorting-based"). Each detector column
is sorted along the angle axis, which turns the sample's contribution into a smooth, monotonic profile
and leaves a stripe as a column that is offset from its neighbours at every sorted position; a median
filter across columns (along the detector axis) of the sorted sinogram removes the offset without
blurring the sample, and the inverse sort puts every value back at its angle. It removes full and
partial stripes of moderate amplitude; very wide or saturated stripes need the paper's other
algorithms.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

__all__ = ["remove_stripes_sorting"]


def remove_stripes_sorting(sinograms: ArrayLike, *, size: int = 21) -> NDArray[np.float32]:
    """Remove stripes (ring artefacts) with Vo's sorting-based filter.

    Parameters
    ----------
    sinograms : array_like, shape (n_angles, n_cols) or (n_rows, n_angles, n_cols)
        Line integrals (or transmission); axis -2 is the angle, axis -1 the detector column. Any real
        numeric dtype.
    size : int
        Width (detector columns, odd, >= 3, < n_cols) of the median filter across columns: wider than
        the widest stripe to remove (a stripe of w columns needs ``size > 2 w``), narrower than the
        sample's features to keep.

    Returns
    -------
    ndarray, float32, same shape
        Sinograms with the stripes removed, same units.

    Raises
    ------
    ValueError
        Wrong dimensionality or dtype, NaN/inf values, or a bad ``size``.
    """
    data = np.asarray(sinograms)
    if data.ndim not in (2, 3):
        raise ValueError(
            f"sinograms must have shape (n_angles, n_cols) or (n_rows, n_angles, n_cols), got {data.shape}"
        )
    if data.dtype == np.bool_ or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ValueError(f"sinograms must be a real numeric array, got dtype {data.dtype}")
    n_cols = data.shape[-1]
    if int(size) != size or size < 3 or size % 2 == 0:
        raise ValueError(f"size must be an odd integer >= 3, got {size!r}")
    if size >= n_cols:
        raise ValueError(f"size ({size}) must be smaller than the number of detector columns ({n_cols})")
    stack = data.astype(np.float32, copy=False).reshape((-1,) + data.shape[-2:])
    if not np.all(np.isfinite(stack)):
        raise ValueError("sinograms contain NaN or infinite values")
    out = np.empty(stack.shape, dtype=np.float32)
    for r, sinogram in enumerate(stack):
        order = np.argsort(sinogram, axis=0, kind="stable")
        ranked = np.take_along_axis(sinogram, order, axis=0)
        # Median across columns only: within a column the sorted profile is the sample's own signal.
        smoothed = ndimage.median_filter(ranked, size=(1, int(size)), mode="reflect")
        np.put_along_axis(out[r], order, smoothed, axis=0)
    return out.reshape(data.shape)
