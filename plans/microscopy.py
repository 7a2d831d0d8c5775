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
    SampleInfo,
    build_start_metadata,
    identification_metadata,
    references_metadata,
    settings_metadata,
)
from corrflow.plans.validation import MicrographRequest, PlanValidationError, validate_micrograph
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
    stage_x_um: float,
    stage_y_um: float,
    sample: SampleInfo | Mapping[str, str],
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
    request = validate_micrograph(
        microscope,
        stage_x_um=stage_x_um,
        stage_y_um=stage_y_um,
        sample=sample,
        exposure_s=exposure_s,
        parent_uids=parent_uids,
        md=md,
    )
    return _micrograph_plan(request, _start_metadata(request))


def _start_metadata(request: MicrographRequest) -> dict[str, Any]:
    detector = request.detector
    rows, cols = detector.frame_shape_px
    pixel_um = float(detector.pixel_size_um.get())
    exposure_s = request.exposure_s if request.exposure_s is not None else float(detector.exposure_s.get())
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
        )
    except ValueError as exc:
        raise PlanValidationError("micrograph", [str(exc)]) from None


def _micrograph_plan(request: MicrographRequest, start_md: dict[str, Any]) -> MsgGenerator[str]:
    stage, detector = request.stage, request.detector

    @bpp.run_decorator(md=start_md)
    @bpp.stage_decorator([detector])
    def run() -> MsgGenerator[None]:
        if request.exposure_s is not None:
            yield from bps.mv(detector.exposure_s, request.exposure_s)
        yield from bps.mv(stage.x, request.stage_x_um, stage.y, request.stage_y_um)
        yield from bps.trigger_and_read([detector, stage], name="primary")

    return (yield from run())
