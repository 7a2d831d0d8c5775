"""Tomography scan: dark fields, flat fields and projections over a half (or full) turn.

Layering follows bluesky: the streams are built from plan stubs (:mod:`corrflow.plans.stubs`,
``bps.mv``) and preprocessors (``finalize_wrapper``, ``run_decorator``); the public :func:`tomo_scan` validates its arguments when called and returns
the plan, so a bad request fails before any message is yielded.

One run, three event streams, each with its own detector staging (its own HDF5 file and
StreamResource) and its NXtomo ``image_key`` recorded with every event and in the start document:

=========  =========  ============================================================
stream     image_key  what
=========  =========  ============================================================
dark       2          shutter closed
flat       1          shutter open, sample moved out of the beam by ``flat_offset_x_um``
primary    0          shutter open, one frame per angle over ``[start_deg, stop_deg)``
=========  =========  ============================================================

Rotation range: a half turn (``rotation_range_deg=180``, the default; complete for a parallel beam)
or a full turn (``rotation_range_deg=360``). Offset centre (half acquisition): with a full turn and
``axis_offset_um`` the projections are taken with the stage x moved by ``axis_offset_um`` from its
(centred) starting position, which puts the rotation axis that far from the detector centre; the
two half turns then see opposite halves of the sample, and a sample up to about
``2 * (detector width - overlap / 2)`` wide is reconstructed (:mod:`corrflow.processing.sinogram360`).
The offset is recorded in ``settings`` (``axis_offset_um``, ``rotation_range_deg``, ``field_of_view``,
``nominal_overlap_px``), in every projection's ``x_translation`` and, through
:func:`corrflow.formats.nexus.write_nxtomo_from_documents`, in the NXtomo file.

Every event also holds the stage's rotation angle and translations (the geometry of that frame),
the shutter state and, on a beamline with a heater, the measured sample temperature. Whatever happens, the plan ends with the shutter closed and the stage back
at its starting x and rotation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import MsgGenerator

from corrflow.devices.beamline import Beamline
from corrflow.devices.detectors import IMAGE_KEY_DARK, IMAGE_KEY_FLAT, IMAGE_KEY_PROJECTION
from corrflow.plans.metadata import (
    Sample,
    build_start_metadata,
    identification_metadata,
    references_metadata,
    settings_metadata,
)
from corrflow.plans.stubs import frames_at_positions, repeated_frames
from corrflow.plans.requests import TomoScanRequest
from corrflow.plans.validation import (
    PlanContext,
    PlanValidationError,
    TomoDevices,
    TomoScanSetup,
    request_and_context,
    tomo_devices,
    tomo_scan_setup,
)
from corrflow.processing.transforms import similarity

__all__ = ["GEOMETRY_CONVENTIONS", "IMAGE_KEY_BY_STREAM", "reference_frames", "tomo_scan"]

IMAGE_KEY_BY_STREAM = {"dark": IMAGE_KEY_DARK, "flat": IMAGE_KEY_FLAT, "primary": IMAGE_KEY_PROJECTION}

GEOMETRY_CONVENTIONS = (
    "beamline_sample: um, z = rotation axis (up), origin on the axis at the sample centre; the stage at "
    "angle theta rotates the sample counter-clockwise seen from +z, p_lab = Rz(theta) p_sample + (x, y, z)_stage; "
    "beam along lab +y; detector column j at u = (j - c) * pixel_size_um, c = rotation-axis column; "
    "row i at z = (i - (rows - 1)/2) * pixel_size_um, row 0 lowest"
)

_UNITS = {
    "num_projections": "",
    "start_deg": "deg",
    "stop_deg": "deg",
    "rotation_range_deg": "deg",
    "angle_step_deg": "deg",
    "axis_offset_um": "um",
    "field_of_view": "",
    "nominal_overlap_px": "px",
    "exposure_s": "s",
    "num_darks": "",
    "num_flats": "",
    "flat_offset_x_um": "um",
    "detector_shape_px": "px",
    "detector_pixel_size_um": "um",
    "detector_energy_keV": "keV",
    "detector_distance_mm": "mm",
}


def tomo_scan(
    beamline: Beamline | TomoDevices | tuple[Any, Any, Any],
    *,
    sample: Sample | Mapping[str, str],
    num_projections: int = 180,
    exposure_s: float = 0.05,
    start_deg: float = 0.0,
    rotation_range_deg: Literal[180.0, 360.0] = 180.0,
    axis_offset_um: float = 0.0,
    num_darks: int = 5,
    num_flats: int = 10,
    flat_offset_x_um: float | None = None,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Validate a tomography scan and return its plan.

    Parameters
    ----------
    beamline
        A :class:`~corrflow.devices.beamline.Beamline`, or ``(stage, detector, shutter)``.
    num_projections
        Number of projections (>= 2) in all, equally spaced over ``[start_deg, stop_deg)``: a full turn
        at the angular step of a half turn takes twice as many (and twice the exposure time).
    exposure_s
        Exposure time of every frame (s, > 0).
    sample
        Identification of the sample (:class:`~corrflow.plans.metadata.Sample` or its fields).
    start_deg
        First projection angle (deg).
    rotation_range_deg
        180 (default: a half turn, a complete parallel-beam set) or 360 (a full turn, needed for
        ``axis_offset_um``); the projections cover ``[start_deg, start_deg + rotation_range_deg)``.
    axis_offset_um
        Offset centre / half acquisition (um, default 0 = centred): the stage x is moved by this much
        from its current position, taken to centre the rotation axis on the detector (run
        ``align_rotation_axis`` first), for the projections; + puts the axis towards higher detector
        columns. Needs ``rotation_range_deg=360``; the two half turns then widen the field of view to
        about ``2 * detector width - overlap``. It must leave at least
        :data:`~corrflow.plans.validation.MIN_HALF_ACQUISITION_OVERLAP_PX` (16) detector columns seen by
        both half turns, i.e. ``|axis_offset_um| <= (cols - 16) / 2 * pixel_size_um``, and keep x within
        its limits.
    num_darks, num_flats
        Dark frames (shutter closed) and flat frames (sample out of the beam), each >= 1.
    flat_offset_x_um
        Stage x excursion for flats (um), from the starting x; default 1.5 x the detector width. It must
        clear the field of view (offset centre: at least detector width + ``|axis_offset_um|``) and stay
        within the x limits.
    parent_uids
        Runs or datasets this scan follows from (recorded in ``references``).
    md
        Extra start-document metadata (may not replace plan-owned keys).

    Returns
    -------
    MsgGenerator[str]
        The plan; run it with ``RE(plan)``. It returns the run uid.

    Raises
    ------
    PlanValidationError
        When called: an argument breaks :class:`~corrflow.plans.requests.TomoScanRequest` (no hardware
        is read). When run: the preflight finds the scan does not fit the beamline as it is (before
        anything moves or is written).
    """
    devices = tomo_devices(beamline)
    arguments = dict(locals())
    del arguments["beamline"], arguments["devices"]
    request, context = request_and_context(TomoScanRequest, "tomo_scan", arguments)
    return _tomo_scan_plan(devices, request, context)


def _start_metadata(request: TomoScanSetup) -> dict[str, Any]:
    devices, state = request.devices, request.state
    stage, detector = devices.stage, devices.detector
    angles = request.angles_deg
    parameters = {
        "num_projections": request.num_projections,
        "start_deg": request.start_deg,
        "stop_deg": request.stop_deg,
        "rotation_range_deg": request.rotation_range_deg,
        "angle_step_deg": (request.stop_deg - request.start_deg) / request.num_projections,
        "axis_offset_um": request.axis_offset_um,
        "field_of_view": "half" if request.half_acquisition else "full",
        "nominal_overlap_px": request.nominal_overlap_px,
        "exposure_s": request.exposure_s,
        "num_darks": request.num_darks,
        "num_flats": request.num_flats,
        "flat_offset_x_um": request.flat_offset_x_um,
        "detector_shape_px": list(state.detector.frame_shape_px),
        "detector_pixel_size_um": state.detector.pixel_size_um,
        "detector_energy_keV": state.energy_keV,
        "detector_distance_mm": state.distance_mm,
    }
    translation_um = (request.projection_x_um, state.y_um, state.z_um)
    lab_from_sample = similarity(rotation_deg=angles[0], translation_um=translation_um)
    try:
        return build_start_metadata(
            identification=identification_metadata(
                request.sample, facility=devices.facility, instrument=devices.instrument
            ),
            references=references_metadata(
                frame=devices.frame,
                transforms={f"lab_from_{devices.frame}_at_first_projection": lab_from_sample},
                parent_uids=request.parent_uids,
                conventions=GEOMETRY_CONVENTIONS,
            ),
            settings=settings_metadata("tomo_scan", parameters, units=_UNITS),
            md=request.md,
            plan_name="tomo_scan",
            plan_args={k: parameters[k] for k in parameters if not k.startswith("detector_")},
            detectors=[detector.name],
            motors=[stage.rotation.name, stage.x.name],
            num_points=request.n_frames,
            planned_events={"dark": request.num_darks, "flat": request.num_flats, "primary": request.num_projections},
            hints={"dimensions": [([stage.rotation.name], "primary")]},
            nxtomo={
                "image_key_by_stream": dict(IMAGE_KEY_BY_STREAM),
                "image_data_key": detector.image_data_key,
                "image_key_data_key": detector.image_key.name,
                "rotation_angle_data_key": stage.rotation.name,
                "x_translation_data_key": stage.x.name,
                "y_translation_data_key": stage.y.name,
                "z_translation_data_key": stage.z.name,
            },
        )
    except ValueError as exc:
        raise PlanValidationError("tomo_scan", [str(exc)]) from None


def _tomo_scan_plan(devices: TomoDevices, request: TomoScanRequest, context: PlanContext) -> MsgGenerator[str]:
    setup = yield from tomo_scan_setup(devices, request, context)
    return (yield from _tomo_scan_run(setup, _start_metadata(setup)))


def _tomo_scan_run(request: TomoScanSetup, start_md: dict[str, Any]) -> MsgGenerator[str]:
    devices = request.devices
    stage, shutter = devices.stage, devices.shutter

    @bpp.run_decorator(md=start_md)
    def run() -> MsgGenerator[str]:
        # Positions to come back to: the ones the preflight read.
        x0, rotation0 = request.initial_x_um, request.initial_rotation_deg

        def restore() -> MsgGenerator[None]:
            yield from bps.mv(shutter, "closed", stage.x, x0, stage.rotation, rotation0)

        yield from bpp.finalize_wrapper(_streams(request, x0=x0), restore())

    return (yield from run())


def reference_frames(request: TomoScanSetup, *, x0: float) -> MsgGenerator[None]:
    """Dark frames (shutter closed), then flat frames (sample out of the beam); ends with the
    shutter open, the stage at the projection position ``x0 + axis_offset_um`` and ``image_key`` set
    to projection."""
    devices = request.devices
    stage, detector, shutter = devices.stage, devices.detector, devices.shutter
    readables = _readables(request)
    yield from bps.mv(detector.exposure_s, request.exposure_s)

    yield from bps.mv(shutter, "closed", detector.image_key, IMAGE_KEY_DARK)
    yield from repeated_frames(detector, readables, stream="dark", num_frames=request.num_darks)

    yield from bps.mv(stage.x, x0 + request.flat_offset_x_um, shutter, "open", detector.image_key, IMAGE_KEY_FLAT)
    yield from repeated_frames(detector, readables, stream="flat", num_frames=request.num_flats)

    yield from bps.mv(stage.x, x0 + request.axis_offset_um, detector.image_key, IMAGE_KEY_PROJECTION)


def _readables(request: TomoScanSetup) -> list[Any]:
    # Geometry (stage), beam (shutter) and, in situ, the sample temperature go with every frame.
    devices = request.devices
    return [devices.stage, devices.shutter] + ([devices.heater] if devices.heater is not None else [])


def _streams(request: TomoScanSetup, *, x0: float) -> MsgGenerator[None]:
    yield from reference_frames(request, x0=x0)
    devices = request.devices
    yield from frames_at_positions(
        devices.detector, _readables(request), motor=devices.stage.rotation, positions=request.angles_deg, stream="primary"
    )
