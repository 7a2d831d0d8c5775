"""Flat/dark-field normalization of X-ray projections and the safe negative logarithm.

Conventions
-----------
* Frame stacks are ``(n_frames, rows, cols)`` in detector counts (any real dtype); a single
  ``(rows, cols)`` frame is accepted where noted and keeps its dimensionality.
* Transmission ``T = (projection - dark) / (flat - dark)`` is dimensionless; line integrals
  ``-ln T`` are dimensionless too (``mu_per_mm * mm``), which is what :func:`corrflow.processing.fbp.fbp`
  expects.
* With flats taken before AND after the projections (``flats_after``), each projection is divided by
  the flat interpolated linearly by its position in the acquisition (frame index or time), which
  removes a beam that drifts during the scan.
* Outputs are float32.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["line_integrals", "minus_log", "normalize", "reference_field"]

FlatMethod = Literal["mean", "median"]

# Frames per chunk when normalizing: bounds float32 temporaries for long scans (2048² x 64 = 1 GiB).
_CHUNK_FRAMES = 64


def _check_min_transmission(min_transmission: float) -> float:
    value = float(min_transmission)
    if not np.isfinite(value) or not 0.0 < value < 1.0:
        raise ValueError(f"min_transmission must lie in (0, 1), got {min_transmission!r}")
    return value


def reference_field(frames: ArrayLike, *, name: str, method: FlatMethod = "mean") -> NDArray[np.float32]:
    """Average a stack of reference frames (flats or darks) into one frame.

    Parameters
    ----------
    frames : array_like, shape (n_frames, rows, cols) or (rows, cols)
        Reference frames in detector counts. A 2-D array is taken as already averaged.
    name : str
        Argument name used in error messages (``"flats"``, ``"darks"``).
    method : {"mean", "median"}
        ``"median"`` rejects outliers such as zingers in individual frames.

    Returns
    -------
    ndarray, shape (rows, cols), float32

    Raises
    ------
    ValueError
        Wrong dimensionality, no frames, or any non-finite value.
    """
    if method not in ("mean", "median"):
        raise ValueError(f"flat_method must be 'mean' or 'median', got {method!r}")
    arr = np.asarray(frames)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (n_frames, rows, cols) or (rows, cols), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if arr.ndim == 2:
        return arr.astype(np.float32)
    if method == "median":
        return np.median(arr, axis=0).astype(np.float32)
    return np.mean(arr, axis=0, dtype=np.float64).astype(np.float32)


def _flat_weights(
    n_frames: int, frame_positions: ArrayLike | None, flat_positions: tuple[float, float] | None
) -> NDArray[np.float32]:
    """Weight of the AFTER flat for each projection: 0 at the before-flats' position, 1 at the after-flats'."""
    if frame_positions is None:
        positions = np.arange(n_frames, dtype=np.float64)
    else:
        positions = np.asarray(frame_positions, dtype=np.float64)
        if positions.shape != (n_frames,):
            raise ValueError(
                f"frame_positions must have shape ({n_frames},), one per projection, got {positions.shape}"
            )
        if not np.all(np.isfinite(positions)):
            raise ValueError("frame_positions contains NaN or infinite values")
    if flat_positions is None:
        # Default: the flats were taken just before the first and just after the last projection.
        before, after = float(positions.min()) - 1.0, float(positions.max()) + 1.0
    else:
        try:
            before, after = (float(v) for v in flat_positions)
        except (TypeError, ValueError):
            raise ValueError(
                f"flat_positions must be a pair (before, after) of numbers, got {flat_positions!r}"
            ) from None
        if not (np.isfinite(before) and np.isfinite(after) and after > before):
            raise ValueError(f"flat_positions must be finite with after > before, got {flat_positions!r}")
    # Clipped: a projection outside [before, after] uses the nearer flat, never an extrapolation.
    return np.clip((positions - before) / (after - before), 0.0, 1.0).astype(np.float32)


def _open_beam(flat: NDArray[np.float32], dark: NDArray[np.float32], *, name: str) -> NDArray[np.float64]:
    open_beam = flat.astype(np.float64) - dark
    bad = open_beam <= 0
    if np.any(bad):
        rows, cols = np.nonzero(bad)
        raise ValueError(
            f"{name} must be brighter than darks at every pixel: flat - dark <= 0 at {bad.sum()} pixel(s), "
            f"first at (row, col) = ({rows[0]}, {cols[0]})"
        )
    return open_beam


def normalize(
    projections: ArrayLike,
    flats: ArrayLike,
    darks: ArrayLike,
    *,
    flat_method: FlatMethod = "mean",
    min_transmission: float = 1e-3,
    flats_after: ArrayLike | None = None,
    frame_positions: ArrayLike | None = None,
    flat_positions: tuple[float, float] | None = None,
) -> NDArray[np.float32]:
    """Flat/dark-field correction: transmission ``(projection - dark) / (flat - dark)``.

    Parameters
    ----------
    projections : array_like, shape (n_frames, rows, cols) or (rows, cols)
        Raw projections in detector counts.
    flats : array_like, shape (n_flats, rows, cols) or (rows, cols)
        Open-beam frames (same exposure as the projections), in counts. With ``flats_after``, these are
        the flats taken BEFORE the projections.
    darks : array_like, shape (n_darks, rows, cols) or (rows, cols)
        Closed-shutter frames, in counts. Always averaged with the mean (read noise is Gaussian).
    flat_method : {"mean", "median"}
        How the flat frames of each set are combined.
    min_transmission : float
        Lower clip of the transmission, in (0, 1): pixels where the projection is at or below the dark
        level (photon starvation, noise) become ``min_transmission`` so that ``-ln`` stays finite.
        No upper clip: noise above 1 is kept, so the mean stays unbiased.
    flats_after : array_like, shape (n_flats_after, rows, cols) or (rows, cols), optional
        Open-beam frames taken AFTER the projections. When given, each projection is divided by the
        flat linearly interpolated between the two sets by its position, which removes a beam
        intensity or profile that drifts during the scan (default: one flat set, no interpolation).
    frame_positions : array_like, shape (n_frames,), optional
        Position of each projection in the acquisition, e.g. frame index or time in s (default:
        ``0 .. n_frames - 1``). Only used with ``flats_after``.
    flat_positions : (float, float), optional
        Positions of the before and after flat sets, in the units of ``frame_positions`` (e.g. the mean
        frame index of each set). Default: one step before the first and after the last projection.
        Projections outside the pair use the nearer flat (no extrapolation).

    Returns
    -------
    ndarray, float32, same shape as ``projections``
        Transmission, dimensionless.

    Raises
    ------
    ValueError
        Shape mismatch between projections, flats and darks; a non-numeric dtype; NaN/inf anywhere; a
        pixel whose averaged flat is not above its averaged dark (``flat - dark <= 0``: a dead or
        saturated pixel, zero flats, or swapped arguments, which would otherwise give infinite or
        negative transmission); bad ``frame_positions`` or ``flat_positions``.
    """
    min_t = _check_min_transmission(min_transmission)
    proj = np.asarray(projections)
    if proj.ndim not in (2, 3):
        raise ValueError(f"projections must have shape (n_frames, rows, cols) or (rows, cols), got {proj.shape}")
    if proj.dtype == np.bool_ or not np.issubdtype(proj.dtype, np.number) or np.iscomplexobj(proj):
        raise ValueError(f"projections must be a real numeric array, got dtype {proj.dtype}")
    flat = reference_field(flats, name="flats", method=flat_method)
    dark = reference_field(darks, name="darks", method="mean")
    frame_shape = proj.shape[-2:]
    if flat.shape != frame_shape:
        raise ValueError(f"flats frame shape {flat.shape} does not match projections frame shape {frame_shape}")
    if dark.shape != frame_shape:
        raise ValueError(f"darks frame shape {dark.shape} does not match projections frame shape {frame_shape}")
    open_before = _open_beam(flat, dark, name="flats")
    stack = proj if proj.ndim == 3 else proj[None]
    if flats_after is None:
        if frame_positions is not None or flat_positions is not None:
            raise ValueError("frame_positions and flat_positions need flats_after (a second flat set)")
        inverse_open = (1.0 / open_before).astype(np.float32)
        open_step = None
    else:
        flat_after = reference_field(flats_after, name="flats_after", method=flat_method)
        if flat_after.shape != frame_shape:
            raise ValueError(
                f"flats_after frame shape {flat_after.shape} does not match projections frame shape {frame_shape}"
            )
        open_after = _open_beam(flat_after, dark, name="flats_after")
        weights = _flat_weights(stack.shape[0], frame_positions, flat_positions)
        open_start = open_before.astype(np.float32)
        open_step = (open_after - open_before).astype(np.float32)

    out = np.empty(stack.shape, dtype=np.float32)
    for start in range(0, stack.shape[0], _CHUNK_FRAMES):
        chunk = stack[start : start + _CHUNK_FRAMES].astype(np.float32)
        if not np.all(np.isfinite(chunk)):
            raise ValueError(f"projections contain NaN or infinite values (frames {start}..{start + len(chunk) - 1})")
        chunk -= dark
        if open_step is None:
            chunk *= inverse_open
        else:
            # Both open beams are > 0 at every pixel, so any convex combination of them is too.
            w = weights[start : start + len(chunk), None, None]
            chunk /= open_start + w * open_step
        np.maximum(chunk, np.float32(min_t), out=out[start : start + len(chunk)])
    return out if proj.ndim == 3 else out[0]


def minus_log(transmission: ArrayLike, *, min_transmission: float = 1e-3) -> NDArray[np.float32]:
    """Line integrals ``-ln(max(T, min_transmission))`` of a transmission array.

    Parameters
    ----------
    transmission : array_like, any shape
        Dimensionless transmission, nominally in (0, 1].
    min_transmission : float
        Lower clip in (0, 1) so the result is finite (``<= -ln(min_transmission)``).

    Returns
    -------
    ndarray, float32, same shape
        Dimensionless line integrals ``∫ mu dt``.

    Raises
    ------
    ValueError
        ``transmission`` contains NaN/inf or ``min_transmission`` is outside (0, 1).
    """
    min_t = _check_min_transmission(min_transmission)
    t = np.asarray(transmission, dtype=np.float32)
    if not np.all(np.isfinite(t)):
        raise ValueError("transmission contains NaN or infinite values")
    out = np.maximum(t, np.float32(min_t))
    np.log(out, out=out)
    np.negative(out, out=out)
    return out


def line_integrals(
    projections: ArrayLike,
    flats: ArrayLike,
    darks: ArrayLike,
    *,
    flat_method: FlatMethod = "mean",
    min_transmission: float = 1e-3,
    flats_after: ArrayLike | None = None,
    frame_positions: ArrayLike | None = None,
    flat_positions: tuple[float, float] | None = None,
) -> NDArray[np.float32]:
    """Raw projections to line integrals: :func:`normalize` followed by :func:`minus_log`.

    Parameters, shapes, units and errors are those of :func:`normalize`; the result is float32
    ``-ln(transmission)`` (dimensionless ``∫ mu dt``) with the same shape as ``projections``.
    """
    transmission = normalize(
        projections, flats, darks, flat_method=flat_method, min_transmission=min_transmission,
        flats_after=flats_after, frame_positions=frame_positions, flat_positions=flat_positions,
    )
    # normalize() already clipped at min_transmission, so the log is finite; in place to save memory.
    np.log(transmission, out=transmission)
    np.negative(transmission, out=transmission)
    return transmission
