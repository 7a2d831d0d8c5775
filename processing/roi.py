"""Regions of interest, expressed in any instrument's frame through recorded 4x4 transforms.

Conventions
-----------
* Points are ``(x, y, z)`` in micrometres; a transform ``T_b_from_a`` maps frame-``a`` points to frame
  ``b`` (:mod:`corrflow.processing.transforms`).
* A :class:`RegionOfInterest` is a point (``half_size_um == 0``) or an axis-aligned box in ITS OWN frame.
  Mapped to another frame, the centre maps exactly and the box becomes the axis-aligned box that bounds
  the 8 mapped corners (so it always contains the original region; the corners are kept for display).
* Frame names are free strings; the project uses ``"beamline_sample"`` (the X-ray volume's frame) and
  ``"microscope_stage"``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from corrflow.processing.registration import RegistrationError
from corrflow.processing.transforms import apply, compose, invert, to_list

__all__ = [
    "FrameGraph",
    "MicroscopeTarget",
    "RegionOfInterest",
    "map_roi",
    "microscope_target",
]


def _vector3(value: ArrayLike, name: str, *, non_negative: bool = False) -> NDArray[np.float64]:
    v = np.asarray(value, dtype=np.float64)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be 3 finite numbers (x, y, z) in um, got {value!r}")
    if non_negative and np.any(v < 0):
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return v


def _frame_name(value: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty frame name, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class RegionOfInterest:
    """A point or an axis-aligned box in a named frame.

    Attributes
    ----------
    center_um : ndarray, shape (3,)
        Centre ``(x, y, z)`` (µm) in ``frame``.
    half_size_um : ndarray, shape (3,)
        Half extents along the frame's axes (µm); zeros for a point.
    frame : str
        Name of the frame of reference.
    label : str
        Free text, e.g. "largest pore".
    corners_um : ndarray, shape (8, 3), optional
        For a mapped box, the exactly mapped corners of the original box (the box here bounds them).
    """

    center_um: NDArray[np.float64]
    half_size_um: NDArray[np.float64]
    frame: str
    label: str = ""
    corners_um: NDArray[np.float64] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "center_um", _vector3(self.center_um, "center_um"))
        object.__setattr__(self, "half_size_um", _vector3(self.half_size_um, "half_size_um", non_negative=True))
        _frame_name(self.frame, "frame")
        if self.corners_um is not None:
            corners = np.asarray(self.corners_um, dtype=np.float64)
            if corners.shape != (8, 3):
                raise ValueError(f"corners_um must have shape (8, 3), got {corners.shape}")
            object.__setattr__(self, "corners_um", corners)

    @classmethod
    def point(cls, center_um: ArrayLike, *, frame: str, label: str = "") -> RegionOfInterest:
        """A single point."""
        return cls(center_um=np.asarray(center_um, dtype=np.float64), half_size_um=np.zeros(3), frame=frame,
                   label=label)

    @classmethod
    def box(cls, *, min_um: ArrayLike, max_um: ArrayLike, frame: str, label: str = "") -> RegionOfInterest:
        """The axis-aligned box between two opposite corners."""
        lo, hi = _vector3(min_um, "min_um"), _vector3(max_um, "max_um")
        if np.any(hi < lo):
            raise ValueError(f"max_um must be >= min_um on every axis, got {min_um!r} and {max_um!r}")
        return cls(center_um=(lo + hi) / 2, half_size_um=(hi - lo) / 2, frame=frame, label=label)

    @property
    def is_point(self) -> bool:
        return bool(np.all(self.half_size_um == 0))

    @property
    def min_um(self) -> NDArray[np.float64]:
        return self.center_um - self.half_size_um

    @property
    def max_um(self) -> NDArray[np.float64]:
        return self.center_um + self.half_size_um

    def box_corners_um(self) -> NDArray[np.float64]:
        """The 8 corners of the box in this frame, shape (8, 3) (all equal for a point)."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        return self.center_um + signs * self.half_size_um

    def contains(self, points_um: ArrayLike, *, tolerance_um: float = 1e-9) -> NDArray[np.bool_]:
        """Whether points ``(n, 3)`` (this frame) lie in the box; shape (n,)."""
        p = np.atleast_2d(np.asarray(points_um, dtype=np.float64))
        return np.all(np.abs(p - self.center_um) <= self.half_size_um + tolerance_um, axis=-1)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RegionOfInterest:
        """The inverse of :meth:`to_dict` (a region given as JSON: a flow parameter, a plan argument).

        ``half_size_um`` defaults to zeros (a point); ``corners_um`` and ``label`` are optional.

        Raises
        ------
        ValueError
            A missing or unknown field, or a value the constructor refuses; the message names it.
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"a region of interest is a mapping of frame, center_um, half_size_um, label; got {type(record).__name__}")
        known = {"frame", "center_um", "half_size_um", "label", "corners_um"}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}: a region has {', '.join(sorted(known))}")
        for required in ("frame", "center_um"):
            if required not in record:
                raise ValueError(f"{required} is required")
        return cls(
            center_um=record["center_um"],
            half_size_um=record.get("half_size_um", (0.0, 0.0, 0.0)),
            frame=record["frame"],
            label=str(record.get("label", "")),
            corners_um=record.get("corners_um"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Metadata form (the "references" group): frame, centre, half size, label, lists of floats."""
        out: dict[str, Any] = {
            "frame": self.frame, "label": self.label, "center_um": self.center_um.tolist(),
            "half_size_um": self.half_size_um.tolist(),
        }
        if self.corners_um is not None:
            out["corners_um"] = self.corners_um.tolist()
        return out


def map_roi(roi: RegionOfInterest, transform: ArrayLike, *, to_frame: str) -> RegionOfInterest:
    """Express ``roi`` in another frame through ``transform`` (``T_to_from``, 4x4, from ``roi.frame``).

    Parameters
    ----------
    roi : RegionOfInterest
    transform : array_like, shape (4, 4)
        Maps ``roi.frame`` points to ``to_frame`` points.
    to_frame : str
        Name of the target frame.

    Returns
    -------
    RegionOfInterest
        Centre mapped exactly; box = axis-aligned bounds of the mapped corners, which are kept in
        ``corners_um``.
    """
    if not isinstance(roi, RegionOfInterest):
        raise ValueError(f"roi must be a RegionOfInterest, got {type(roi).__name__}")
    _frame_name(to_frame, "to_frame")
    matrix = np.asarray(transform, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"transform must be a finite 4x4 matrix, got shape {matrix.shape}")
    center = apply(matrix, roi.center_um)
    source_corners = roi.box_corners_um() if roi.corners_um is None else roi.corners_um
    corners = apply(matrix, source_corners)
    half = np.zeros(3) if roi.is_point else np.maximum(np.abs(corners - center).max(axis=0), 0.0)
    return RegionOfInterest(center_um=center, half_size_um=half, frame=to_frame, label=roi.label,
                            corners_um=None if roi.is_point else corners)


class FrameGraph:
    """Named frames of reference linked by recorded 4x4 transforms.

    Any frame can be expressed in any other connected one: the transform is composed along the shortest
    chain of recorded links, each used forwards or inverted explicitly.

    Examples
    --------
    >>> graph = FrameGraph()
    >>> graph.add(sample_from_microscope, to_frame="beamline_sample", from_frame="microscope_stage")
    >>> graph.map_roi(roi_in_sample, to_frame="microscope_stage")
    """

    def __init__(self) -> None:
        self._links: dict[tuple[str, str], NDArray[np.float64]] = {}  # (to, from) -> T_to_from

    @property
    def frames(self) -> tuple[str, ...]:
        names = {name for pair in self._links for name in pair}
        return tuple(sorted(names))

    def add(self, transform: ArrayLike, *, to_frame: str, from_frame: str) -> None:
        """Record ``T_to_from``; replaces an earlier record of the same link (either direction)."""
        _frame_name(to_frame, "to_frame")
        _frame_name(from_frame, "from_frame")
        if to_frame == from_frame:
            raise ValueError(f"a link needs two different frames, got {to_frame!r} twice")
        matrix = np.asarray(transform, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise ValueError(f"transform must be a finite 4x4 matrix, got shape {matrix.shape}")
        invert(matrix)  # raises ValueError for a singular transform: it could never be traversed backwards
        self._links.pop((from_frame, to_frame), None)
        self._links[(to_frame, from_frame)] = matrix.copy()

    def transform(self, *, to_frame: str, from_frame: str) -> NDArray[np.float64]:
        """``T_to_from`` composed along the shortest chain of links; raises if the frames are not connected."""
        for name, value in (("to_frame", to_frame), ("from_frame", from_frame)):
            _frame_name(value, name)
            if value not in self.frames:
                raise ValueError(f"{name} {value!r} is not a known frame (known: {self.frames})")
        if to_frame == from_frame:
            return np.eye(4)
        # Breadth-first search over links usable in both directions; each step stores T_node_from.
        reached: dict[str, NDArray[np.float64]] = {from_frame: np.eye(4)}
        queue = deque([from_frame])
        while queue:
            node = queue.popleft()
            for (a, b), matrix in self._links.items():  # matrix = T_a_from_b
                if b == node:
                    nxt, link = a, matrix
                elif a == node:
                    nxt, link = b, invert(matrix)
                else:
                    continue
                if nxt in reached:
                    continue
                reached[nxt] = compose(link, reached[node])
                if nxt == to_frame:
                    return reached[nxt]
                queue.append(nxt)
        raise RegistrationError(f"no recorded chain of transforms links {from_frame!r} to {to_frame!r}")

    def map_points(self, points_um: ArrayLike, *, to_frame: str, from_frame: str) -> NDArray[np.float64]:
        """Points ``(n, 3)`` or ``(3,)`` from one frame to another."""
        return apply(self.transform(to_frame=to_frame, from_frame=from_frame), points_um)

    def map_roi(self, roi: RegionOfInterest, *, to_frame: str) -> RegionOfInterest:
        """``roi`` (in its own frame) expressed in ``to_frame`` (see :func:`map_roi`)."""
        return map_roi(roi, self.transform(to_frame=to_frame, from_frame=roi.frame), to_frame=to_frame)

    def to_dict(self) -> dict[str, Any]:
        """Metadata form: the recorded links as ``{"to", "from", "matrix"}`` with nested-list matrices."""
        return {"links": [{"to": a, "from": b, "matrix": to_list(m)} for (a, b), m in self._links.items()]}


@dataclass(frozen=True)
class MicroscopeTarget:
    """Where to drive the microscope stage to centre a sample-frame point in the field of view.

    Attributes
    ----------
    stage_x_um, stage_y_um : float
        Stage position (µm) that images the point at the image centre.
    out_of_plane_um : float
        Height of the point above the imaged plane (microscope-frame z, µm); the point is only visible
        in the section if this is within the feature's size.
    """

    stage_x_um: float
    stage_y_um: float
    out_of_plane_um: float


def microscope_target(
    point_um: ArrayLike, *, sample_from_microscope: ArrayLike, max_out_of_plane_um: float | None = None
) -> MicroscopeTarget:
    """Microscope stage position that centres a ``beamline_sample`` point in the micrograph.

    A micrograph taken at stage ``(sx, sy)`` has its centre pixel at the microscope-stage point
    ``(sx, sy, 0)`` (docs/GEOMETRY.md), so the stage position is the point mapped by the inverse of
    ``sample_from_microscope``.

    Parameters
    ----------
    point_um : array_like, shape (3,)
        Point in ``beamline_sample`` (µm), e.g. a feature centroid.
    sample_from_microscope : array_like, shape (4, 4)
        The registered transform (e.g. ``RegistrationResult.sample_from_microscope``).
    max_out_of_plane_um : float, optional
        Raise :class:`RegistrationError` if the point lies farther than this from the imaged plane.

    Returns
    -------
    MicroscopeTarget
    """
    p = _vector3(point_um, "point_um")
    matrix = np.asarray(sample_from_microscope, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"sample_from_microscope must be a finite 4x4 matrix, got shape {matrix.shape}")
    local = apply(invert(matrix), p)
    target = MicroscopeTarget(stage_x_um=float(local[0]), stage_y_um=float(local[1]), out_of_plane_um=float(local[2]))
    if max_out_of_plane_um is not None:
        limit = float(max_out_of_plane_um)
        if not (np.isfinite(limit) and limit >= 0):
            raise ValueError(f"max_out_of_plane_um must be a non-negative number, got {max_out_of_plane_um!r}")
        if abs(target.out_of_plane_um) > limit:
            raise RegistrationError(
                f"the point {p.tolist()} um lies {target.out_of_plane_um:.1f} um from the imaged plane "
                f"(limit {limit:.1f} um): it is not in the microscope's section"
            )
    return target
