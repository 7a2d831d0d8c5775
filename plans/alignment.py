"""Alignment from quick projections: find the rotation axis on the detector and centre it.

:func:`align_rotation_axis` takes dark and flat fields and four projections (0, 90, 180,
270 deg) in one run, then, from those frames (read back from the file the detector just wrote):

- the column ``c`` of the rotation axis, from the 0/180 deg pair: a parallel-beam projection at
  180 deg is the 0 deg one mirrored about the axis, ``p180[j] = p0[2c - j]``, so the mirrored
  180 deg projection is the 0 deg one shifted by ``2c - (cols - 1)`` columns; the shift is found
  to a fraction of a pixel (least squares over integer shifts, then a parabola);
- where the sample sits: its attenuation-weighted centroid relative to the axis in the 0 and
  90 deg projections (sample x and y offsets from the axis, um) and vertically (rows).

The results go to the run's ``alignment`` stream and the start document records the convention.
With ``apply=True`` the stage x then moves so that the axis falls on the detector's centre column
(``(cols - 1)/2``: moving x by ``dx`` moves the axis by ``dx / pixel`` columns) and z so that the
sample's vertical centroid falls on the centre row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import h5py
import numpy as np
from bluesky.utils import MsgGenerator
from numpy.typing import NDArray
from ophyd import Signal

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
from corrflow.plans.tomography import GEOMETRY_CONVENTIONS
from corrflow.plans.requests import AlignRotationAxisRequest, TomoScanRequest
from corrflow.plans.validation import PlanEstimate, PlanValidationError, request_and_context, tomo_devices, tomo_scan_setup

__all__ = ["ALIGNMENT_ANGLES_DEG", "align_rotation_axis", "axis_column_from_opposite_projections", "estimate_align_rotation_axis"]

ALIGNMENT_ANGLES_DEG = (0.0, 90.0, 180.0, 270.0)


def axis_column_from_opposite_projections(p0: NDArray[np.floating], p180: NDArray[np.floating], *, max_shift_px: int | None = None) -> float:
    """Column of the rotation axis from projections 180 deg apart.

    Parameters
    ----------
    p0, p180
        Attenuation projections (-log of flat-field corrected frames), shape ``(rows, cols)``,
        axis 0 = detector row, axis 1 = column.
    max_shift_px
        Largest ``|2c - (cols - 1)|`` searched (px); default ``cols // 2``.

    Returns
    -------
    float
        ``c`` (0-based column, continuous), with the convention ``u_j = (j - c) * pixel``.
    """
    p0 = np.asarray(p0, dtype=np.float64)
    mirrored = np.asarray(p180, dtype=np.float64)[:, ::-1]
    if p0.shape != mirrored.shape or p0.ndim != 2:
        raise ValueError(f"p0 and p180 must have the same (rows, cols) shape, got {p0.shape} and {mirrored.shape}")
    cols = p0.shape[1]
    limit = cols // 2 if max_shift_px is None else int(max_shift_px)
    shifts = np.arange(-limit, limit + 1)
    cost = np.empty(len(shifts))
    for k, s in enumerate(shifts):
        # mirrored[:, j] == p0[:, j + s] where both exist.
        if s >= 0:
            a, b = mirrored[:, : cols - s], p0[:, s:]
        else:
            a, b = mirrored[:, -s:], p0[:, : cols + s]
        cost[k] = np.mean((a - b) ** 2)
    best = int(np.argmin(cost))
    shift = float(shifts[best])
    if 0 < best < len(shifts) - 1:
        left, centre, right = cost[best - 1], cost[best], cost[best + 1]
        curvature = left - 2 * centre + right
        if curvature > 0:
            shift += 0.5 * (left - right) / curvature
    return (shift + cols - 1) / 2.0


def _centroid(weights: NDArray[np.float64], axis: int) -> float:
    profile = np.clip(weights, 0, None).sum(axis=axis)
    total = profile.sum()
    if total <= 0:
        return float("nan")
    return float(np.sum(np.arange(profile.size) * profile) / total)


def _read_frames(path: Path) -> NDArray[np.float64]:
    with h5py.File(path, "r", swmr=True) as f:
        return f["/entry/data/data"][()].astype(np.float64)


def analyse_alignment_frames(
    *, darks: NDArray, flats: NDArray, projections: NDArray, pixel_size_um: float
) -> dict[str, float]:
    """The alignment results from frames at :data:`ALIGNMENT_ANGLES_DEG` (see the module docstring).

    Parameters
    ----------
    darks, flats
        Shape ``(n, rows, cols)``.
    projections
        Shape ``(4, rows, cols)``, at 0, 90, 180 and 270 deg.
    pixel_size_um
        Detector pixel at the sample (um).

    Returns
    -------
    dict
        ``axis_column_px``, ``axis_offset_px`` (from the centre column), ``sample_offset_x_um``,
        ``sample_offset_y_um`` (sample centroid from the axis), ``sample_center_row_px``,
        ``sample_offset_z_um`` (from the centre row, + up).
    """
    dark = np.mean(darks, axis=0)
    flat = np.mean(flats, axis=0) - dark
    attenuation = -np.log(np.clip((np.asarray(projections, dtype=np.float64) - dark) / np.where(flat > 0, flat, 1), 1e-6, None))
    rows, cols = attenuation.shape[1:]
    c = axis_column_from_opposite_projections(attenuation[0], attenuation[2])
    centre_col, centre_row = (cols - 1) / 2.0, (rows - 1) / 2.0
    row_c = _centroid(attenuation[0], axis=1)
    return {
        "axis_column_px": c,
        "axis_offset_px": c - centre_col,
        "sample_offset_x_um": (_centroid(attenuation[0], axis=0) - c) * pixel_size_um,
        "sample_offset_y_um": -(_centroid(attenuation[1], axis=0) - c) * pixel_size_um,
        "sample_center_row_px": row_c,
        "sample_offset_z_um": (row_c - centre_row) * pixel_size_um,
    }


_UNITS = {"exposure_s": "s", "num_darks": "", "num_flats": "", "apply": "", "angles_deg": "deg", "flat_offset_x_um": "um",
          "detector_pixel_size_um": "um", "detector_shape_px": "px"}
_RESULT_UNITS = {"axis_column_px": "px", "axis_offset_px": "px", "sample_offset_x_um": "um", "sample_offset_y_um": "um",
                 "sample_center_row_px": "px", "sample_offset_z_um": "um"}


def align_rotation_axis(
    beamline: Beamline,
    *,
    sample: Sample | Mapping[str, str],
    exposure_s: float = 0.05,
    num_darks: int = 2,
    num_flats: int = 2,
    apply: bool = True,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[dict[str, float]]:
    """Validate the arguments and return the alignment plan (see the module docstring).

    Parameters
    ----------
    beamline
        A :class:`~corrflow.devices.beamline.Beamline`.
    sample
        Identification of the sample.
    exposure_s, num_darks, num_flats, apply
        See :class:`~corrflow.plans.requests.AlignRotationAxisRequest`.
    parent_uids, md
        References and extra metadata.

    Returns
    -------
    MsgGenerator[dict[str, float]]
        The plan; it returns the results (also recorded in the ``alignment`` stream).

    Raises
    ------
    PlanValidationError
        When called: an argument breaks the request model (no hardware is read). When run: the
        preflight finds the angles or the flat-field position beyond the soft limits, before any motion.
    """
    devices = tomo_devices(beamline)
    arguments = dict(locals())
    del arguments["beamline"], arguments["devices"]
    request, context = request_and_context(AlignRotationAxisRequest, "align_rotation_axis", arguments)
    return _align_rotation_axis_plan(devices, request, context)


def _tomography_of(request: AlignRotationAxisRequest) -> TomoScanRequest:
    """The scan the alignment takes: four projections over a full turn (0, 90, 180, 270 deg)."""
    return TomoScanRequest(
        num_projections=len(ALIGNMENT_ANGLES_DEG), exposure_s=request.exposure_s, start_deg=0.0,
        rotation_range_deg=360.0, num_darks=request.num_darks, num_flats=request.num_flats,
    )


def _align_rotation_axis_plan(devices: Any, request: AlignRotationAxisRequest, context: Any) -> MsgGenerator[dict[str, float]]:
    # Preflight, through the RunEngine: the beamline as it is when the plan runs.
    try:
        setup = yield from tomo_scan_setup(devices, _tomography_of(request), context)
    except PlanValidationError as exc:
        raise PlanValidationError("align_rotation_axis", exc.problems) from None
    stage, detector, shutter = devices.stage, devices.detector, devices.shutter
    pixel_um = float(setup.state.detector.pixel_size_um)
    parameters = {
        "exposure_s": request.exposure_s, "num_darks": request.num_darks, "num_flats": request.num_flats, "apply": request.apply,
        "angles_deg": list(ALIGNMENT_ANGLES_DEG), "flat_offset_x_um": setup.flat_offset_x_um,
        "detector_pixel_size_um": pixel_um, "detector_shape_px": list(setup.state.detector.frame_shape_px),
    }
    start_md = build_start_metadata(
        identification=identification_metadata(context.sample, facility=devices.facility, instrument=devices.instrument),
        references=references_metadata(frame=devices.frame, parent_uids=context.parent_uids, conventions=GEOMETRY_CONVENTIONS),
        settings=settings_metadata("align_rotation_axis", parameters, units=_UNITS),
        md=context.md,
        plan_name="align_rotation_axis",
        plan_args=parameters,
        detectors=[detector.name],
        motors=[stage.rotation.name, stage.x.name, stage.z.name],
        num_points=len(ALIGNMENT_ANGLES_DEG),
        planned_events={
            "dark": request.num_darks, "flat": request.num_flats, "primary": len(ALIGNMENT_ANGLES_DEG), "alignment": 1,
        },
        result_units=_RESULT_UNITS,
    )
    results = {name: Signal(name=f"alignment_{name}", value=float("nan")) for name in _RESULT_UNITS}
    readables = [stage, shutter]

    def frames() -> MsgGenerator[dict[str, float]]:
        previous = detector.last_file_path
        x0, z0 = setup.initial_x_um, setup.state.z_um
        yield from bps.mv(detector.exposure_s, request.exposure_s)
        yield from bps.mv(shutter, "closed", detector.image_key, IMAGE_KEY_DARK)
        yield from repeated_frames(detector, readables, stream="dark", num_frames=request.num_darks)
        dark_path = detector.last_file_path
        yield from bps.mv(stage.x, x0 + setup.flat_offset_x_um, shutter, "open", detector.image_key, IMAGE_KEY_FLAT)
        yield from repeated_frames(detector, readables, stream="flat", num_frames=request.num_flats)
        flat_path = detector.last_file_path
        yield from bps.mv(stage.x, x0, detector.image_key, IMAGE_KEY_PROJECTION)
        yield from frames_at_positions(detector, readables, motor=stage.rotation, positions=ALIGNMENT_ANGLES_DEG, stream="primary")
        projection_path = detector.last_file_path
        yield from bps.mv(shutter, "closed")
        if projection_path is None or previous in (dark_path, flat_path, projection_path):
            return {}  # walked without a RunEngine (a dry summary): no new file to analyse
        # A short read of the small files the detector has just closed.
        values = analyse_alignment_frames(
            darks=_read_frames(dark_path), flats=_read_frames(flat_path), projections=_read_frames(projection_path),
            pixel_size_um=pixel_um,
        )
        for name, value in values.items():
            yield from bps.mv(results[name], value)
        yield from bps.trigger_and_read(list(results.values()), name="alignment")
        if request.apply:
            yield from bps.mv(stage.x, x0 - values["axis_offset_px"] * pixel_um, stage.z, z0 - values["sample_offset_z_um"])
        return values

    def restore() -> MsgGenerator[None]:
        yield from bps.mv(shutter, "closed", stage.rotation, setup.initial_rotation_deg)

    found: dict[str, float] = {}

    @bpp.run_decorator(md=start_md)
    def run() -> MsgGenerator[None]:
        found.update((yield from bpp.finalize_wrapper(frames(), restore())))

    yield from run()  # returns the run uid; the plan returns the results
    return dict(found)


def estimate_align_rotation_axis(beamline: Beamline, **kwargs: Any) -> PlanEstimate:
    """Duration and data of :func:`align_rotation_axis` (validates first)."""
    from corrflow.plans.mosaic import _with_defaults
    from corrflow.plans.validation import estimate_tomo_scan

    kwargs = {k: v for k, v in _with_defaults(align_rotation_axis, kwargs).items() if k != "apply"}
    return estimate_tomo_scan(beamline, num_projections=4, start_deg=0.0, rotation_range_deg=360.0, **kwargs)
