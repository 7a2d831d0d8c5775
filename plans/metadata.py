"""Start-document metadata in the three groups every corrflow run carries.

- ``identification``: who and what (proposal, sample, user, facility, instrument);
- ``references``: where (frame of reference, 4x4 transforms between frames, ROI, fiducials) and
  what came before (parent run and dataset ids);
- ``settings``: every parameter of the plan, with its unit.

Values are plain JSON types (transforms as nested lists) so any document store keeps them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, field_validator

from corrflow.processing.roi import RegionOfInterest
from corrflow.processing.transforms import to_list

__all__ = [
    "RESERVED_KEYS",
    "Sample",
    "build_start_metadata",
    "identification_metadata",
    "references_metadata",
    "settings_metadata",
]

# Keys the plans own in the start document; user metadata may not replace them.
RESERVED_KEYS = frozenset(
    {
        "identification", "references", "settings", "plan_name", "plan_args", "detectors", "motors", "num_points", "hints",
        "nxtomo", "planned_events",
    }
)


class Sample(BaseModel):
    """Who and what: the sample and the experiment it belongs to (one model for plans, flows and forms).

    It is recorded as the ``identification`` group of every run (``sample_name``, ``proposal``,
    ``user``, ``description``: the names NeXus and the catalog search use) and names files and flow
    runs, hence the restricted character set of ``name``. The proposal and user default to those of
    a simulated dry-run; a facility's forms and queue entries give their own.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Sample name (letters, digits, '_', '.', '-'; at most 64); used in file and flow-run names",
    )
    proposal: str = Field("sim-0001", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Proposal (beamtime) id")
    user: str = Field("local-user", min_length=1, max_length=64, description="Person responsible for the run")
    description: str = Field("", max_length=500, description="Free text about the sample")


def identification_metadata(sample: Sample, *, facility: str, instrument: str) -> dict[str, str]:
    """The ``identification`` group."""
    return {
        "proposal": sample.proposal,
        "sample_name": sample.name,
        "user": sample.user,
        "facility": facility,
        "instrument": instrument,
        "description": sample.description,
    }


def references_metadata(
    *,
    frame: str,
    transforms: Mapping[str, ArrayLike] | None = None,
    parent_uids: Sequence[str] = (),
    roi: RegionOfInterest | None = None,
    fiducials_um: ArrayLike | None = None,
    conventions: str = "",
) -> dict[str, Any]:
    """The ``references`` group.

    Parameters
    ----------
    frame
        Name of the frame the run's coordinates are in.
    transforms
        Named 4x4 homogeneous transforms (``"b_from_a"`` maps points in frame ``a`` to ``b``).
    parent_uids
        Run or dataset uids this run follows from.
    roi
        Region of interest the run targets.
    fiducials_um
        Known fiducial positions in ``frame``, shape ``(n, 3)``.
    conventions
        A sentence stating the geometry conventions of the frame.
    """
    references: dict[str, Any] = {
        "frame": frame,
        "transforms": {name: to_list(matrix) for name, matrix in (transforms or {}).items()},
        "parent_uids": [str(uid) for uid in parent_uids],
        "roi": roi.to_dict() if roi is not None else None,
        "conventions": conventions,
    }
    if fiducials_um is not None:
        points = np.asarray(fiducials_um, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"fiducials_um must have shape (n, 3), got {points.shape}")
        references["fiducials_um"] = points.tolist()
    return references


def settings_metadata(plan_name: str, parameters: Mapping[str, Any], *, units: Mapping[str, str]) -> dict[str, Any]:
    """The ``settings`` group: the plan's name, its parameters and the unit of each one.

    ``units`` must name a unit (``""`` for counts and other dimensionless values) for every
    parameter, so no value is recorded without its unit.
    """
    missing = sorted(set(parameters) - set(units))
    if missing:
        raise ValueError(f"settings_metadata: no unit given for {missing}")
    return {
        "plan_name": plan_name,
        "parameters": {name: _plain(value) for name, value in parameters.items()},
        "units": {name: units[name] for name in parameters},
    }


def build_start_metadata(
    *,
    identification: Mapping[str, Any],
    references: Mapping[str, Any],
    settings: Mapping[str, Any],
    md: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Merge the three groups, plan-owned ``extra`` keys and the user's ``md``.

    Raises
    ------
    ValueError
        ``md`` uses a key the plan owns (:data:`RESERVED_KEYS` or one of ``extra``).
    """
    user_md = dict(md or {})
    clashes = sorted(set(user_md) & (RESERVED_KEYS | set(extra)))
    if clashes:
        raise ValueError(f"md: keys {clashes} are set by the plan and cannot be given in md")
    return {
        **user_md,
        **extra,
        "identification": dict(identification),
        "references": dict(references),
        "settings": dict(settings),
    }


def _plain(value: Any) -> Any:
    """JSON-friendly copy: numpy scalars and arrays to Python numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
