"""Electron microscopy: move the stage to a position and record one image there.

The start document references the ``microscope_stage`` frame and records the 4x4 transform from
image pixel indices ``(column, row, 0)`` to stage coordinates (um), so registration can map the
image into the beamline sample frame without knowing the detector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import MsgGenerator

from corrflow.devices.sem import Microscope
from corrflow.plans.metadata import (
    Sample,
    build_start_metadata,
    identification_metadata,
    references_metadata,
    settings_metadata,
)
from corrflow.plans.requests import MicrographRequest
from corrflow.plans.validation import (
    MicrographSetup,
    PlanContext,
    PlanValidationError,
    micrograph_setup,
    microscope_of,
    request_and_context,
)
from corrflow.processing.transforms import similarity

__all__ = ["micrograph"]

_UNITS = {
    "stage_x_um": "um",
    "stage_y_um": "um",
    "exposure_s": "s",
    "detector_shape_px": "px",
    "detector_pixel_size_um": "um",
}


def micrograph(
    microscope: Microscope,
    *,
    sample: Sample | Mapping[str, str],
    stage_x_um: float = 0.0,
    stage_y_um: float = 0.0,
    exposure_s: float | None = None,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Validate a micrograph request and return its plan: move the stage, take one image.

    Parameters
    ----------
    microscope
        A :class:`~corrflow.devices.sem.Microscope`.
    stage_x_um, stage_y_um
        Stage position imaged at the image centre (um, ``microscope_stage`` frame).
    sample
        Identification of the sample.
    exposure_s
        Frame time (s, > 0); default: the detector's current setting.
    parent_uids
        Runs this image follows from (e.g. the tomography run that located the ROI).
    md
        Extra start-document metadata.

    Raises
    ------
    PlanValidationError
        On any bad argument, before anything moves or is written.
    """
    instrument = microscope_of(microscope)
    arguments = dict(locals())
    del arguments["microscope"], arguments["instrument"]
    request, context = request_and_context(MicrographRequest, "micrograph", arguments)
    return _micrograph_plan(instrument, request, context)


def _start_metadata(request: MicrographSetup) -> dict[str, Any]:
    detector, state = request.detector, request.state.detector
    rows, cols = state.frame_shape_px
    pixel_um = state.pixel_size_um
    exposure_s = request.exposure_s if request.exposure_s is not None else state.exposure_s
    parameters = {
        "stage_x_um": request.stage_x_um,
        "stage_y_um": request.stage_y_um,
        "exposure_s": exposure_s,
        "detector_shape_px": [rows, cols],
        "detector_pixel_size_um": pixel_um,
    }
    # Pixel (row r, column c) images stage point (x + (c - (cols-1)/2) px, y + (r - (rows-1)/2) px, 0).
    stage_from_image = similarity(
        scale=pixel_um,
        translation_um=(
            request.stage_x_um - (cols - 1) / 2 * pixel_um,
            request.stage_y_um - (rows - 1) / 2 * pixel_um,
            0.0,
        ),
    )
    try:
        return build_start_metadata(
            identification=identification_metadata(
                request.sample, facility=request.facility, instrument=request.instrument
            ),
            references=references_metadata(
                frame=request.frame,
                transforms={f"{request.frame}_from_image_px": stage_from_image},
                parent_uids=request.parent_uids,
                conventions="image point (column, row, 0) in pixels maps to the stage frame in um",
            ),
            settings=settings_metadata("micrograph", parameters, units=_UNITS),
            md=request.md,
            plan_name="micrograph",
            plan_args={"stage_x_um": request.stage_x_um, "stage_y_um": request.stage_y_um, "exposure_s": exposure_s},
            detectors=[detector.name],
            motors=[request.stage.x.name, request.stage.y.name],
            num_points=1,
            planned_events={"primary": 1},
        )
    except ValueError as exc:
        raise PlanValidationError("micrograph", [str(exc)]) from None


def _micrograph_plan(microscope: Microscope, request: MicrographRequest, context: PlanContext) -> MsgGenerator[str]:
    setup = yield from micrograph_setup(microscope, request, context)
    return (yield from micrograph_run(setup, _start_metadata(setup)))


def micrograph_run(request: MicrographSetup, start_md: dict[str, Any]) -> MsgGenerator[str]:
    """The micrograph's run for a checked setup (also the last step of ``relocate_roi``)."""
    stage, detector = request.stage, request.detector

    @bpp.run_decorator(md=start_md)
    @bpp.stage_decorator([detector])
    def run() -> MsgGenerator[None]:
        if request.exposure_s is not None:
            yield from bps.mv(detector.exposure_s, request.exposure_s)
        yield from bps.mv(stage.x, request.stage_x_um, stage.y, request.stage_y_um)
        yield from bps.trigger_and_read([detector, stage], name="primary")

    return (yield from run())
