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

from corrflow.devices.sem import Microscope
from corrflow.plans.metadata import Sample
from corrflow.processing.roi import RegionOfInterest
from corrflow.plans.microscopy import _start_metadata as _micrograph_start_metadata
from corrflow.plans.microscopy import micrograph_run
from corrflow.plans.preflight import read_now
from corrflow.plans.requests import MicrographRequest, RelocateRoiRequest, stage_target_um
from corrflow.plans.validation import (
    PlanEstimate,
    PlanValidationError,
    estimate_micrograph,
    micrograph_setup,
    microscope_of,
    request_and_context,
)
from corrflow.processing.transforms import to_list

__all__ = ["estimate_relocate_roi", "relocate_roi", "stage_target_um"]


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
    """Validate the arguments and return the plan: move the microscope stage onto an ROI given in the sample frame.

    Parameters
    ----------
    microscope
        A :class:`~corrflow.devices.sem.Microscope`.
    roi, sample_from_microscope, transform_target_frame, max_out_of_plane_um, exposure_s
        See :class:`~corrflow.plans.requests.RelocateRoiRequest`; ``roi`` is a
        :class:`~corrflow.processing.roi.RegionOfInterest` or its fields as its ``to_dict`` writes them.
    sample
        Identification of the sample.
    parent_uids, md
        References (e.g. the tomography and registration runs) and extra metadata.

    Raises
    ------
    PlanValidationError
        When called: a malformed ROI or transform, an ROI in another frame or off the imaged plane
        (no hardware is read). When run: a stage target beyond the stage limits, found by the
        preflight before anything moves.
    """
    instrument = microscope_of(microscope)
    arguments = dict(locals())
    del arguments["microscope"], arguments["instrument"]
    request, context = request_and_context(RelocateRoiRequest, "relocate_roi", arguments)
    return _relocate_roi_plan(instrument, request, context)


def _micrograph_of(request: RelocateRoiRequest) -> MicrographRequest:
    target = request.stage_target_um
    return MicrographRequest(stage_x_um=float(target[0]), stage_y_um=float(target[1]), exposure_s=request.exposure_s)


def _checked_setup(microscope: Microscope, request: RelocateRoiRequest, context: Any) -> MsgGenerator[Any]:
    """Preflight, through the RunEngine: the stage target within the microscope's limits."""
    try:
        return (yield from micrograph_setup(microscope, _micrograph_of(request), context))
    except PlanValidationError as exc:
        target = request.stage_target_um.round(3).tolist()
        raise PlanValidationError("relocate_roi", [f"stage target {target} um: {p}" for p in exc.problems]) from None


def _relocate_roi_plan(microscope: Microscope, request: RelocateRoiRequest, context: Any) -> MsgGenerator[str]:
    setup = yield from _checked_setup(microscope, request, context)
    start_md = _micrograph_start_metadata(setup)
    start_md["plan_name"] = "relocate_roi"
    start_md["references"]["roi"] = request.roi.to_dict()
    start_md["references"]["transforms"][f"{request.transform_target_frame}_from_{microscope.frame}"] = to_list(
        np.asarray(request.sample_from_microscope, dtype=np.float64)
    )
    start_md["references"]["roi_in_stage_frame_um"] = request.stage_target_um.tolist()
    return (yield from micrograph_run(setup, start_md))


def estimate_relocate_roi(microscope: Microscope, **kwargs: Any) -> PlanEstimate:
    """Duration and data of :func:`relocate_roi` (validates first, reading the microscope now)."""
    from corrflow.plans.mosaic import _with_defaults

    arguments = _with_defaults(relocate_roi, kwargs)
    request, context = request_and_context(RelocateRoiRequest, "relocate_roi", arguments)
    read_now(_checked_setup(microscope_of(microscope), request, context))
    micrograph = _micrograph_of(request)
    return estimate_micrograph(
        microscope, stage_x_um=micrograph.stage_x_um, stage_y_um=micrograph.stage_y_um, sample=context.sample,
        exposure_s=micrograph.exposure_s,
    )
