"""Frames of reference and 4x4 homogeneous transforms between them.

Conventions
-----------
* Points are row vectors of physical coordinates in micrometres, shape ``(n, 3)`` as
  ``(x, y, z)``; a transform ``T_b_from_a`` maps points expressed in frame ``a`` to frame
  ``b``: ``p_b = T_b_from_a @ [p_a, 1]``.
* Rotations are right-handed and counter-clockwise about +z when seen from +z, in degrees.
* Transforms are composed and inverted explicitly (:func:`compose`, :func:`invert`) and recorded
  with the data as nested lists (:func:`to_list`), never as Euler angles alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _as_matrix(matrix: ArrayLike) -> NDArray[np.float64]:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"a homogeneous transform must be 4x4, got shape {m.shape}")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"the last row of a homogeneous transform must be [0, 0, 0, 1], got {m[3]}")
    return m


def similarity(
    *, scale: float = 1.0, rotation_deg: float = 0.0, translation_um: ArrayLike = (0.0, 0.0, 0.0)
) -> NDArray[np.float64]:
    """Similarity transform: isotropic ``scale`` in x and y, rotation about +z, then translation.

    z is translated but not scaled: in-plane microscope frames are related to the beamline
    sample frame by a similarity in x-y and a height offset in z.

    Returns
    -------
    ndarray, shape (4, 4), float64
    """
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    t = np.asarray(translation_um, dtype=np.float64)
    if t.shape != (3,):
        raise ValueError(f"translation_um must have 3 components (x, y, z), got shape {t.shape}")
    c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    m = np.eye(4)
    m[:2, :2] = scale * np.array([[c, -s], [s, c]])
    m[:3, 3] = t
    return m


def compose(*transforms: ArrayLike) -> NDArray[np.float64]:
    """Compose transforms right to left: ``compose(T_c_from_b, T_b_from_a) == T_c_from_a``."""
    if not transforms:
        raise ValueError("compose needs at least one transform")
    result = np.eye(4)
    for t in transforms:
        result = result @ _as_matrix(t)
    return result


def invert(transform: ArrayLike) -> NDArray[np.float64]:
    """Inverse of a homogeneous transform; raises if it is singular."""
    m = _as_matrix(transform)
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError("transform is singular (its linear part has zero determinant)")
    return np.linalg.inv(m)


def apply(transform: ArrayLike, points_um: ArrayLike) -> NDArray[np.float64]:
    """Map points ``(n, 3)`` (or one point ``(3,)``) through ``transform``."""
    m = _as_matrix(transform)
    p = np.asarray(points_um, dtype=np.float64)
    single = p.ndim == 1
    p = np.atleast_2d(p)
    if p.shape[-1] != 3:
        raise ValueError(f"points must have 3 coordinates (x, y, z), got shape {p.shape}")
    out = p @ m[:3, :3].T + m[:3, 3]
    return out[0] if single else out


@dataclass(frozen=True)
class SimilarityParameters:
    """In-plane similarity parameters recovered from a 4x4 matrix."""

    scale: float
    rotation_deg: float
    translation_um: tuple[float, float, float]


def decompose_similarity(transform: ArrayLike) -> SimilarityParameters:
    """Scale, rotation about z and translation of an in-plane similarity (see :func:`similarity`)."""
    m = _as_matrix(transform)
    a, b = m[0, 0], m[1, 0]
    return SimilarityParameters(
        scale=float(np.hypot(a, b)),
        rotation_deg=float(np.degrees(np.arctan2(b, a))),
        translation_um=tuple(float(v) for v in m[:3, 3]),
    )


def to_list(transform: ArrayLike) -> list[list[float]]:
    """JSON/HDF5-attribute friendly form of a transform, for metadata."""
    return _as_matrix(transform).tolist()
