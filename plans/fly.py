"""Tomography fly scan: projections taken while the sample rotates continuously.

Dark and flat fields are taken as in :func:`~corrflow.plans.tomography.tomo_scan` (streams
``dark`` and ``flat``, one event per frame). Then the rotation turns from
``start_deg - run_up_deg`` to ``stop_deg + run_up_deg`` at the constant speed that sweeps one
angular step per frame period, and the detector, armed before the rotation starts, begins its
``num_projections`` frames at that period when the rotation passes ``start_deg`` (frames
triggered by angle, then by time). The ``primary`` stream of the
fly part holds no events: its frames and, per frame, the rotation angle at mid-exposure and the
x, y, z translations (NDAttributes written with the frames) are announced as stream assets.
The angles recorded are the measured ones, not the nominal ``start + k * step``.

A full turn (``rotation_range_deg=360``) and an offset centre (``axis_offset_um``) work as in the step
scan: the stage x sits at its start plus ``axis_offset_um`` for the whole fly part, and each frame's
recorded x translation says so. The whole fly path, run-up included, must fit the rotation's limits
(e.g. ``start_deg=-180`` for a full turn on a +-360 deg stage).

Whatever happens, the plan ends with the shutter closed, the rotation at its nominal speed
and the stage back at its starting x and angle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import MsgGenerator

from corrflow.devices.beamline import Beamline
from corrflow.plans.metadata import Sample, settings_metadata
from corrflow.plans.tomography import _UNITS as _STEP_UNITS
from corrflow.plans.tomography import _start_metadata as _step_start_metadata
from corrflow.plans.tomography import reference_frames
from corrflow.plans.requests import TomoFlyScanRequest
from corrflow.plans.validation import (
    PlanContext,
    TomoDevices,
    TomoFlyScanSetup,
    request_and_context,
    tomo_devices,
    tomo_fly_scan_setup,
)

__all__ = ["tomo_fly_scan"]

_UNITS = {
    **_STEP_UNITS,
    "readout_s": "s",
    "period_s": "s",
    "velocity_deg_per_s": "deg/s",
    "run_up_deg": "deg",
}


def tomo_fly_scan(
    beamline: Beamline | TomoDevices | tuple[Any, Any, Any],
    *,
    sample: Sample | Mapping[str, str],
    num_projections: int = 180,
    exposure_s: float = 0.05,
    start_deg: float = 0.0,
    rotation_range_deg: Literal[180.0, 360.0] = 180.0,
    axis_offset_um: float = 0.0,
    readout_s: float = 0.001,
    run_up_deg: float | None = None,
    num_darks: int = 5,
    num_flats: int = 10,
    flat_offset_x_um: float | None = None,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Validate a tomography fly scan and return its plan.

    Parameters
    ----------
    beamline
        A :class:`~corrflow.devices.beamline.Beamline` (simulated or EPICS).
    num_projections
        Frames taken during the rotation (>= 2), in all: a full turn at the angular step of a half
        turn takes twice as many.
    exposure_s
        Exposure of every frame (s, > 0).
    sample
        Identification of the sample.
    start_deg
        Where the acquisition starts (deg).
    rotation_range_deg
        180 (default) or 360: the frames cover ``[start_deg, start_deg + rotation_range_deg)``.
    axis_offset_um
        Offset centre / half acquisition (um, default 0): stage x shift from its (centred) start during
        the projections; needs ``rotation_range_deg=360``. See
        :func:`~corrflow.plans.tomography.tomo_scan` for its limits.
    readout_s
        Dead time between frames (s, >= 0); the frame period is ``exposure_s + readout_s``.
    run_up_deg
        Extra rotation before ``start_deg`` and after ``stop_deg`` (deg, >= 0; default two
        angular steps) so the axis turns at constant speed throughout the acquisition.
    num_darks, num_flats
        Dark and flat frames (each >= 1).
    flat_offset_x_um
        Stage x excursion for flats (um); default 1.5 x the detector width.
    parent_uids
        Runs or datasets this scan follows from.
    md
        Extra start-document metadata.

    Returns
    -------
    MsgGenerator[str]
        The plan; it returns the run uid.

    Raises
    ------
    PlanValidationError
        On any bad argument (including a rotation speed above the axis' velocity or a path
        beyond its limits), before anything moves.
    """
    devices = tomo_devices(beamline)
    arguments = dict(locals())
    del arguments["beamline"], arguments["devices"]
    request, context = request_and_context(TomoFlyScanRequest, "tomo_fly_scan", arguments)
    return _fly_plan(devices, request, context)


def _start_metadata(request: TomoFlyScanSetup) -> dict[str, Any]:
    start = _step_start_metadata(request.tomo)
    detector = request.tomo.devices.detector
    parameters = dict(start["settings"]["parameters"])
    parameters.update(
        readout_s=request.readout_s,
        period_s=request.period_s,
        velocity_deg_per_s=request.velocity_deg_per_s,
        run_up_deg=request.run_up_deg,
    )
    start["settings"] = settings_metadata("tomo_fly_scan", parameters, units=_UNITS)
    start["plan_name"] = "tomo_fly_scan"
    start["plan_args"] = {k: parameters[k] for k in parameters if not k.startswith("detector_")}
    start["hints"] = {"dimensions": [([f"{detector.name}_rotation_angle"], "primary")]}
    start["nxtomo"] = {
        **start["nxtomo"],
        "fly_stream": "primary",
        "fly_rotation_angle_data_key": f"{detector.name}_rotation_angle",
        "fly_x_translation_data_key": f"{detector.name}_x_translation",
        "fly_y_translation_data_key": f"{detector.name}_y_translation",
        "fly_z_translation_data_key": f"{detector.name}_z_translation",
    }
    return start


def _fly_plan(devices: TomoDevices, request: TomoFlyScanRequest, context: PlanContext) -> MsgGenerator[str]:
    setup = yield from tomo_fly_scan_setup(devices, request, context)
    return (yield from _fly_run(setup, _start_metadata(setup)))


def _fly_run(request: TomoFlyScanSetup, start_md: dict[str, Any]) -> MsgGenerator[str]:
    tomo = request.tomo
    stage, shutter = tomo.devices.stage, tomo.devices.shutter
    rotation = stage.rotation

    @bpp.run_decorator(md=start_md)
    def run() -> MsgGenerator[str]:
        x0, rotation0 = tomo.initial_x_um, tomo.initial_rotation_deg  # as the preflight read them

        def restore() -> MsgGenerator[None]:
            yield from bps.mv(rotation.velocity, request.nominal_velocity_deg_per_s)
            yield from bps.mv(shutter, "closed", stage.x, x0, rotation, rotation0)

        def body() -> MsgGenerator[None]:
            yield from reference_frames(tomo, x0=x0)
            yield from _fly_projections(request)

        yield from bpp.finalize_wrapper(body(), restore())

    return (yield from run())


def _fly_projections(request: TomoFlyScanSetup) -> MsgGenerator[None]:
    tomo = request.tomo
    detector, rotation = tomo.devices.detector, tomo.devices.stage.rotation
    # At the start of the run-up at nominal speed, then at the fly speed.
    yield from bps.mv(rotation, request.first_deg)
    yield from bps.mv(rotation.velocity, request.velocity_deg_per_s)
    # Armed: the detector starts its frames when the rotation passes start_deg.
    yield from bps.prepare(
        detector,
        {"num_frames": tomo.num_projections, "period_s": request.period_s, "start": (rotation, tomo.start_deg)},
        wait=True,
    )

    @bpp.stage_decorator([detector])
    def acquire() -> MsgGenerator[None]:
        yield from bps.declare_stream(detector, name="primary", collect=True)
        yield from bps.kickoff(detector, wait=True)
        yield from bps.abs_set(rotation, request.last_deg, group="fly-rotation")
        yield from bps.complete(detector, wait=True)
        yield from bps.collect(detector, name="primary")
        yield from bps.wait(group="fly-rotation")

    yield from acquire()
