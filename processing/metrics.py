"""Image comparison metrics for reconstructions and registrations.

All functions take two arrays of the same shape (any number of dimensions; the axis order does not
matter) and an optional boolean ``mask`` of that shape selecting the pixels compared. Values are
computed in float64 and returned as Python floats in the units of the inputs (``nrmse`` is
dimensionless).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["material_means", "nrmse", "rmse"]

Normalization = Literal["range", "std", "mean"]


def _selected(a: ArrayLike, b: ArrayLike, mask: ArrayLike | None) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {x.shape} and {y.shape}")
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            raise ValueError(f"mask must be a boolean array, got dtype {m.dtype}")
        if m.shape != x.shape:
            raise ValueError(f"mask shape {m.shape} does not match the arrays' shape {x.shape}")
        x, y = x[m], y[m]
    else:
        x, y = x.ravel(), y.ravel()
    if x.size == 0:
        raise ValueError("no pixels to compare (empty arrays or an all-False mask)")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("a or b contains NaN or infinite values among the compared pixels")
    return x, y


def rmse(a: ArrayLike, b: ArrayLike, *, mask: ArrayLike | None = None) -> float:
    """Root-mean-square difference ``sqrt(mean((a - b)²))`` over the (masked) pixels.

    Parameters
    ----------
    a, b : array_like, same shape
        Test and reference images (e.g. a reconstruction and the rasterised phantom, mu in 1/mm).
    mask : array_like of bool, same shape, optional
        Pixels to compare; default all.

    Returns
    -------
    float
        In the units of ``a`` and ``b``.
    """
    x, y = _selected(a, b, mask)
    return float(np.sqrt(np.mean((x - y) ** 2)))


def nrmse(
    a: ArrayLike, b: ArrayLike, *, mask: ArrayLike | None = None, normalization: Normalization = "range"
) -> float:
    """RMSE normalised by a property of the REFERENCE ``b`` over the same pixels (dimensionless).

    Parameters
    ----------
    a, b : array_like, same shape
        Test image ``a`` and reference image ``b``.
    mask : array_like of bool, optional
    normalization : {"range", "std", "mean"}
        Denominator: ``max(b) - min(b)`` (default; comparable across phantoms with zero background),
        the standard deviation of ``b``, or ``|mean(b)|``.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Also when the denominator is zero (a constant reference for "range"/"std", zero mean for "mean").
    """
    x, y = _selected(a, b, mask)
    if normalization == "range":
        denominator = float(y.max() - y.min())
    elif normalization == "std":
        denominator = float(y.std())
    elif normalization == "mean":
        denominator = float(abs(y.mean()))
    else:
        raise ValueError(f"normalization must be 'range', 'std' or 'mean', got {normalization!r}")
    if denominator == 0.0:
        raise ValueError(f"cannot normalise by the reference's {normalization}: it is zero")
    return float(np.sqrt(np.mean((x - y) ** 2)) / denominator)


def material_means(volume: ArrayLike, labels: ArrayLike) -> dict[int, float]:
    """Mean value of ``volume`` inside each label.

    Parameters
    ----------
    volume : array_like, any shape
        Values, e.g. mu in 1/mm.
    labels : array_like of int, same shape
        Integer material label per voxel; every distinct label gets a mean (negative labels included).

    Returns
    -------
    dict[int, float]
        ``{label: mean}`` in the units of ``volume``, labels in increasing order.
    """
    values = np.asarray(volume, dtype=np.float64)
    lab = np.asarray(labels)
    if lab.shape != values.shape:
        raise ValueError(f"labels shape {lab.shape} does not match volume shape {values.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got dtype {lab.dtype}")
    if lab.size == 0:
        raise ValueError("volume is empty")
    if not np.all(np.isfinite(values)):
        raise ValueError("volume contains NaN or infinite values")
    unique, inverse = np.unique(lab.ravel(), return_inverse=True)
    sums = np.bincount(inverse, weights=values.ravel())
    counts = np.bincount(inverse)
    return {int(u): float(s / n) for u, s, n in zip(unique, sums, counts)}
