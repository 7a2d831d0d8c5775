"""ROI relocation: image on the microscope a region found in another instrument's frame.

A region of interest found in the X-ray volume is given in ``beamline_sample`` coordinates; the
registration of a micrograph to that volume gives the 4x4 ``sample_from_microscope`` transform
(``beamline_sample`` <- ``microscope_stage``). :func:`relocate_roi` inverts the transform, maps the
region's centre into the microscope stage frame, checks that it lies on the sectioned plane the
microscope sees (stage frame z = 0, within ``max_out_of_plane_um``) and within the stage limits,
then moves there and records a micrograph whose start document carries the region, the transform
used and the stage target, so the chain from the X-ray data to this image is explicit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from bluesky.utils import MsgGenerator
from numpy.typing import ArrayLike
from pydantic import ValidationError

from corrflow.devices.sem import Microscope
from corrflow.plans.metadata import RegionOfInterest, Sample
from corrflow.plans.microscopy import _start_metadata as _micrograph_start_metadata
from corrflow.plans.microscopy import micrograph_run
from corrflow.plans.validation import PlanEstimate, PlanValidationError, estimate_micrograph, validate_micrograph
from corrflow.processing.transforms import invert, to_list

__all__ = ["estimate_relocate_roi", "relocate_roi", "stage_target_um"]


def stage_target_um(sample_from_microscope: ArrayLike, center_um: ArrayLike) -> np.ndarray:
    """Microscope stage coordinates of a point given in the sample frame, shape ``(3,)`` (um).

    Parameters
    ----------
    sample_from_microscope
        4x4 homogeneous transform mapping ``microscope_stage`` points to ``beamline_sample``.
    center_um
        The point in ``beamline_sample`` (um), shape ``(3,)``.
    """
    point = np.append(np.asarray(center_um, dtype=np.float64), 1.0)
    return (invert(np.asarray(sample_from_microscope, dtype=np.float64)) @ point)[:3]


def _validate(microscope: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    problems: list[str] = []
    roi = kwargs["roi"]
    if not isinstance(roi, RegionOfInterest):
        try:
            roi = RegionOfInterest.model_validate(dict(roi) if isinstance(roi, Mapping) else roi)
        except (ValidationError, TypeError) as exc:
            problems.append(f"roi: not a region of interest: {exc}")
            roi = None
    source = kwargs["transform_target_frame"]
    if roi is not None and roi.frame != source:
        problems.append(f"roi is in frame {roi.frame!r} but the transform maps into {source!r}")
    try:
        matrix = np.asarray(kwargs["sample_from_microscope"], dtype=np.float64)
    except (TypeError, ValueError):
        matrix = np.full((1,), np.nan)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        problems.append(f"sample_from_microscope must be a finite 4x4 matrix, got shape {matrix.shape}")
    elif not np.allclose(matrix[3], (0.0, 0.0, 0.0, 1.0)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
        problems.append("sample_from_microscope must be an invertible affine transform (last row 0 0 0 1)")
    tolerance = kwargs["max_out_of_plane_um"]
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not np.isfinite(tolerance) or tolerance <= 0:
        problems.append(f"max_out_of_plane_um must be a number > 0 um, got {tolerance!r}")
    if problems:
        raise PlanValidationError("relocate_roi", problems)
    target = stage_target_um(matrix, roi.center_um)  # type: ignore[union-attr]
    if abs(target[2]) > tolerance:
        raise PlanValidationError(
            "relocate_roi",
            [f"the roi centre is {target[2]:.1f} um off the sectioned plane seen by the microscope (limit {tolerance} um)"],
        )
    try:
        request = validate_micrograph(
            microscope, stage_x_um=float(target[0]), stage_y_um=float(target[1]), sample=kwargs["sample"],
            exposure_s=kwargs["exposure_s"], parent_uids=kwargs["parent_uids"], md=kwargs["md"],
        )
    except PlanValidationError as exc:
        raise PlanValidationError("relocate_roi", [f"stage target {target.round(3).tolist()} um: {p}" for p in exc.problems]) from None
    return {"request": request, "roi": roi, "matrix": matrix, "target": target}


def relocate_roi(
    microscope: Microscope,
    *,
    roi: RegionOfInterest | Mapping[str, Any],
    sample_from_microscope: Sequence[Sequence[float]],
    sample: Sample | Mapping[str, str],
    transform_target_frame: str = "beamline_sample",
    max_out_of_plane_um: float = 50.0,
    exposure_s: float | None = None,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Validate and return the plan: move the microscope stage onto an ROI given in the sample frame.

    Parameters
    ----------
    microscope
        A :class:`~corrflow.devices.sem.Microscope`.
    roi
        The region (:class:`~corrflow.plans.metadata.RegionOfInterest` or its fields), in
        ``transform_target_frame`` coordinates (um).
    sample_from_microscope
        The recorded 4x4 transform ``beamline_sample`` <- ``microscope_stage`` (e.g. from registration).
    sample
        Identification of the sample.
    transform_target_frame
        The frame the transform maps into; the ROI must be given in it.
    max_out_of_plane_um
        How far (um) the ROI centre may lie from the imaged plane (stage frame z = 0).
    exposure_s
        Frame time (s); default the detector's setting.
    parent_uids, md
        References (e.g. the tomography and registration runs) and extra metadata.

    Raises
    ------
    PlanValidationError
        On a malformed ROI or transform, an ROI off the imaged plane or beyond the stage limits.
    """
    checked = _validate(microscope, locals())
    request = checked["request"]
    start_md = _micrograph_start_metadata(request)
    start_md["plan_name"] = "relocate_roi"
    start_md["references"]["roi"] = checked["roi"].model_dump(mode="json")
    start_md["references"]["transforms"][f"{transform_target_frame}_from_{microscope.frame}"] = to_list(checked["matrix"])
    start_md["references"]["roi_in_stage_frame_um"] = checked["target"].tolist()
    return micrograph_run(request, start_md)


def estimate_relocate_roi(microscope: Microscope, **kwargs: Any) -> PlanEstimate:
    """Duration and data of :func:`relocate_roi` (validates first)."""
    from corrflow.plans.mosaic import _with_defaults

    checked = _validate(microscope, _with_defaults(relocate_roi, kwargs))
    request = checked["request"]
    return estimate_micrograph(
        microscope, stage_x_um=request.stage_x_um, stage_y_um=request.stage_y_um, sample=request.sample,
        exposure_s=request.exposure_s,
    )
